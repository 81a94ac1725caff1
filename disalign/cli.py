"""The ``disalign`` command line, composed from the subcommands each package registers:

    calib            fit, eval, predict, eval-segmentation, eval-detection   (calib.cli.add_parsers)
    feature_extract  extract                                                  (feature_extract.cli.add_parser)
    service          serve                                                    (service.cli.add_parser)

Packages only import downward (service → feature_extract → calib), so the one place that sees them
all is this module, above them. Any :class:`~calib.errors.DisalignError` is printed as one
``error: …`` line with exit status 2 (:func:`calib.cli_common.run_command`).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from calib import __version__
from calib.cli import add_parsers as add_calib_parsers
from calib.cli_common import run_command
from feature_extract.cli import add_parser as add_extract_parser
from service.cli import add_parser as add_serve_parser

COMMANDS = ("fit", "eval", "adapt", "predict", "eval-segmentation", "eval-detection", "extract", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disalign", description="Post-hoc distribution alignment of long-tail classifiers.",
                                     epilog="'disalign COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=f"disalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    add_calib_parsers(subparsers)
    add_extract_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["disalign", *argv])  # recorded in the reports
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
