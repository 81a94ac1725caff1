"""Server settings as a user types them: sizes like ``16M``, the admin token file, errors naming the flag and
the variable, one ``--max-pixels`` default for ``extract`` and ``serve``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disalign.cli import build_parser
from disalign.cli.serve import add_arguments, run
from disalign.service.settings import Settings
from tests.conftest import REPO

REQUIRED = {"model": "m.ts", "calibration": "calib"}
TOKEN = "0123456789abcdef-token"


def serve(argv: list[str], capsys) -> tuple[int, str]:
    """``disalign serve ARGV`` up to the settings (it stops there when they are invalid): (status, stderr)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("text", "expected"), [("16M", 16 * 2**20), ("8MiB", 8 * 2**20), ("1.5G", int(1.5 * 2**30)),
                                                ("512k", 512 * 1024), ("1048576", 2**20), (" 2 MB ", 2 * 2**20)])
def test_sizes_are_written_as_people_write_them_in_flags_and_environment(text, expected, monkeypatch):
    assert Settings(**REQUIRED, max_body_bytes=1024, max_inflight_body_bytes=text).max_inflight_body_bytes == expected
    monkeypatch.setenv("DISALIGN_MAX_BODY_BYTES", "1K")
    monkeypatch.setenv("DISALIGN_MAX_INFLIGHT_BODY_BYTES", text)
    assert (Settings(**REQUIRED).max_body_bytes, Settings(**REQUIRED).max_inflight_body_bytes) == (1024, expected)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--max-body-bytes", text]).max_body_bytes == expected
    fit = build_parser().parse_args(["fit", "train.h5", "--out", "c", "--max-memory", text])
    assert fit.max_memory == expected  # the same parser as `disalign fit --max-memory`


