"""What every ``disalign`` subcommand shares: the error wrapper (:func:`run_command`), the help formatter,
``--quiet``, argument types, and the checks and atomic writes of output paths.

Only the command modules of :mod:`disalign.cli` import this; library code never does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from disalign.calib import sizes
from disalign.calib.errors import DisalignError, DisalignWarning, InputError
from disalign.calib.files import check_output_file, write_atomic

STDOUT = "-"  # an output path that means standard output
MAX_STEPS_HELP = "cap on the SGD steps of lws and crt (default: the full classifier-balancing recipe; epochs are shortened alike)"


def method_names_help(separator: str) -> str:
    """Every method name (:data:`disalign.calib.estimators.methods.METHODS`, which imports no torch), for help texts."""
    from disalign.calib.estimators.methods import METHODS

    return separator.join(METHODS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: …)`` only where it says something: not for unset (None) or off (False) flags, not
    for required ones, and not when the help text already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


MODEL_ARG_HELP = ("keyword argument of the model's builder (timm.create_model, from_pretrained, torchvision's get_model, "
                  "a factory), e.g. num_classes=10; repeatable; VALUE is read as JSON when it parses (10, 0.1, true, "
                  "[3, 32, 32], {\"crop_pct\": 1.0}), else as text")


def model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--model-arg``: VALUE as JSON when it parses, else the text itself."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python identifier, like num_classes=10, found {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def model_args_dict(pairs: list[tuple[str, object]] | None) -> dict[str, object]:
    """The ``--model-arg`` pairs as a dict; a key given twice is an error (which one was meant?)."""
    out: dict[str, object] = {}
    for key, value in pairs or []:
        if key in out:
            raise InputError(f"--model-arg {key} is given twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or notes on stderr (bars are also off when stderr is not a terminal)")


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand; a user-facing error becomes one ``error: …`` line and exit status 2."""
    try:
        with shown_warnings():
            return int(func(args) or 0)
    except DisalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full …: still one sentence, no traceback
        print(f"error: {exc.strerror or exc} ({exc.filename or 'file'}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130


@contextlib.contextmanager
def shown_warnings() -> Iterator[None]:
    """The library's warnings (:class:`DisalignWarning`: it never prints) as ``warning: <sentence>`` lines
    on stderr while they happen, every time; any other warning keeps Python's own handling."""
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DisalignWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            python_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always", DisalignWarning)
        warnings.showwarning = show
        yield


def note(message: str, *, quiet: bool = False) -> None:
    """An informational line on stderr (a setting that is ignored, a file written); silent with --quiet."""
    if not quiet:
        print(f"note: {message}", file=sys.stderr)


# -- argument types -----------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5GiB', '8MiB' or a plain byte count → bytes (:func:`disalign.calib.sizes.parse_bytes`, for argparse)."""
    try:
        return sizes.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def output_path(text: str) -> Path | str:
    """A file to write, or ``-`` for standard output."""
    return STDOUT if text == STDOUT else Path(text)


# -- outputs: checked before any work, written atomically at the end ----------------------------------
def check_writable_file(path: Path | str | None, flag: str, *, overwrite: bool) -> None:
    """Raise if ``path`` cannot become a file (:func:`disalign.calib.files.check_output_file`): it is a
    directory, a symlink, a FIFO or a device, exists without ``overwrite``, or its nearest existing parent is
    not a writable directory. ``-`` (standard output) and None pass."""
    if path is None or path == STDOUT:
        return
    path = Path(path)
    check_output_file(path, flag, overwrite=overwrite)
    _check_parent(path, flag)


def check_writable_files(directory: Path | None, names, flag: str, *, overwrite: bool) -> None:
    """The output-file rule (:func:`disalign.calib.files.check_output_file`) for each of ``names`` inside an
    existing output ``directory`` (the PNGs of ``--plots``)."""
    if directory is None or not directory.is_dir():
        return
    for name in names:
        check_output_file(directory / name, flag, overwrite=overwrite)


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"allow replacing {what} already there (regular files only: never a link, FIFO or device)")


def check_writable_dir(path: Path | None, flag: str) -> None:
    """Raise if ``path`` cannot become a directory of outputs (it is a file, or its parent is not writable)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} exists and is not a directory; expected a directory for the files.")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path} is not writable.")
        return
    _check_parent(path, flag)


def _check_parent(path: Path, flag: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: directory {parent} is not writable.")


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`disalign.calib.files.write_atomic`); ``-`` writes to stdout."""
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_atomic(Path(path), text.encode())
