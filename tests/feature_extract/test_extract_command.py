"""The ``extract`` subcommand (``disalign extract``, also what torchrun runs): flags, conversion to ExtractConfig, errors."""

from __future__ import annotations

import argparse
import json

import pytest

from disalign.cli.extract import add_parser, config_from_args, run
from disalign.feature_extract.extract import resolve_preprocessing
from disalign.feature_extract.preprocess import Preprocessing

from .conftest import CARD, MODEL, run_module


def _subparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disalign")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_extract_subcommand_flags_and_defaults(tmp_path):
    parser = _subparser()
    args = parser.parse_args(["extract", "--model", "m.ts", "--root", "r", "--list", "l.txt", "--out", "b.h5",
                              "--views", "3", "--batch-size", "64", "--workers", "2", "--device", "cuda",
                              "--class-counts-from", "train.h5", "--overwrite", "--strict"])
    assert args.func is run
    cfg = config_from_args(args)
    assert (cfg.model, str(cfg.root), str(cfg.list_file), str(cfg.out)) == ("m.ts", "r", "l.txt", "b.h5")
    assert (cfg.views, cfg.batch_size, cfg.workers, cfg.device) == (3, 64, 2, "cuda")
    assert (str(cfg.class_counts_from), cfg.overwrite, cfg.strict, cfg.prep) == ("train.h5", True, True, None)
    assert (cfg.feature_dtype, cfg.chunk_size, cfg.assemble, cfg.draft) == ("float16", 4096, "concat", True)
    help_text = parser._subparsers._group_actions[0].choices["extract"].format_help()
    assert "--batch-size BATCH_SIZE" in help_text and "(default: 256)" in help_text and "--feature-dtype" in help_text


def test_preprocessing_flags_override_the_card():
    args = _subparser().parse_args(["extract", "--model", "m.ts", "--card", str(CARD), "--folder", "f", "--out", "b.h5",
                                      "--crop", "28x30", "--mean", "0.5,0.5,0.5"])
    cfg = config_from_args(args)
    prep, source = resolve_preprocessing(cfg, json.loads(CARD.read_text()), None)
    assert prep == Preprocessing(resize=None, crop=(28, 30), mean=(0.5, 0.5, 0.5), std=Preprocessing.from_card(CARD).std)
    assert source == f"model card {CARD}, with the command line's overrides"
    args = _subparser().parse_args(["extract", "--model", "m.ts", "--folder", "f", "--out", "b.h5", "--resize", "160", "--crop", "128",
                                      "--interpolation", "bicubic"])
    assert resolve_preprocessing(config_from_args(args), {}, None)[0] == Preprocessing(
        160, (128, 128), Preprocessing.imagenet().mean, Preprocessing.imagenet().std, interpolation="bicubic")


def test_bad_flag_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        _subparser().parse_args(["extract", "--model", "m", "--folder", "f", "--out", "o", "--mean", "1,2"])
    assert "expected three comma-separated numbers, found 2 in '1,2'" in capsys.readouterr().err


def test_module_entry_point_prints_one_error_line(tmp_path, cifar_root):
    bad = tmp_path / "list.txt"
    bad.write_text("train/cat/0000.jpg 3\ntrain/cat/0001.jpg three\n")
    proc = run_module(["-m", "disalign", "extract", "--model", str(MODEL), "--root", str(cifar_root), "--list", str(bad),
                       "--out", str(tmp_path / "b.h5")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad} line 2: the label should be an integer, found 'three'."]


def test_top_level_disalign_extract(tmp_path, capsys):
    from disalign.cli import main

    code = main(["extract", "--model", str(tmp_path / "absent.ts"), "--folder", str(tmp_path), "--out", str(tmp_path / "b.h5"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --folder {tmp_path} has no class sub-directories (expected root/<class>/<image>)."
