"""``python -m harness.bench``: same as ``jhlab bench``."""

import sys

from harness.bench import main

sys.exit(main())
