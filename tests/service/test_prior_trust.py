"""Who may move the served class prior (issue 21 §1), against the attack that was reproduced: honest balanced
traffic through the deployment's gateway (a trusted source), an attacker sending real class-0 rows interleaved
with it, half of all rows. Real rows of the committed CIFAR-10-LT IR50 test bank, the real model's logit
adjustment with its BCTS; honest accuracy scored as served on rows the traffic never held.

Also: replicas sharing one prior directory pool their windows and serve one published version; the admin's
commands are published for every replica; a server that cannot publish refuses to start.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from disalign.calib.artifact import priors
from disalign.calib.core import label_shift as ls
from disalign.calib.data.bank import Bank, load_bank
from disalign.calib.errors import DisalignError
from disalign.calib.estimators.baselines.prior import LogitAdjustment
from disalign.calib.estimators.methods import load_calibration
from disalign.cli.adapt import probability_calibration
from disalign.service.main import create_app
from tests.conftest import REPO
from tests.service.conftest import ADMIN_TOKEN, install, make_settings

EXAMPLES = REPO / "examples" / "cifar10lt"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GATEWAY_TOKEN = "gateway-traffic-token-0123456789"
PARTNER_TOKEN = "partner-traffic-token-9876543210"
ROWS_PER_REQUEST = 50


@pytest.fixture(scope="module")
def real_calibration(tmp_path_factory) -> Path:
    calibrator = LogitAdjustment(tau=1.0).fit(EXAMPLES / "train.h5", val=EXAMPLES / "val.h5")
    return calibrator.save(tmp_path_factory.mktemp("trust") / "calibration")


@pytest.fixture(scope="module")
def bank() -> Bank:
    return load_bank(EXAMPLES / "test.h5")


@pytest.fixture(scope="module")
def roles(bank: Bank) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint rows: honest traffic (200 per class, shuffled), evaluation (300 per class), the attacker's class-0 rows."""
    rng = np.random.default_rng(0)
    labels = bank.labels.numpy()
    honest, evaluation, attack = [], [], None
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        honest.append(rows[:200])
        evaluation.append(rows[200:500])
        attack = rows[500:] if c == 0 else attack
    return rng.permutation(np.concatenate(honest)), np.concatenate(evaluation), attack


def body(bank: Bank, rows: np.ndarray) -> dict:
    return {"rows": [{"features": bank.features[i].float().tolist(), "logits": bank.logits[i].tolist()} for i in rows.tolist()],
            "top_k": 1}


def settings(calibration: Path, prior_dir: Path, share: float = 1.0, **overrides):
    sources = {"gateway": {"token": GATEWAY_TOKEN}, "partner": {"token": PARTNER_TOKEN, "max_share": share}}
    return make_settings(calibration, prior="adaptive", prior_update_every=10, prior_sources=sources, prior_dir=prior_dir, **overrides)


def attack_run(calibration: Path, prior_dir: Path, bank: Bank, roles, attacker: dict | None, share: float = 1.0) -> tuple[float, dict, str]:
    """Honest traffic (and the attacker's, one request after each honest one), then the evaluation set sent
    without a token → (honest accuracy %, /admin/prior, /metrics)."""
    honest, evaluation, attack = roles
    with TestClient(create_app(settings(calibration, prior_dir, share))) as client:
        tracker = client.app.state.runtime.prior
        for i, start in enumerate(range(0, honest.size, ROWS_PER_REQUEST)):
            assert client.post("/calibrate", json=body(bank, honest[start:start + ROWS_PER_REQUEST]),
                               headers={"Disalign-Traffic-Token": GATEWAY_TOKEN}).status_code == 200
            if attacker is not None:
                part = np.resize(np.roll(attack, -i * ROWS_PER_REQUEST), ROWS_PER_REQUEST)
                assert client.post("/calibrate", json=body(bank, part), headers=attacker).status_code == 200
            tracker.wait_for_estimate()
        correct = 0
        for start in range(0, evaluation.size, 500):
            part = evaluation[start:start + 500]
            results = client.post("/calibrate", json=body(bank, part)).json()["results"]
            correct += int((np.array([r["top_k"][0]["index"] for r in results]) == bank.labels[part].numpy()).sum())
        return 100.0 * correct / evaluation.size, client.get("/admin/prior", headers=AUTH).json(), client.get("/metrics").text


