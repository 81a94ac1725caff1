"""Reloads that cannot half-happen, the directory watcher, and the preprocessing that comes with a calibration.

A reload or a start-up on an artifact that fails any check (typed metadata, dtypes, the canary, K/d/
fingerprint, preprocessing) changes nothing: the old calibration keeps serving, and ``/metrics`` and the
``/v2`` metadata keep naming it. The watcher picks up a newly published version by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from disalign.calib.artifact.publish import METADATA_FILE, PARAMETERS_FILE, artifact_dir, publish
from disalign.calib.data.bank import load_bank
from disalign.calib.errors import DisalignError
from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import load_calibration
from disalign.cli import main
from disalign.feature_extract.preprocess import Preprocessing
from disalign.service.main import create_app
from tests.service.conftest import (
    ADMIN_TOKEN,
    CARD,
    MODEL,
    REPO,
    Artifacts,
    free_port,
    make_settings,
    server_command,
    start_server,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROW = {"features": [0.5] * 64, "logits": [float(i) for i in range(10)]}
CIFAR_TRAIN_BANK = REPO / "examples" / "cifar10lt" / "train.h5"


def publish_changed(source: Path, target: Path, *, meta: Callable[[dict], None] | None = None,
                    params: Callable[[dict], None] | None = None) -> None:
    """Publish the artifact of ``source`` in ``target`` with ``meta(dict)`` / ``params(tensors)`` applied."""
    files = artifact_dir(source)
    raw = json.loads((files / METADATA_FILE).read_text())
    tensors = load_tensors((files / PARAMETERS_FILE).read_bytes())
    if meta:
        meta(raw)
    if params:
        params(tensors)
    publish(target, {METADATA_FILE: json.dumps(raw).encode(), PARAMETERS_FILE: save_tensors(tensors)})


def alpha_huge(tensors):
    tensors["alpha"] = tensors["alpha"].clone()
    tensors["alpha"][0] = 3e38


def served(client: TestClient, jpeg: Path) -> dict:
    """What the app serves now, through every route that names the calibration."""
    calibrated = client.post("/calibrate", json={"rows": [ROW]})
    predicted = client.post("/predict", files=[("file", (jpeg.name, jpeg.read_bytes(), "image/jpeg"))])
    metadata = client.get("/v2/models/disalign")
    assert (calibrated.status_code, predicted.status_code, metadata.status_code) == (200, 200, 200), (calibrated.text, predicted.text)
    info = [line for line in client.get("/metrics").text.splitlines() if line.startswith("disalign_calibration_info{")]
    return {"calibrate": calibrated.json(), "predict": predicted.json(), "version": metadata.json()["calibration_version"],
            "metrics": info}


def reload_count(client: TestClient, outcome: str) -> float:
    prefix = f'disalign_calibration_reloads_total{{outcome="{outcome}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


# -- a reload swaps last, and only what passed every check ---------------------------------------------
@pytest.mark.parametrize(("meta", "params", "match"), [
    ({"background_index": 50}, None, "'background_index' should be in 0..9 or null, found 50."),
    ({"background_index": "3"}, None, "'background_index' should be a valid integer, found '3'."),
    ({"created": None}, None, "'created' should be a valid string, found None."),
    ({"hyperparameters": "cosine-no"}, None, "hyperparameter 'cosine' should be bool, found 'no'."),
    (None, lambda t: t.update(alpha=t["alpha"].to(torch.bfloat16)), "parameter 'alpha' has dtype bfloat16"),
    (None, lambda t: t.update(alpha=t["alpha"].to(torch.complex64)), "parameter 'alpha' has dtype complex64"),
    (None, alpha_huge, "gives NaN, inf or unnormalised probabilities on test rows"),
    # valid floats that overflow serving's z / T + b + log π: once accepted, then a 422 on every answer with a prior
    ({"probability_calibration": {"temperature": 1e-300, "bias": [0.0] * 10}}, None,
     "probability_calibration.temperature should be a number in [0.0001, 10000], found 1e-300."),
    ({"probability_calibration": {"temperature": 1.0, "bias": [1e300] * 10}}, None,
     "probability_calibration.bias should be 10 finite numbers within ±1000"),
    ({"target_prior": [1e308] * 10}, None, "target_prior should be 10 finite numbers >= 0 with a positive, finite sum"),
    ({"report": {"deep": json.loads("[" * 40 + "]" * 40)}}, None,
     "calibration.json is nested deeper than 32 levels (JSON arrays and objects)."),
])
def test_a_reload_that_fails_any_check_changes_nothing(fresh_client: TestClient, calibration_dir: Path, artifacts: Artifacts,
                                                      cifar_jpegs: list[Path], meta, params, match):
    def change(raw):
        if meta == {"hyperparameters": "cosine-no"}:
            raw["hyperparameters"]["cosine"] = "no"
        else:
            raw.update(meta)

    before = served(fresh_client, cifar_jpegs[0])
    publish_changed(artifacts.other, calibration_dir, meta=change if meta else None, params=params)
    r = fresh_client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 422 and match in r.json()["error"], r.text
    assert served(fresh_client, cifar_jpegs[0]) == before  # /calibrate, /predict, /v2 metadata and /metrics: all the old one
    assert reload_count(fresh_client, "unreadable") == 1 and reload_count(fresh_client, "ok") == 0


def test_a_reload_of_a_hundred_thousand_nested_brackets_is_one_sentence(fresh_client: TestClient, calibration_dir: Path,
                                                                         artifacts: Artifacts):
    version = artifact_dir(calibration_dir)
    publish_changed(artifacts.other, calibration_dir)
    nested = "[" * 100_000 + "]" * 100_000
    (artifact_dir(calibration_dir) / METADATA_FILE).write_text('{"report": ' + nested + "}")
    r = fresh_client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 422 and r.json()["error"].endswith("calibration.json is nested deeper than 32 levels (JSON arrays and objects)."), r.text
    assert artifact_dir(calibration_dir) != version


def fifo_version(source: Path, target: Path, name: str) -> Path:
    """Publish ``source`` in ``target``, then make its ``name`` a FIFO that nothing writes to."""
    publish_changed(source, target)
    version = artifact_dir(target)
    (version / name).unlink()
    os.mkfifo(version / name)
    return version


@pytest.mark.parametrize("name", [METADATA_FILE, PARAMETERS_FILE])
def test_a_fifo_in_a_version_is_refused_at_once_and_a_later_version_is_served(fresh_client: TestClient, calibration_dir: Path,
                                                                             artifacts: Artifacts, cifar_jpegs, name: str):
    before = served(fresh_client, cifar_jpegs[0])
    fifo_version(artifacts.other, calibration_dir, name)
    start = time.monotonic()
    r = fresh_client.post("/admin/reload", headers=AUTH)
    assert time.monotonic() - start < 10 and r.status_code == 422, r.text
    assert r.json()["error"].endswith(f"{name} should be a regular file, found a FIFO."), r.text
    assert served(fresh_client, cifar_jpegs[0]) == before
    publish_changed(artifacts.other, calibration_dir)  # the next good version reloads
    r = fresh_client.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["changed"], r.text


def test_the_watcher_skips_a_fifo_version_and_serves_the_next(calibration_dir: Path, artifacts: Artifacts, cifar_jpegs):
    with TestClient(create_app(make_settings(calibration_dir, watch_interval_s=0.1))) as client:
        first = served(client, cifar_jpegs[0])["version"]
        fifo_version(artifacts.other, calibration_dir, METADATA_FILE)
        time.sleep(1.0)
        assert served(client, cifar_jpegs[0])["version"] == first and reload_count(client, "unreadable") == 1
        publish_changed(artifacts.other, calibration_dir)
        wait_for_version(client, lambda v: v != first, 5.0)


def test_a_reload_slower_than_its_timeout_is_abandoned_and_the_next_one_served(calibration_dir: Path, artifacts: Artifacts,
                                                                              cifar_jpegs):
    # A real read and check of the calibration (tensors, canary) takes longer than a microsecond: it times out.
    with TestClient(create_app(make_settings(calibration_dir, reload_timeout_s=1e-6))) as client:
        before = served(client, cifar_jpegs[0])
        publish_changed(artifacts.other, calibration_dir)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 503 and "took longer than 1e-06 s (DISALIGN_RELOAD_TIMEOUT_S); still serving" in r.json()["error"], r.text
        time.sleep(0.5)  # the abandoned read finishes meanwhile; its result is dropped
        assert served(client, cifar_jpegs[0]) == before and reload_count(client, "timeout") == 1


# -- the watcher: replicas pick up a published version by themselves -------------------------------------
def test_the_watcher_serves_a_new_version_and_skips_a_broken_one(calibration_dir: Path, artifacts: Artifacts, cifar_jpegs):
    with TestClient(create_app(make_settings(calibration_dir, watch_interval_s=0.1))) as client:
        first = served(client, cifar_jpegs[0])["version"]
        publish_changed(artifacts.other, calibration_dir)
        second = wait_for_version(client, lambda v: v != first, 5.0)
        assert reload_count(client, "ok") == 1
        publish_changed(artifacts.good, calibration_dir, meta=lambda raw: raw.update(background_index=50))
        time.sleep(1.0)  # ten polls: one failed reload, not ten
        assert served(client, cifar_jpegs[0])["version"] == second
        assert reload_count(client, "unreadable") == 1 and reload_count(client, "ok") == 1
        publish_changed(artifacts.good, calibration_dir)
        assert wait_for_version(client, lambda v: v == first, 5.0) == first


def wait_for_version(client: TestClient, wanted: Callable[[str], bool], seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while True:
        version = client.get("/v2/models/disalign").json()["calibration_version"]
        if wanted(version) or time.monotonic() > deadline:
            assert wanted(version), f"still serving {version} after {seconds} s"
            return version
        time.sleep(0.05)


# -- preprocessing travels with the calibration --------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_calibration(tmp_path_factory) -> Path:
    """DisAlign fitted on the committed CIFAR-10-LT training bank, which records its preprocessing (32 px, CIFAR mean/std)."""
    directory = tmp_path_factory.mktemp("cifar") / "calibration"
    DisAlign(rho=1.0, epochs=1).fit(CIFAR_TRAIN_BANK).save(directory)
    return directory


def test_without_a_card_the_calibrations_preprocessing_is_served(cifar_calibration: Path):
    with TestClient(create_app(make_settings(cifar_calibration, card=None))) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.app.state.runtime.preprocessing == Preprocessing.from_card(CARD)


def test_a_card_or_a_name_that_disagrees_with_the_calibration_refuses_to_start(cifar_calibration: Path, artifacts: Artifacts, tmp_path):
    card = json.loads(CARD.read_text())
    card["input"]["size"] = [224, 224]
    (tmp_path / "card.json").write_text(json.dumps(card))
    refusals = [
        (make_settings(cifar_calibration, card=tmp_path / "card.json"),
         "has input.size [224, 224] but the calibration's banks were extracted with crop [32, 32]"),
        (make_settings(cifar_calibration, card=None, preprocessing="imagenet"),
         "the --preprocessing imagenet has resize 256 but the calibration's banks were extracted with resize none"),
        (make_settings(artifacts.good, card=None),
         "the calibration does not record the preprocessing of its banks, so the server cannot know how to prepare "
         "images: pass --card (DISALIGN_CARD) or --preprocessing imagenet (DISALIGN_PREPROCESSING)."),
    ]
    for settings, sentence in refusals:
        with pytest.raises(DisalignError) as caught, TestClient(create_app(settings)):
            pass
        assert sentence in str(caught.value)
    with TestClient(create_app(make_settings(artifacts.good, card=None, preprocessing="imagenet"))) as client:  # explicit: allowed
        assert client.app.state.runtime.preprocessing == Preprocessing.imagenet()


def test_a_reload_with_another_preprocessing_is_refused(cifar_calibration: Path, tmp_path):
    target = tmp_path / "calibration"
    publish_changed(cifar_calibration, target)
    with TestClient(create_app(make_settings(target, card=None))) as client:
        before = client.get("/v2/models/disalign").json()["calibration_version"]
        publish_changed(cifar_calibration, target, meta=lambda raw: raw["preprocessing"].update(crop=[224, 224]))
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409 and "served preprocessing has crop [32, 32] but the calibration's banks were extracted with crop [224, 224]" in r.json()["error"]
        assert client.get("/v2/models/disalign").json()["calibration_version"] == before


# -- start-up on an invalid artifact: one line, no traceback ----------------------------------------------
def test_start_up_on_an_invalid_artifact_is_one_sentence(artifacts: Artifacts, tmp_path):
    publish_changed(artifacts.good, tmp_path / "bad", meta=lambda raw: raw.update(background_index=50))
    result = subprocess.run(server_command(tmp_path / "bad", "--port", str(free_port()), entry="disalign"), cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "refusing to start:" in result.stderr and "'background_index' should be in 0..9 or null, found 50." in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_without_a_card_answers_as_extract_and_predict_proba(cifar_calibration: Path, cifar_jpegs: list[Path], tmp_path):
    """The same JPEGs through `disalign extract` + `DisAlign.predict_proba` and through `disalign serve` without
    --card: the same top-1 and probabilities (the server takes the 32 px CIFAR preprocessing from the calibration)."""
    (tmp_path / "list.txt").write_text("".join(f"{p.name}\n" for p in cifar_jpegs))
    assert main(["extract", "--model", str(MODEL), "--card", str(CARD), "--root", str(cifar_jpegs[0].parent),
                 "--list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "jpegs.h5"), "--feature-dtype", "float32",
                 "--workers", "0", "--quiet"]) == 0
    bank = load_bank(tmp_path / "jpegs.h5")
    order = bank.sample_index.argsort()
    offline = load_calibration(cifar_calibration).predict_proba(bank.features[order].float(), bank.logits[order])  # (20, 10)

    server = start_server(cifar_calibration, tmp_path / "server.log", entry="disalign", card=None)
    try:
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in cifar_jpegs]
        r = httpx.post(f"{server.url}/predict?top_k=10", files=files, timeout=60)
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]
    assert r.status_code == 200, r.text
    online = torch.zeros_like(offline)
    for i, prediction in enumerate(r.json()["predictions"]):
        for entry in prediction["top_k"]:
            online[i, entry["index"]] = entry["probability"]
    assert torch.equal(online.argmax(1), offline.argmax(1))
    torch.testing.assert_close(online, offline, atol=1e-4, rtol=0)
    assert (offline.argmax(1) == torch.arange(10).repeat_interleave(2)).float().mean() > 0.5  # real predictions, not noise
