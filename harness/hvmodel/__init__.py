"""hvmodel: a Python reimplementation of the Jailhouse hypervisor (x86).

Standard library only: the same package runs inside the lab's root cell (Debian's
python3, nothing installed) as the hypervisor, and on the host as the oracle.
Nothing in here may import from the rest of :mod:`harness`.
"""