@pytest.fixture(scope="module")
def baseline(real_calibration: Path, bank: Bank, roles, tmp_path_factory) -> tuple[float, dict, str]:
    return attack_run(real_calibration, tmp_path_factory.mktemp("baseline") / "prior", bank, roles, None)


@pytest.mark.parametrize("attacker", [{}, {"Disalign-Traffic-Token": "a-guessed-token-of-the-right-length"}],
                         ids=["no token", "wrong token"])
def test_an_unauthenticated_client_sending_half_the_rows_moves_honest_accuracy_by_under_half_a_point(
        real_calibration: Path, bank: Bank, roles, baseline, tmp_path: Path, attacker: dict):
    accuracy, status, metrics = attack_run(real_calibration, tmp_path / "prior", bank, roles, attacker)
    base_accuracy, base_status, _ = baseline
    assert base_accuracy > 70  # the honest accuracy the attack once took to 36.5 %
    assert abs(base_accuracy - accuracy) < 0.5, (base_accuracy, accuracy)
    assert status["version"] == base_status["version"] and status["prior"] == base_status["prior"]
    # its 2,000 rows, the 3,000 scored and the warm-up's image and row
    assert 'disalign_prior_rows_total{source="untrusted"} 5002.0' in metrics
    assert 'disalign_prior_rows_total{source="gateway"} 2000.0' in metrics and status["sources"] == {"gateway": 2000, "partner": 0}


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_an_authenticated_source_capped_at_its_share_moves_it_less_than_its_share_allows(
        real_calibration: Path, bank: Bank, roles, baseline, tmp_path: Path, share: float):
    accuracy, status, _ = attack_run(real_calibration, tmp_path / "prior", bank, roles, {"Disalign-Traffic-Token": PARTNER_TOKEN}, share)
    base_accuracy, base_status, _ = baseline
    # What its share allows: the prior a source holding `share` of the rows, all of class 0, moves the honest one to.
    honest_prior = np.asarray(base_status["prior"] or np.full(10, 0.1))
    allowed_prior = (1 - share) * honest_prior + share * np.eye(10)[0]
    calibrator = load_calibration(real_calibration)
    evaluation = roles[1]
    z = calibrator.predict_logits(bank.features[evaluation].float(), bank.logits[evaluation])
    aligned = ls.adjust_to_prior(z, torch.from_numpy(allowed_prior), probability_calibration(calibrator))
    allowed_accuracy = 100.0 * float((aligned.argmax(1) == bank.labels[evaluation]).double().mean())
    assert base_accuracy - accuracy < base_accuracy - allowed_accuracy, (base_accuracy, accuracy, allowed_accuracy)
    served = np.asarray(status["prior"])
    assert ls.l1_distance(torch.from_numpy(served), torch.from_numpy(honest_prior)) <= 2 * share
    published = status["published"]["rows_by_source"]
    assert published["partner"] <= share * sum(published.values()) + 1e-9  # its rows capped in what was published


# -- replicas on one prior directory -------------------------------------------------------------------------
FORWARD_10 = np.round(980 * 10 ** (-np.arange(10) / 9)).astype(int)


def shifted(bank: Bank, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = bank.labels.numpy()
    return rng.permutation(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(FORWARD_10)]))


