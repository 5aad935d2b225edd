# jhlab guest tools and the hypervisor model for login shells.
export PATH="/opt/jhlab/bin:$PATH"
export PYTHONPATH=/opt/jhlab/lib
