"""The deployment's published prior (disalign.calib.artifact.priors): versions published with the calibration's
pointer and read strictly, every replica's traffic windows pooled only when they belong, one process at a time
under the lock (another real process holds it here), and a calibration directory that carries a prior."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from disalign.calib.artifact import priors
from disalign.calib.artifact.publish import check_publish_target
from disalign.calib.errors import ArtifactError

CLASSES = ["a", "b", "c"]


def version(**changes) -> priors.PriorVersion:
    base = priors.PriorVersion(prior=[0.5, 0.3, 0.2], classes=CLASSES, calibration_version="lws-0123456789ab", source="estimate",
                               epoch=priors.INITIAL_EPOCH, created=priors.now_iso(), rows=100, rows_by_source={"gateway": 100})
    return replace(base, **changes)


def test_a_published_version_is_what_every_reader_gets(tmp_path: Path):
    store = tmp_path / "prior"
    assert priors.read_current(store) is None and priors.pointer(store) is None
    first = priors.publish_version(store, version())
    assert priors.pointer(store) == first and priors.read_current(store) == (first, version(created=priors.read_current(store)[1].created))
    second = priors.publish_version(store, version(prior=None, source="admin"))
    assert second != first and priors.read_current(store)[1].prior is None
    raw = json.loads((store / "published" / second / "prior.json").read_text())
    assert raw["classes"] == CLASSES and raw["format_version"] == 1  # also a prior file, when not balanced
    for _ in range(12):
        priors.publish_version(store, version())
    assert len(os.listdir(store / "published" / "versions")) == priors.KEEP_VERSIONS


@pytest.mark.parametrize(("text", "match"), [
    ('{"prior": [0.5, 0.5, 0.5]', "is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, r"is nested deeper than 32 levels"),
    ("[1, 2]", "should hold a JSON object, found list"),
    (None, r"unknown key 'extra'"),
    ({"prior": [0.9, 0.9, 0.9]}, r"'prior' should be 3 finite numbers >= 0 summing to 1"),
    ({"prior": [0.5, 0.5]}, r"'prior' should have one value per class \(3\), found 2"),
    ({"rows": "100"}, r"'rows' should be a valid integer, found '100'"),
    ({"frozen": "no"}, r"'frozen' should be a valid boolean, found 'no'"),
    ({"source": "stranger"}, r"'source' should be 'estimate', 'adapt' or 'admin', found 'stranger'"),
])
def test_a_version_that_is_not_one_is_refused_with_one_sentence(tmp_path: Path, text, match):
    store = tmp_path / "prior"
    pointer = priors.publish_version(store, version())
    path = store / "published" / pointer / "prior.json"
    raw = json.loads(path.read_text())
    if text is None:
        raw["extra"] = 1
        text = json.dumps(raw)
    elif isinstance(text, dict):
        text = json.dumps({**raw, **text})
    path.write_text(text)
    with pytest.raises(ArtifactError, match=match):
        priors.read_current(store)


def test_what_a_reader_would_refuse_is_never_published(tmp_path: Path):
    with pytest.raises(ArtifactError, match="summing to 1"):
        priors.publish_version(tmp_path / "prior", version(prior=[2.0, 0.0, 0.0]))
    assert priors.pointer(tmp_path / "prior") is None


def test_a_fifo_as_prior_json_is_refused_without_waiting(tmp_path: Path):
    store = tmp_path / "prior"
    pointer = priors.publish_version(store, version())
    path = store / "published" / pointer / "prior.json"
    path.unlink()
    os.mkfifo(path)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ArtifactError, priors.read_current, store)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "should be a regular file, found a FIFO" in str(outcome[0].value)


def test_traffic_is_pooled_by_source_only_for_its_epoch_and_calibration(tmp_path: Path):
    store = tmp_path / "prior"
    rows = np.full((4, 3), 1 / 3, np.float32)
    common = {"epoch": "e1", "calibration_version": "lws-0123456789ab"}
    priors.write_traffic(store, "r1", windows={"gateway": rows, "partner": rows[:1]}, **common)
    priors.write_traffic(store, "r2", windows={"gateway": rows[:2]}, **common)
    priors.write_traffic(store, "r3", windows={"gateway": rows}, epoch="e0", calibration_version="lws-0123456789ab")  # before a reset
    priors.write_traffic(store, "r4", windows={"gateway": rows}, epoch="e1", calibration_version="lws-ffffffffffff")  # another calibration
    priors.write_traffic(store, "r5", windows={"gateway": rows}, **common)
    old = time.time() - 3600
    os.utime(store / "traffic" / "r5.safetensors", (old, old))  # a replica gone an hour ago
    (store / "traffic" / "junk.safetensors").write_bytes(b"not safetensors")
    pooled, skipped = priors.read_traffic(store, num_classes=3, max_age_s=600, **common)
    assert {name: [p.shape[0] for p in parts] for name, parts in pooled.items()} == {"gateway": [4, 2], "partner": [1]}
    assert len(skipped) == 1 and "junk.safetensors is not a readable safetensors file" in skipped[0]
    with pytest.raises(ArtifactError, match="replica name should match"):
        priors.write_traffic(store, "../escape", windows={}, **common)
    priors.remove_traffic(store, "r1")
    priors.clear_traffic(store)
    assert priors.read_traffic(store, num_classes=3, max_age_s=600, **common)[0] == {}


def test_one_process_at_a_time_holds_the_lock(tmp_path: Path):
    store = tmp_path / "prior"
    store.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from disalign.calib.artifact import priors\n"
        f"with priors.estimate_lock({str(store)!r}) as held:\n"
        "    print(held, flush=True)\n"
        "    time.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        start = time.monotonic()
        with priors.estimate_lock(store, wait_s=0.5) as held:
            assert held is False and 0.4 < time.monotonic() - start < 2.5
        with priors.estimate_lock(store, wait_s=10) as held:  # released when the other process ends its block
            assert held is True
    finally:
        holder.kill()
        holder.communicate()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from disalign.calib.artifact import priors\n"
        f"with priors.estimate_lock({str(store)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # a killed holder releases it: no stale lock
    holder.communicate()
    with priors.estimate_lock(store) as held:
        assert held


def test_a_calibration_directory_with_a_prior_is_still_a_calibration_directory(tmp_path: Path):
    calibration = tmp_path / "calibration"
    (calibration / "versions").mkdir(parents=True)
    priors.publish_version(priors.prior_dir(calibration), version())
    check_publish_target(calibration)  # `fit --out` may publish a new calibration next to its prior
    assert priors.prior_dir(calibration, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"the prior directory .*file/prior is not writable"):
        priors.check_writable(tmp_path / "file" / "prior")