def test_replicas_pool_their_windows_and_serve_one_published_version(real_calibration: Path, bank: Bank, tmp_path: Path):
    directory = tmp_path / "calibration"
    install(real_calibration, directory)
    rows = shifted(bank, 1)
    gateway = {"Disalign-Traffic-Token": GATEWAY_TOKEN}
    first = settings(directory, None, prior_min_rows=1000, prior_max_step=2.0)  # prior_dir None: <calibration>/prior
    with TestClient(create_app(first)) as a, TestClient(create_app(first)) as b:
        tracker_a, tracker_b = a.app.state.runtime.prior, b.app.state.runtime.prior
        assert tracker_a.store == tracker_b.store == directory / "prior" and tracker_a.replica != tracker_b.replica
        for i, start in enumerate(range(0, 1200, 50)):  # 600 rows each: neither alone reaches prior_min_rows
            client = a if i % 2 == 0 else b
            assert client.post("/calibrate", json=body(bank, rows[start:start + 50]), headers=gateway).status_code == 200
            tracker_a.wait_for_estimate()
            tracker_b.wait_for_estimate()
        estimate = tracker_b.last_estimate
        # B estimated at its 10th trusted request, from its 500 rows and the 500 A had written at its 10th: more than
        # either replica ever held (600), so both windows were pooled.
        assert estimate is not None and estimate.rows == 1000 and estimate.published
        assert tracker_b.state.version.startswith("estimate-") and tracker_a.state.version == "balanced"
        assert tracker_a.follow()  # what its watcher does every interval
        assert a.post("/calibrate", json=body(bank, rows[:1])).json()["prior_version"] == tracker_b.state.version

        # The admin's commands are the deployment's: published, and followed by every replica.
        chosen = np.linspace(1, 2, 10)
        answer = a.post("/admin/prior", headers=AUTH, json={"action": "set", "prior": chosen.tolist()}).json()
        assert answer["version"].startswith("admin-") and answer["frozen"] and tracker_b.follow()
        assert b.get("/admin/prior", headers=AUTH).json()["version"] == answer["version"]
        before = b.get("/admin/prior", headers=AUTH).json()
        for start in range(0, 1000, 50):  # frozen: trusted traffic fills the windows but publishes nothing
            assert b.post("/calibrate", json=body(bank, rows[start:start + 50]), headers=gateway).status_code == 200
            tracker_b.wait_for_estimate()
        assert b.get("/admin/prior", headers=AUTH).json()["published"] == before["published"]

        reset = b.post("/admin/prior", headers=AUTH, json={"action": "reset"}).json()
        assert reset["version"] == "balanced" and not reset["frozen"] and reset["window_rows"] == 0
        assert list((directory / "prior" / "traffic").glob("*.safetensors")) == []  # no earlier row counts again
        assert tracker_a.follow() and a.get("/admin/prior", headers=AUTH).json()["version"] == "balanced"
        assert tracker_a.epoch == tracker_b.epoch != priors.INITIAL_EPOCH
        assert a.get("/admin/prior", headers=AUTH).json()["window_rows"] == 0


def test_the_watcher_follows_a_published_prior(real_calibration: Path, tmp_path: Path):
    calibration = load_calibration(real_calibration)
    with TestClient(create_app(make_settings(real_calibration, prior="adaptive", prior_dir=tmp_path / "prior",
                                             watch_interval_s=0.1))) as client:
        version = client.app.state.runtime.calibration.version
        pointer = priors.publish_version(tmp_path / "prior", priors.PriorVersion(
            prior=[0.5] + [0.5 / 9] * 9, classes=calibration.meta_.class_names, calibration_version=version, source="adapt",
            epoch=priors.INITIAL_EPOCH, created=priors.now_iso()))
        deadline = time.monotonic() + 5
        while client.get("/admin/prior", headers=AUTH).json()["version"] == "balanced" and time.monotonic() < deadline:
            time.sleep(0.05)
        status = client.get("/admin/prior", headers=AUTH).json()
        assert status["version"].startswith("adapt-") and status["published"]["pointer"] == pointer
        assert status["window_capacity"] == 0  # no sources: it only follows
        for name, prior in (("other calibration", [0.5] + [0.5 / 9] * 9), ("balanced", None)):
            priors.publish_version(tmp_path / "prior", priors.PriorVersion(
                prior=prior, classes=calibration.meta_.class_names, source="admin", epoch=priors.INITIAL_EPOCH, created=priors.now_iso(),
                calibration_version="lws-000000000000" if name == "other calibration" else version))
            deadline = time.monotonic() + 5
            while client.get("/admin/prior", headers=AUTH).json()["version"] != "balanced" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/admin/prior", headers=AUTH).json()["version"] == "balanced", name  # not for this calibration


def test_a_server_that_cannot_publish_the_prior_refuses_to_start(real_calibration: Path, tmp_path: Path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DisalignError, match=r"the prior directory .*file/prior is not writable .*DISALIGN_PRIOR_DIR\.$"):
        with TestClient(create_app(settings(real_calibration, tmp_path / "file" / "prior"))):
            pass
