"""The ``disalign`` command line: one parser tree, one module per command.

    fit                 disalign.cli.fit
    eval                disalign.cli.evaluate
    eval-segmentation   disalign.cli.evaluate_dense
    eval-detection      disalign.cli.evaluate_dense
    adapt               disalign.cli.adapt
    predict             disalign.cli.predict
    extract             disalign.cli.extract
    serve               disalign.cli.serve
    export              disalign.cli.export

What the commands share (errors, help, output checks) is :mod:`disalign.cli.common`. This is the top floor:
it imports the service, the extractor and the calibration core, and none of them imports it. Any
:class:`~disalign.calib.errors.DisalignError` is printed as one ``error: …`` line with exit status 2
(:func:`disalign.cli.common.run_command`). ``python -m disalign`` is the same command.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from disalign.calib import __version__
from disalign.cli import adapt, evaluate, evaluate_dense, export, extract, fit, predict, serve
from disalign.cli.common import run_command

COMMANDS = ("fit", "eval", "adapt", "predict", "eval-segmentation", "eval-detection", "extract", "serve", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disalign", description="Post-hoc distribution alignment of long-tail classifiers.",
                                     epilog="'disalign COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=f"disalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    fit.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    adapt.add_parser(subparsers)
    predict.add_parser(subparsers)
    evaluate_dense.add_parsers(subparsers)
    extract.add_parser(subparsers)
    serve.add_parser(subparsers)
    export.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["disalign", *argv])  # recorded in the reports
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
