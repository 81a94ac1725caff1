"""Bounded load on a real server over loopback: 32 concurrent clients for ~10 s with hot reloads in the middle.

Every response must be 200, name one calibration version, and carry exactly the numbers that version
gives (computed offline here), so a response mixing two calibrations — or one computed with another
calibration than it names — fails. After a reload has answered, no request sent later may get the old version.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from disalign.calib.estimators.methods import load_calibration
from disalign.feature_extract.models import load_model
from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image, normalize
from disalign.service.runtime import calibration_version
from tests.service.conftest import ADMIN_TOKEN, CARD, MODEL, Artifacts, install, start_server

CLIENTS = 32
DURATION_S = 10.0
MAX_REQUESTS_PER_CLIENT = 5000
TOLERANCE = 1e-4


def expected_outputs(artifact: Path, rows: dict, images: list[Path]) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(version, /calibrate probabilities (R, K), /predict probabilities (I, K)) of one calibration."""
    calibrator = load_calibration(artifact)
    rows_p = calibrator.predict_logits(torch.tensor(rows["features"]), torch.tensor(rows["logits"])).softmax(1)
    model, prep = load_model(str(MODEL)), Preprocessing.from_card(CARD)
    batch = torch.stack([clean_view(decode_image(p), prep) for p in images])
    features, logits = model.features_and_logits(normalize(batch, prep))
    return calibration_version(calibrator), rows_p, calibrator.predict_logits(features, logits).softmax(1)


@pytest.mark.slow
def test_load_with_hot_reloads(artifacts: Artifacts, cifar_jpegs: list[Path], tmp_path: Path):
    rng = np.random.default_rng(0)
    rows = {"features": np.abs(rng.normal(size=(4, 64))).round(4).tolist(), "logits": rng.normal(size=(4, 10)).round(4).tolist()}
    images = cifar_jpegs[:8]
    expected = {}
    for artifact in (artifacts.good, artifacts.other):
        version, rows_p, images_p = expected_outputs(artifact, rows, images)
        expected[version] = (rows_p, images_p)
    version_a, version_b = list(expected)
    assert version_a != version_b

    calibration = tmp_path / "calibration"
    install(artifacts.good, calibration)
    server = start_server(calibration, tmp_path / "server.log", "--max-batch", "32")
    failures: list[str] = []
    seen: dict[str, int] = {version_a: 0, version_b: 0}
    counts = {"/calibrate": 0, "/predict": 0}
    reloads: list[tuple[float, float, str]] = []  # (sent, answered, new version), monotonic seconds
    answers: list[tuple[float, float, str]] = []  # (sent, answered, version) of every request
    payload = {"rows": [{"features": f, "logits": z} for f, z in zip(rows["features"], rows["logits"], strict=True)], "top_k": 10}
    blobs = [p.read_bytes() for p in images]

    def check(route: str, body: dict, sent_at: float, picked: list[int]) -> None:
        version = body["calibration_version"]
        if version not in expected:
            failures.append(f"{route}: unknown version {version}")
            return
        seen[version] += 1
        counts[route] += 1
        answers.append((sent_at, time.monotonic(), version))
        rows_p, images_p = expected[version]
        if route == "/calibrate":
            got = torch.tensor([r["probabilities"] for r in body["results"]])
            want = rows_p
        else:
            got = torch.zeros(len(picked), 10)
            for i, pred in enumerate(body["predictions"]):
                for t in pred["top_k"]:
                    got[i, t["index"]] = t["probability"]
            want = images_p[picked]
        if not torch.allclose(got, want, atol=TOLERANCE):
            failures.append(f"{route}: numbers do not match version {version} (max diff {float((got - want).abs().max()):.2e})")

    async def client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            sent_at = time.monotonic()
            try:
                if (i + n) % 2:
                    r = await http.post("/calibrate", json=payload)
                    picked: list[int] = []
                else:
                    picked = [(i + n) % len(blobs), (i + n + 3) % len(blobs)]
                    r = await http.post("/predict", params={"top_k": 10},
                                        files=[("file", (f"{j}.jpg", blobs[j], "image/jpeg")) for j in picked])
            except httpx.HTTPError as exc:
                failures.append(f"client {i}: {type(exc).__name__}: {exc}")
                continue
            if r.status_code != 200:
                failures.append(f"client {i}: {r.status_code} {r.text[:200]}")
                continue
            check(r.request.url.path, r.json(), sent_at, picked)

    async def reloader(http: httpx.AsyncClient, start: float) -> None:
        for at, source in ((3.0, artifacts.other), (6.5, artifacts.good)):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            await asyncio.to_thread(install, source, calibration)
            sent = time.monotonic()
            r = await http.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert r.status_code == 200 and r.json()["changed"], r.text
            reloads.append((sent, time.monotonic(), r.json()["calibration_version"]))

    async def main() -> None:
        limits = httpx.Limits(max_connections=CLIENTS + 1, max_keepalive_connections=CLIENTS + 1)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0) as http:
            start = time.monotonic()
            await asyncio.gather(reloader(http, start), *(client(i, http, start + DURATION_S) for i in range(CLIENTS)))

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=DURATION_S + 60))
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
    total = sum(counts.values())
    print(f"\n{total} requests in {DURATION_S:.0f} s ({counts}), versions {seen}, reloads {[v for *_, v in reloads]}")
    assert failures == [], failures[:10]
    assert len(reloads) == 2 and seen[version_a] > 0 and seen[version_b] > 0
    # Each version may only have served while it could have been current: from the moment its reload was
    # sent (or the start) until the next reload answered (or the end).
    periods = [(-np.inf, reloads[0][1], version_a), (reloads[0][0], reloads[1][1], version_b), (reloads[1][0], np.inf, version_a)]
    stale = [(s, e, v) for s, e, v in answers if not any(v == pv and s <= pe and e >= ps for ps, pe, pv in periods)]
    assert stale == [], f"{len(stale)} answers named a calibration that was not current while they ran: {stale[:5]}"
    assert counts["/calibrate"] > 0 and counts["/predict"] > 0
