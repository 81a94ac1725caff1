"""The composed ``disalign`` command line: every subcommand registered once, ``--version``, help texts that
say something for every flag, and ``python -m disalign`` (the import layers: tests/disalign/test_layers.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from disalign.calib import __version__
from disalign.cli import COMMANDS, build_parser
from tests.conftest import REPO


def run(*argv: str, module: str = "disalign") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, timeout=120)


def subcommands() -> dict:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def test_version():
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"disalign {__version__}\n")


def test_every_package_registers_its_subcommands():
    assert list(subcommands()) == list(COMMANDS)
    help_text = build_parser().format_help()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\w", help_text, re.MULTILINE), command  # listed with its one-line help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_something_for_every_flag_and_no_empty_defaults(command):
    parser = subcommands()[command]
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.required:
            assert "default" not in parser._get_formatter()._get_help_string(action)
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for flag_help in re.split(r"\n  (?=-)", text):  # one chunk per option
        assert flag_help.count("default") <= 1, flag_help
    assert "--quiet" in text


def test_help_of_flags_named_in_the_issue():
    fit = subcommands()["fit"].format_help()
    assert re.search(r"--seed SEED\s+seed of the SGD methods", fit)
    flat = " ".join(fit.split())  # argparse wraps the help at the terminal width
    assert re.search(r"--out OUT calibration directory: new, empty or holding a calibration \(a new version is published in it\) --", flat)  # required: no default shown
    assert re.search(r"--batch-size BATCH_SIZE\s+test images per detector forward pass \(default: 8\)",
                     subcommands()["eval-detection"].format_help())
    assert "(default: all with --train, else joint + the calibration)" in " ".join(subcommands()["eval"].format_help().split())


def test_python_dash_m_disalign_is_the_command():
    # the one entry point; torchrun runs it too (torchrun ... -m disalign extract ...)
    for argv, expected in ((["fit", "--help"], "usage: disalign fit"), (["extract", "--help"], "usage: disalign extract"),
                           (["serve", "--help"], "usage: disalign serve")):
        result = run(*argv)
        assert result.returncode == 0 and result.stdout.startswith(expected), result.stderr


def test_errors_are_one_line_with_exit_2(tmp_path):
    result = run("predict", str(tmp_path / "none.h5"), "--calibration", str(tmp_path), "--out", str(tmp_path / "p.csv"))
    assert (result.returncode, result.stderr) == (2, f"error: {tmp_path} is not a calibration directory: expected current -> versions/<id> (or calibration.json and parameters.safetensors).\n")


def test_model_args_are_json_when_they_parse_and_reach_extract_and_serve(tmp_path, monkeypatch):
    from disalign.calib.errors import InputError
    from disalign.cli.common import model_arg, model_args_dict
    from disalign.cli.extract import config_from_args
    from disalign.service.settings import Settings

    assert [model_arg(t) for t in ("num_classes=10", "drop=0.1", "pretrained=true", "global_pool=avg", 'cfg={"crop_pct": 1.0}')] == [
        ("num_classes", 10), ("drop", 0.1), ("pretrained", True), ("global_pool", "avg"), ("cfg", {"crop_pct": 1.0})]
    with pytest.raises(InputError, match=r"^--model-arg k is given twice \(1 and 2\); give it once\.$"):
        model_args_dict([("k", 1), ("k", 2)])
    parser = subcommands()["extract"]
    args = parser.parse_args(["--model", "timm:resnet18", "--model-arg", "num_classes=10", "--interpolation", "bicubic",
                              "--folder", str(tmp_path), "--out", str(tmp_path / "b.h5")])
    cfg = config_from_args(args)
    assert cfg.model_args == {"num_classes": 10} and cfg.prep_overrides.interpolation == "bicubic" and cfg.prep is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--model-arg", "no-equals", "--out", "b.h5"])
    monkeypatch.setenv("DISALIGN_MODEL_ARGS", '{"num_classes": 10}')
    assert Settings(model="timm:resnet18", calibration=tmp_path).model_args == {"num_classes": 10}
    serve = subcommands()["serve"].parse_args(["--model-arg", "num_classes=3"])
    assert serve.model_args == [("num_classes", 3)]


DOCUMENTED_ELSEWHERE = {"extract": ("docs/extract.md", "docs/dense.md"), "eval-segmentation": ("docs/dense.md",),
                        "eval-detection": ("docs/dense.md",), "export": ("docs/export.md",)}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])  # serve's flags are settings: docs/service.md by DISALIGN_* name
def test_every_command_and_flag_is_in_the_docs(command):
    """Issue 21 §5: docs/cli.md omitted `adapt`. Each command has its section, where every one of its flags appears."""
    page = "\n".join((REPO / doc).read_text() for doc in DOCUMENTED_ELSEWHERE.get(command, ("docs/cli.md",)))
    if command not in DOCUMENTED_ELSEWHERE:
        sections = re.split(r"^## ", page, flags=re.MULTILINE)
        page = next((s for s in sections if s.startswith(f"`{command}`")), "")
        assert page, f"docs/cli.md has no '## `{command}`' section"
    flags = {flag for action in subcommands()[command]._actions for flag in action.option_strings if flag.startswith("--")}
    missing = sorted(flag for flag in flags - {"--help"} if flag not in page)
    assert missing == [], f"{command}: {missing} not in its docs"