@pytest.mark.parametrize(("argv", "env", "sentence"), [
    (["--model", "m.ts"], {}, "error: --calibration / DISALIGN_CALIBRATION is required."),
    (["--calibration", "c"], {}, "error: --model / DISALIGN_MODEL is required."),
    (["--model", "m.ts", "--calibration", "c"], {"DISALIGN_MAX_BODY_BYTES": "lots"},
     "error: --max-body-bytes / DISALIGN_MAX_BODY_BYTES: expected a size like 16M, 8MiB or 1048576, found 'lots'."),
    (["--model", "m.ts", "--calibration", "c", "--timeout-body", "0"], {},
     "error: --timeout-body / DISALIGN_TIMEOUT_BODY: input should be greater than 0, found 0.0."),
    (["--model", "m.ts", "--calibration", "c", "--max-body-bytes", "16M", "--max-inflight-body-bytes", "8M"], {},
     "error: --max-inflight-body-bytes / DISALIGN_MAX_INFLIGHT_BODY_BYTES (8388608) should be at least --max-body-bytes / "
     "DISALIGN_MAX_BODY_BYTES (16777216), or no body of the largest size could ever be received."),
    (["--model", "m.ts", "--calibration", "c"], {"DISALIGN_ADMIN_TOKEN": "short"},
     "error: DISALIGN_ADMIN_TOKEN: the admin token should have at least 16 characters; leave it unset to disable the admin routes."),
])
def test_setting_errors_name_the_flag_and_the_variable(argv, env, sentence, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("DISALIGN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve(argv, capsys) == (2, sentence)


def test_the_admin_token_can_come_from_a_file(tmp_path, monkeypatch):
    secret = tmp_path / "admin_token"
    secret.write_text(TOKEN + "\n")  # as `echo … > file` writes it
    monkeypatch.setenv("DISALIGN_ADMIN_TOKEN_FILE", str(secret))
    monkeypatch.delenv("DISALIGN_ADMIN_TOKEN", raising=False)
    assert Settings(**REQUIRED).admin_token.get_secret_value() == TOKEN
    monkeypatch.setenv("DISALIGN_ADMIN_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="set DISALIGN_ADMIN_TOKEN or DISALIGN_ADMIN_TOKEN_FILE, not both"):
        Settings(**REQUIRED)


def test_a_token_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DISALIGN_ADMIN_TOKEN_FILE": str(fifo), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "disalign", "serve", "--model", "m.ts", "--calibration", "c"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == f"error: DISALIGN_ADMIN_TOKEN_FILE {fifo} is not a regular file."


def test_serve_and_extract_share_one_max_pixels_default():
    extract = build_parser().parse_args(["extract", "--model", "m.ts", "--folder", "f", "--out", "b.h5"])
    assert extract.max_pixels == Settings(**REQUIRED).max_pixels == 25_000_000
    assert Path(REPO / "docs" / "service.md").read_text().count("25,000,000") >= 1


# -- the traffic sources that may move the adaptive prior (issue 21 §1) -----------------------------------------
GATEWAY = "gateway-token-0123456789"


def test_traffic_sources_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DISALIGN_PRIOR", "adaptive")
    monkeypatch.setenv("DISALIGN_PRIOR_SOURCES", f'{{"gateway": "{GATEWAY}", "partner": {{"token": "partner-token-0123456789", "max_share": 0.1}}}}')
    sources = Settings(**REQUIRED).prior_sources
    assert sources["gateway"].token.get_secret_value() == GATEWAY and sources["gateway"].max_share == 1.0
    assert sources["partner"].max_share == 0.1
    monkeypatch.delenv("DISALIGN_PRIOR_SOURCES")
    secret = tmp_path / "sources.json"
    secret.write_text(f'{{"gateway": "{GATEWAY}"}}\n')
    monkeypatch.setenv("DISALIGN_PRIOR_SOURCES_FILE", str(secret))
    assert list(Settings(**REQUIRED).prior_sources) == ["gateway"]
    monkeypatch.setenv("DISALIGN_PRIOR_SOURCES", f'{{"gateway": "{GATEWAY}"}}')
    with pytest.raises(ValueError, match="set DISALIGN_PRIOR_SOURCES or DISALIGN_PRIOR_SOURCES_FILE, not both"):
        Settings(**REQUIRED)


@pytest.mark.parametrize(("env", "sentence"), [
    ({"DISALIGN_PRIOR_SOURCES": f'{{"gateway": "{GATEWAY}"}}'},
     "error: DISALIGN_PRIOR_SOURCES only applies with DISALIGN_PRIOR=adaptive (it names the traffic that may move the "
     "adaptive prior), found DISALIGN_PRIOR=balanced."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": '{"gateway": "short"}'},
     "error: DISALIGN_PRIOR_SOURCES: the token of source 'gateway' should have at least 16 characters."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": f'{{"a": "{GATEWAY}", "b": "{GATEWAY}"}}'},
     "error: DISALIGN_PRIOR_SOURCES: source 'b' has the token of another source; each source needs its own."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": f'{{"gateway": "{TOKEN}"}}', "DISALIGN_ADMIN_TOKEN": TOKEN},
     "error: a traffic source's token is the admin token; give each its own."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": f'{{"../gw": "{GATEWAY}"}}'},
     "error: DISALIGN_PRIOR_SOURCES: source name '../gw' should be letters, digits, '.', '_' or '-' (at most 64)."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": f'{{"gw": {{"token": "{GATEWAY}", "max_share": 2}}}}'},
     "error: DISALIGN_PRIOR_SOURCES.gw.max_share: input should be less than or equal to 1, found 2."),
    ({"DISALIGN_PRIOR": "adaptive", "DISALIGN_PRIOR_SOURCES": f'{{"gw": {{"token": "{GATEWAY}", "share": 0.5}}}}'},
     "error: DISALIGN_PRIOR_SOURCES.gw.share: extra inputs are not permitted, found 0.5."),
])
def test_traffic_source_errors_are_one_sentence_and_never_show_a_token(env, sentence, capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("DISALIGN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = serve(["--model", "m.ts", "--calibration", "c"], capsys)
    assert (code, err) == (2, sentence)
    assert GATEWAY not in err and TOKEN not in err
