"""Several replicas on one calibration directory: after a publish, all of them serve the new version within
5 s (each watches ``DIR/current``), and no request fails meanwhile. Three real server processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ADMIN_TOKEN, Artifacts, install, start_server

ROW = {"features": [0.5] * 64, "logits": [float(i) for i in range(10)]}
REPLICAS = 3


@pytest.mark.slow
def test_three_replicas_follow_a_publish_within_5_s_without_a_failed_request(artifacts: Artifacts, tmp_path: Path):
    directory = tmp_path / "calibration"
    install(artifacts.good, directory)
    with ThreadPoolExecutor(REPLICAS) as pool:  # the default watch interval (1 s): what a deployment gets
        starts = [pool.submit(start_server, directory, tmp_path / f"replica{i}.log", env={"DISALIGN_WATCH_INTERVAL_S": "1"},
                              deadline_s=240) for i in range(REPLICAS)]
    if any(start.exception() for start in starts):
        for start in starts:
            if not start.exception():
                start.result().stop()
        raise next(start.exception() for start in starts if start.exception())
    servers = [start.result() for start in starts]
    answers: list[list[tuple[float, str]]] = [[] for _ in servers]  # per replica: (time answered, version)
    failures: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=servers[i].url, timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post("/calibrate", json={"rows": [ROW]})
                except httpx.HTTPError as exc:
                    failures.append(f"replica {i}: {exc!r}")
                    continue
                if r.status_code != 200:
                    failures.append(f"replica {i}: {r.status_code} {r.text}")
                else:
                    answers[i].append((time.monotonic(), r.json()["calibration_version"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(REPLICAS)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        old = {versions[-1][1] for versions in answers}
        assert len(old) == 1, old
        published = time.monotonic()
        install(artifacts.other, directory)
        switched = {}
        while len(switched) < REPLICAS and time.monotonic() - published < 10:
            for i, server in enumerate(servers):
                if i not in switched and httpx.get(f"{server.url}/v2/models/disalign", timeout=5).json()["calibration_version"] not in old:
                    switched[i] = time.monotonic() - published
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        codes = [server.stop() for server in servers]
    print(f"\nreplicas switched after {sorted(round(s, 2) for s in switched.values())} s; "
          f"{sum(map(len, answers))} requests, {len(failures)} failed")
    assert failures == []
    assert len(switched) == REPLICAS and max(switched.values()) < 5.0, switched
    for versions in answers:  # each replica: the old version, then the new one, never back
        sequence = [v for _, v in versions]
        first_new = next(i for i, v in enumerate(sequence) if v not in old)
        assert set(sequence[:first_new]) == old and len(set(sequence[first_new:])) == 1
    assert codes == [0] * REPLICAS


# -- the deployment's class prior (issue 21 §1) ---------------------------------------------------------------
PRIOR_ENV = {"DISALIGN_WATCH_INTERVAL_S": "1", "DISALIGN_PRIOR": "adaptive"}


def served_prior_versions(servers) -> list[str]:
    return [httpx.post(f"{s.url}/calibrate", json={"rows": [ROW]}, timeout=10).json()["prior_version"] for s in servers]


def seconds_until_all_serve_one_new_version(servers, before: str, store: Path, limit: float = 10.0) -> tuple[float, str]:
    """Seconds from the publish (the version's ``created`` time, written just before ``current`` switches) until
    every replica answers with one new prior version."""
    from datetime import datetime

    from disalign.calib.artifact import priors

    start = time.monotonic()
    while True:
        versions = served_prior_versions(servers)
        now = time.time()
        if (len(set(versions)) == 1 and versions[0] != before) or time.monotonic() - start > limit:
            created = datetime.fromisoformat(priors.read_current(store)[1].created).timestamp()
            return now - created, ",".join(sorted(set(versions)))
        time.sleep(0.05)


@pytest.mark.slow
def test_three_replicas_serve_a_published_prior_within_5_s(tmp_path: Path):
    import numpy as np

    from disalign.calib.data.bank import load_bank, write_bank
    from disalign.calib.estimators.baselines.prior import LogitAdjustment
    from tests.conftest import REPO

    examples = REPO / "examples" / "cifar10lt"
    directory = LogitAdjustment(tau=1.0).fit(examples / "train.h5", val=examples / "val.h5").save(tmp_path / "calibration")
    bank = load_bank(examples / "test.h5")
    labels = bank.labels.numpy()
    forward = np.round(980 * 10 ** (-np.arange(10) / 9)).astype(int)
    rows = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(forward)])
    shifted = write_bank(tmp_path / "forward10.h5", bank.features[rows].numpy(), bank.logits[rows].numpy(), labels[rows],
                         class_names=bank.info.class_names, model_fingerprint=bank.info.model_fingerprint)
    with ThreadPoolExecutor(REPLICAS) as pool:
        starts = [pool.submit(start_server, directory, tmp_path / f"replica{i}.log", env=PRIOR_ENV, deadline_s=240)
                  for i in range(REPLICAS)]
    servers = [start.result() for start in starts if not start.exception()]
    try:
        assert len(servers) == REPLICAS, [start.exception() for start in starts]
        assert served_prior_versions(servers) == ["balanced"] * REPLICAS
        # offline, on logged traffic: disalign adapt --publish
        result = subprocess.run([sys.executable, "-m", "disalign", "adapt", str(shifted), "--calibration", str(directory),
                                 "--publish", "--bootstrap", "0", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0 and "published versions/" in result.stdout, result.stderr
        adapt_s, version = seconds_until_all_serve_one_new_version(servers, "balanced", directory / "prior")
        assert version.startswith("adapt-") and adapt_s < 5.0, (adapt_s, version)
        # an admin's set on one replica, for all of them
        answer = httpx.post(f"{servers[0].url}/admin/prior", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            json={"action": "set", "prior": np.linspace(2, 1, 10).tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        admin_s, admin_version = seconds_until_all_serve_one_new_version(servers, version, directory / "prior")
        assert admin_version == answer.json()["version"] and admin_s < 5.0, (admin_s, admin_version)
        print(f"\nall {REPLICAS} replicas served the prior published by adapt --publish {adapt_s:.2f} s after the publish, "
              f"an admin's set {admin_s:.2f} s after it")
    finally:
        codes = [server.stop() for server in servers]
    assert codes == [0] * REPLICAS
