"""Several replicas on one calibration directory: after a publish, all of them serve the new version within
5 s (each watches ``DIR/current``), and no request fails meanwhile. Three real server processes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import Artifacts, install, start_server

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
