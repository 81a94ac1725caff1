"""``python -m feature_extract …``: the ``disalign extract`` flags without the subcommand (what torchrun runs).

Any :class:`~calib.errors.DisalignError` is printed as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import sys

from calib.errors import DisalignError
from feature_extract.cli import build_parser, run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DisalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full …: one sentence, no traceback
        print(f"error: {exc.strerror or exc} ({exc.filename or 'file'}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
