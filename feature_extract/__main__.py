"""``python -m feature_extract …``: the ``disalign extract`` flags without the subcommand (what torchrun runs).

Any :class:`~calib.errors.DisalignError` is printed as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import sys

from calib.cli_common import run_command
from feature_extract.cli import build_parser, run


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
