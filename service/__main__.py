"""``python -m service …``: the same as ``disalign serve …``."""

import sys

from service.cli import main

sys.exit(main())
