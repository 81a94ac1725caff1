"""``python -m disalign …``: the same as the ``disalign`` command."""

import sys

from disalign.cli import main

sys.exit(main())
