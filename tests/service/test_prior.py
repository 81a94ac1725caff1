"""The served class prior (disalign.service.prior): a prior file, the adaptive mode on real shifted traffic (rows of the
committed CIFAR-10-LT IR50 test bank), per-request prior=balanced, /admin/prior, /metrics, reload resets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.core import label_shift as ls
from disalign.calib.data.bank import Bank, load_bank
from disalign.calib.errors import InputError
from disalign.calib.estimators.baselines.prior import LogitAdjustment
from disalign.service.main import create_app
from tests.conftest import REPO
from tests.service.conftest import ADMIN_TOKEN, Artifacts, install, make_settings

EXAMPLES = REPO / "examples" / "cifar10lt"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GATEWAY_TOKEN = "gateway-traffic-token-0123456789"
GATEWAY = {"Disalign-Traffic-Token": GATEWAY_TOKEN}  # what the deployment's gateway adds to the traffic it vouches for
SOURCES = {"gateway": GATEWAY_TOKEN}
FORWARD_10 = np.round(980 * 10 ** (-np.arange(10) / 9)).astype(int)  # rows per class of a forward IR10 test set


@pytest.fixture(scope="module")
def real_calibration(tmp_path_factory) -> Path:
    """Logit adjustment (τ = 1) of the real IR50 model, with its BCTS fitted on the val bank."""
    calibrator = LogitAdjustment(tau=1.0).fit(EXAMPLES / "train.h5", val=EXAMPLES / "val.h5")
    assert calibrator.meta_.probability_calibration is not None
    return calibrator.save(tmp_path_factory.mktemp("prior") / "calibration")


@pytest.fixture(scope="module")
def test_bank() -> Bank:
    return load_bank(EXAMPLES / "test.h5")


def shifted_rows(bank: Bank, per_class: np.ndarray, seed: int) -> np.ndarray:
    """Row indices with ``per_class`` rows of each class, in random order."""
    rng = np.random.default_rng(seed)
    labels = bank.labels.numpy()
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(per_class)])
    return rng.permutation(rows)


def calibrate(client: TestClient, bank: Bank, rows: np.ndarray, query: str = "", headers: dict | None = None) -> dict:
    body = {"rows": [{"features": bank.features[i].float().tolist(), "logits": bank.logits[i].tolist()} for i in rows.tolist()]}
    response = client.post(f"/calibrate{query}", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def offline(calibration: Path, bank: Bank, rows: np.ndarray, prior: np.ndarray | None) -> torch.Tensor:
    """Probabilities (n, K) of the calibration, aligned to ``prior`` with its BCTS (None: balanced)."""
    from disalign.calib.estimators.methods import load_calibration
    from disalign.cli.adapt import probability_calibration

    calibrator = load_calibration(calibration)
    z = calibrator.predict_logits(bank.features[rows].float(), bank.logits[rows])
    if prior is None:
        return torch.softmax(z.double(), dim=1)
    return torch.softmax(ls.adjust_to_prior(z, torch.from_numpy(prior), probability_calibration(calibrator)), dim=1)


def served_probabilities(body: dict) -> torch.Tensor:
    return torch.tensor([r["probabilities"] for r in body["results"]], dtype=torch.float64)


def test_the_served_prior_is_the_calibration_cores_adjust_to_prior(real_calibration: Path):
    # The server evaluates adjust_to_prior once per prior and applies it as z / T + offset (disalign.service.prior.PriorState).
    from types import SimpleNamespace

    from disalign.calib.estimators.methods import load_calibration
    from disalign.service.prior import make_state
    from disalign.service.state import CalibrationState

    calibrator = load_calibration(real_calibration)
    without = SimpleNamespace(meta_=SimpleNamespace(probability_calibration=None))
    prior = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0, 0.0])  # zeros: floored by the core
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 5
    for source in (calibrator, without):
        fitted = source.meta_.probability_calibration
        state = make_state("file", prior, CalibrationState(source, "v"))
        expected = ls.adjust_to_prior(logits, torch.from_numpy(prior), ls.ProbabilityCalibration.from_json(fitted) if fitted else None)
        torch.testing.assert_close(state.adjust(logits).double(), expected, atol=1e-4, rtol=1e-6)


def test_balanced_by_default_names_its_prior(client: TestClient):
    body = client.post("/calibrate", json={"rows": [{"features": [0.5] * 64, "logits": [0.0] * 10}]}).json()
    assert body["prior_version"] == "balanced"
    infer = client.post("/v2/models/disalign/infer", json={"inputs": [
        {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64},
        {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}]}).json()
    assert infer["parameters"]["prior_version"] == "balanced"
    status = client.get("/admin/prior", headers=AUTH).json()
    assert status["mode"] == "balanced" and status["version"] == "balanced" and status["window_capacity"] == 0


def test_prior_file_aligns_every_route(tmp_path: Path, real_calibration: Path, test_bank: Bank, cifar_jpegs: list[Path]):
    prior = FORWARD_10 / FORWARD_10.sum()
    prior_file = tmp_path / "prior.json"
    prior_file.write_text(json.dumps({"prior": prior.tolist()}))
    rows = shifted_rows(test_bank, np.full(10, 3), seed=0)
    with TestClient(create_app(make_settings(real_calibration, prior=str(prior_file)))) as c:
        aligned = calibrate(c, test_bank, rows)
        assert aligned["prior_version"].startswith("file-")
        torch.testing.assert_close(served_probabilities(aligned), offline(real_calibration, test_bank, rows, prior), atol=1e-5, rtol=0)
        balanced = calibrate(c, test_bank, rows, "?prior=balanced")
        assert balanced["prior_version"] == "balanced"
        torch.testing.assert_close(served_probabilities(balanced), offline(real_calibration, test_bank, rows, None), atol=1e-5, rtol=0)

        image = base64.b64encode(cifar_jpegs[0].read_bytes()).decode()
        served = c.post("/predict", json={"images": [image]}).json()
        plain = c.post("/predict?prior=balanced", json={"images": [image]}).json()
        assert served["prior_version"] == aligned["prior_version"] and plain["prior_version"] == "balanced"
        assert served["predictions"][0]["top_k"] != plain["predictions"][0]["top_k"]  # the prior moves the probabilities
        logits = {}
        for parameters, expected in (({}, aligned["prior_version"]), ({"prior": "balanced"}, "balanced")):
            infer = c.post("/v2/models/disalign/infer", json={"parameters": parameters, "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).json()
            assert infer["parameters"]["prior_version"] == expected
            logits[expected] = torch.tensor(next(o["data"] for o in infer["outputs"] if o["name"] == "logits")).reshape(1, -1)
        # Images are aligned as rows are: the calibration core's adjust_to_prior on the balanced logits.
        from disalign.calib.estimators.methods import load_calibration
        from disalign.cli.adapt import probability_calibration

        adapted = ls.adjust_to_prior(logits["balanced"], torch.from_numpy(prior), probability_calibration(load_calibration(real_calibration)))
        torch.testing.assert_close(logits[aligned["prior_version"]].double(), adapted, atol=1e-4, rtol=0)
        status = c.get("/admin/prior", headers=AUTH).json()
        assert status["mode"] == "file" and status["prior"] == pytest.approx(prior.tolist())


def test_adaptive_prior_follows_shifted_traffic(tmp_path: Path, real_calibration: Path, test_bank: Bank):
    target = tmp_path / "calibration"
    install(real_calibration, target)
    settings = make_settings(target, prior="adaptive", prior_window=2000, prior_update_every=5, prior_min_rows=500,
                             prior_sources=SOURCES, prior_max_step=2.0)  # one step may go all the way: the test of estimates
    rows = shifted_rows(test_bank, FORWARD_10, seed=1)  # 4,005 rows, imbalance 10 towards the head classes
    true = torch.from_numpy(FORWARD_10 / FORWARD_10.sum())
    with TestClient(create_app(settings)) as c:
        tracker = c.app.state.runtime.prior
        versions, hits = [], []
        for start in range(0, 3000, 100):
            part = rows[start:start + 100]
            body = calibrate(c, test_bank, part, headers=GATEWAY)
            versions.append(body["prior_version"])
            hits.append(served_probabilities(body).argmax(1) == test_bank.labels[part])
            tracker.wait_for_estimate()
        assert versions[0] == "balanced" and versions[-1].startswith("estimate-")
        status = c.get("/admin/prior", headers=AUTH).json()
        assert status["mode"] == "adaptive" and status["window_rows"] == 2000 and status["estimate"]["adapt"]
        # The served prior is the published one: it moves only when an estimate beats it significantly.
        assert ls.l1_distance(torch.tensor(status["estimate"]["prior"]), true) < 0.15
        assert ls.l1_distance(torch.tensor(status["prior"]), true) < 0.2
        # Served accuracy once adapted vs the balanced calibration on the same rows.
        late = rows[1500:3000]
        served = float(torch.cat(hits[15:]).double().mean())
        balanced = float((offline(target, test_bank, late, None).argmax(1) == test_bank.labels[late]).double().mean())
        oracle = float((offline(target, test_bank, late, true.numpy()).argmax(1) == test_bank.labels[late]).double().mean())
        assert oracle - balanced > 0.015 and served - balanced > 0.6 * (oracle - balanced), (balanced, served, oracle)

        metrics = c.get("/metrics").text
        assert "disalign_prior_window_rows 2000.0" in metrics
        distance = float(metrics.split('disalign_prior_distance{reference="uniform"} ')[1].split()[0])
        assert distance == pytest.approx(ls.l1_distance(torch.tensor(status["estimate"]["prior"]), ls.uniform_prior(10)))
        assert 'disalign_prior_estimates_total{decision="publish"}' in metrics and f'version="{status["version"]}"' in metrics
        assert 'disalign_prior_rows_total{source="gateway"} 3000.0' in metrics

        frozen = c.post("/admin/prior", headers=AUTH, json={"action": "freeze"}).json()
        calibrate(c, test_bank, rows[3000:3500], headers=GATEWAY)
        tracker.wait_for_estimate()
        assert frozen["frozen"] and c.get("/admin/prior", headers=AUTH).json()["version"] == frozen["version"]

        chosen = np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum()
        assert c.post("/admin/prior", headers=AUTH, json={"action": "set", "prior": chosen.tolist()}).json()["version"].startswith("admin-")
        body = calibrate(c, test_bank, rows[:5])
        torch.testing.assert_close(served_probabilities(body), offline(target, test_bank, rows[:5], chosen), atol=1e-5, rtol=0)

        reset = c.post("/admin/prior", headers=AUTH, json={"action": "reset"}).json()
        assert reset["version"] == "balanced" and reset["window_rows"] == 0 and reset["estimate"] is None and not reset["frozen"]

        calibrate(c, test_bank, rows[:1000], headers=GATEWAY)
        tracker.wait_for_estimate()
        assert c.get("/admin/prior", headers=AUTH).json()["window_rows"] == 1000
        install(Path(str(real_calibration)), target)  # same artifact, but the reload must still start a fresh window…
        (artifact_dir(target) / "calibration.json").write_text((artifact_dir(target) / "calibration.json").read_text().replace('"created": "', '"created": "x'))
        assert c.post("/admin/reload", headers=AUTH).json()["changed"]  # …of a new version
        assert c.get("/admin/prior", headers=AUTH).json()["window_rows"] == 0
        assert calibrate(c, test_bank, rows[:10], headers=GATEWAY)["prior_version"] == "balanced"
        after = c.get("/admin/prior", headers=AUTH).json()
        assert after["window_rows"] == 10 and after["estimate"] is None


def test_adaptive_prior_stays_balanced_on_balanced_traffic(real_calibration: Path, test_bank: Bank, tmp_path: Path):
    settings = make_settings(real_calibration, prior="adaptive", prior_window=3000, prior_update_every=3, prior_min_rows=3000,
                             prior_sources=SOURCES, prior_dir=tmp_path / "prior")
    rows = shifted_rows(test_bank, np.full(10, 300), seed=2)
    with TestClient(create_app(settings)) as c:
        for start in range(0, 3000, 500):
            calibrate(c, test_bank, rows[start:start + 500], headers=GATEWAY)
        c.app.state.runtime.prior.wait_for_estimate()
        status = c.get("/admin/prior", headers=AUTH).json()
        assert status["estimate"] is not None and not status["estimate"]["adapt"] and status["version"] == "balanced"
        assert calibrate(c, test_bank, rows[:5])["prior_version"] == "balanced"


def test_bad_prior_settings_and_requests_are_one_sentence(tmp_path: Path, artifacts: Artifacts, client: TestClient):
    missing = create_app(make_settings(artifacts.good, prior=str(tmp_path / "nope.json")))
    with pytest.raises(InputError, match="prior file .*nope.json does not exist"), TestClient(missing):
        pass
    (tmp_path / "short.json").write_text("[0.5, 0.5]")
    with pytest.raises(InputError, match="should have 10 values"), TestClient(create_app(make_settings(artifacts.good, prior=str(tmp_path / "short.json")))):
        pass

    row = {"rows": [{"features": [0.5] * 64, "logits": [0.0] * 10}]}
    response = client.post("/calibrate?prior=skewed", json=row)
    assert response.status_code == 422 and "prior should be one of served, balanced, found 'skewed'." in response.json()["error"]
    infer = client.post("/v2/models/disalign/infer", json={"parameters": {"prior": 3}, "inputs": [
        {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64},
        {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}]})
    assert infer.status_code == 400 and "prior should be one of" in infer.json()["error"]  # v2 answers 400 for bad input
    assert client.post("/predict?prior=skewed", json={"images": ["x"]}).status_code == 422

    assert client.post("/admin/prior", json={"action": "reset"}).status_code == 401
    wrong = client.post("/admin/prior", headers=AUTH, json={"action": "set", "prior": [1.0, 2.0]})
    assert wrong.status_code == 422 and "prior should have 10 values" in wrong.json()["error"]
    assert client.post("/admin/prior", headers=AUTH, json={"action": "set"}).status_code == 422
    assert client.post("/admin/prior", headers=AUTH, json={"action": "explode"}).status_code == 422
