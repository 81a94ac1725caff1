"""Soak of hot reloads under load: valid and corrupted calibrations swapped in every 100 ms while 32 clients
send ``/calibrate`` and ``/predict``; prints the 5xx count, the responses mixing versions and the RSS growth.

    .venv/bin/python bench/soak.py [--seconds 60] [--clients 32] [--reload-every 0.1]

The server runs in its own process (``python -m disalign serve`` with the shared CIFAR ResNet-32, on a free
loopback port); this process drives it. Artifacts: two valid DisAlign calibrations fitted for the model
and corrupted copies of them, each the defect of one reported reload bug — ``background_index`` 50 or
``"3"``, ``cosine: "no"``, ``created: null``, ``alpha[0] = 3e38``, bf16 tensors, a truncated
``parameters.safetensors``, no ``calibration.json``. Each is a complete directory made once; every
``--reload-every`` seconds the served path (a symlink) is pointed at the next one with one ``rename`` —
valid and corrupted in turn — and ``POST /admin/reload`` is called. The artifact files are found by name
anywhere under a directory, so the corruptions apply whatever layout ``Calibrator.save`` writes.

Every answer is checked against offline inference of each valid version (computed here, before the
soak): a 200 must name a valid version and carry exactly that version's numbers (1e-4). Printed:

- requests by status, and the **5xx** count (any 5xx is a failure of the server);
- **mixed**: 200s whose numbers are not those of the version they name (two calibrations in one answer,
  or an answer computed with another calibration than it names);
- **invalid version served**: 200s naming a version that is none of the valid artifacts (a corrupted
  artifact that a reload accepted);
- reloads by status, for valid and for corrupted artifacts (corrupted ones must be refused: 409/422);
- the server's resident memory after warm-up, at its peak and at the end (``/proc/<pid>/status``).

It exits 1 when any 5xx, mixed or invalid-version answer was seen, or a reload of a valid artifact failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402 — the sibling benchmark's server and fixture helpers
    CARD,
    MODEL,
    REPO,
    cifar_jpegs,
    fingerprint,
    fit_calibration,
    http_request,
    multipart,
    start_server,
    stop_server,
)

sys.path.insert(0, str(REPO))
TOKEN = "soak-admin-token-0123456789"
TOLERANCE = 1e-4


# -- artifacts ----------------------------------------------------------------------------------------
def edit_json(directory: Path, change) -> None:
    for path in directory.rglob("calibration.json"):
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))


def edit_tensors(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    for path in directory.rglob("parameters.safetensors"):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)


def truncate_tensors(directory: Path) -> None:
    for path in directory.rglob("parameters.safetensors"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_json(directory: Path) -> None:
    for path in directory.rglob("calibration.json"):
        path.unlink()


def set_alpha(tensors: dict) -> None:
    tensors["alpha"][0] = 3e38


CORRUPTIONS = {
    "background_index=50": lambda d: edit_json(d, lambda m: m.__setitem__("background_index", 50)),
    'background_index="3"': lambda d: edit_json(d, lambda m: m.__setitem__("background_index", "3")),
    'cosine="no"': lambda d: edit_json(d, lambda m: m["hyperparameters"].__setitem__("cosine", "no")),
    "created=null": lambda d: edit_json(d, lambda m: m.__setitem__("created", None)),
    "alpha[0]=3e38": lambda d: edit_tensors(d, set_alpha),
    "bf16 tensors": lambda d: edit_tensors(d, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()})),
    "truncated safetensors": truncate_tensors,
    "no calibration.json": drop_json,
}


@dataclass
class Variant:
    name: str
    path: Path
    valid: bool


def make_variants(root: Path, classes: list[str]) -> list[Variant]:
    """Two valid calibrations and, from them in turn, one corrupted copy per entry of CORRUPTIONS."""
    valid = [Variant(f"valid-{seed}", fit_calibration(root / f"valid-{seed}", root / f"bank-{seed}.h5", fingerprint(MODEL), 10, 64,
                                                      classes, seed=seed), True) for seed in (0, 1)]
    variants = list(valid)
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        target = root / f"corrupt-{i}"
        shutil.copytree(valid[i % 2].path, target, symlinks=True)
        corrupt(target)
        variants.append(Variant(name, target, False))
    return variants


def point(link: Path, target: Path) -> None:
    """Point the served path at ``target`` in one step (a new symlink renamed over the old one)."""
    staging = link.with_name(f".{link.name}.next")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    os.replace(staging, link)


# -- expected answers -----------------------------------------------------------------------------------
@dataclass
class Expected:
    rows: np.ndarray  # (R, K) /calibrate probabilities
    images: np.ndarray  # (I, K) /predict probabilities


def expected_answers(valid: list[Variant], rows: dict, blobs: list[bytes]) -> dict[str, Expected]:
    from disalign.calib.estimators.methods import load_calibration
    from disalign.feature_extract.models import load_model
    from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image, normalize
    from disalign.service.runtime import calibration_version

    model, prep = load_model(str(MODEL)), Preprocessing.from_card(CARD)
    batch = torch.stack([clean_view(decode_image(b, draft_size=prep.draft_size), prep) for b in blobs])
    with torch.inference_mode():
        features, logits = model.features_and_logits(normalize(batch, prep))
        out = {}
        for variant in valid:
            calibrator = load_calibration(variant.path)
            rows_p = calibrator.predict_logits(torch.tensor(rows["features"]), torch.tensor(rows["logits"])).softmax(1)
            images_p = calibrator.predict_logits(features, logits).softmax(1)
            out[calibration_version(calibrator)] = Expected(rows_p.numpy(), images_p.numpy())
    return out


# -- load -------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    mixed: list[str] = field(default_factory=list)
    invalid_version: Counter = field(default_factory=Counter)
    reloads: Counter = field(default_factory=Counter)  # (valid?, status)
    transport_errors: int = 0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:")), 0)
    return status, await reader.readexactly(length)


def check_answer(route: str, index: int, body: bytes, expected: dict[str, Expected], tally: Tally) -> None:
    answer = json.loads(body)
    version = answer["calibration_version"]
    tally.versions[version] += 1
    if version not in expected:
        tally.invalid_version[version] += 1
        return
    if route == "/calibrate":
        got = np.asarray([r["probabilities"] for r in answer["results"]], dtype=np.float32)
        want = expected[version].rows
    else:
        want = expected[version].images[index:index + 1]
        got = np.zeros_like(want)
        for top in answer["predictions"][0]["top_k"]:
            got[0, top["index"]] = top["probability"]
    if got.shape != want.shape or np.abs(got - want).max() > TOLERANCE:
        tally.mixed.append(f"{route} named {version}, max |diff| {np.abs(got - want).max() if got.shape == want.shape else 'shape'}")


async def client(port: int, requests: list[tuple[str, int, bytes]], offset: int, deadline: float,
                 expected: dict[str, Expected], tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        i = offset
        while time.perf_counter() < deadline:
            route, index, request = requests[i % len(requests)]
            i += 1
            try:
                writer.write(request)
                await writer.drain()
                status, body = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                tally.transport_errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            tally.statuses[(route, status)] += 1
            if status == 200:
                try:
                    check_answer(route, index, body, expected, tally)
                except (KeyError, TypeError, ValueError) as exc:  # e.g. "probability": null
                    tally.mixed.append(f"{route}: an answer that is not the expected JSON ({type(exc).__name__}: {exc})")
    finally:
        writer.close()


async def reloader(port: int, link: Path, variants: list[Variant], every: float, deadline: float, tally: Tally) -> None:
    request = http_request("POST", "/admin/reload").replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(), 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    order = [v for pair in zip(variants[:2] * len(variants), variants[2:], strict=False) for v in pair]  # valid, corrupt, valid, …
    i = 0
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            variant = order[i % len(order)]
            i += 1
            point(link, variant.path)
            try:
                writer.write(request)
                await writer.drain()
                status, _ = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):  # the server closed the connection
                tally.transport_errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            tally.reloads[(variant.valid, status)] += 1
            await asyncio.sleep(max(0.0, every - (time.perf_counter() - start)))
    finally:
        point(link, variants[0].path)
        writer.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def sample_rss(pid: int, deadline: float, peak: list[float]) -> None:
    while time.perf_counter() < deadline:
        peak[0] = max(peak[0], rss_mb(pid))
        await asyncio.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients and the reloads run")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, half /calibrate and half /predict")
    p.add_argument("--reload-every", type=float, default=0.1, help="seconds between two reloads")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the server")
    args = p.parse_args(argv)
    classes = json.loads(CARD.read_text())["classes"]
    os.environ["DISALIGN_ADMIN_TOKEN"] = TOKEN

    with tempfile.TemporaryDirectory(prefix="disalign-soak-") as tmp:
        root = Path(tmp)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.clients} clients, "
              f"a reload every {args.reload_every * 1000:.0f} ms for {args.seconds:.0f} s", flush=True)
        variants = make_variants(root, classes)
        rng = np.random.default_rng(0)
        rows = {"features": np.abs(rng.normal(size=(4, 64))).round(4).astype(np.float32).tolist(),
                "logits": rng.normal(size=(4, 10)).round(4).astype(np.float32).tolist()}
        blobs = cifar_jpegs(root, 16)
        expected = expected_answers([v for v in variants if v.valid], rows, blobs)
        requests = [("/calibrate", 0, http_request("POST", "/calibrate", json.dumps({
            "rows": [{"features": f, "logits": z} for f, z in zip(rows["features"], rows["logits"], strict=True)],
            "top_k": 10}).encode(), "application/json"))]
        requests += [("/predict", i, http_request("POST", "/predict?top_k=10", *multipart([b]))) for i, b in enumerate(blobs)]

        link = root / "calibration"
        point(link, variants[0].path)
        server_args = SimpleNamespace(torch_threads=args.torch_threads, max_batch=32, max_wait_ms=None)
        proc, port = start_server(MODEL, CARD, link, server_args, root / "server.log")
        tally, peak = Tally(), [0.0]
        try:
            start_rss = rss_mb(proc.pid)
            peak[0] = start_rss

            async def soak() -> None:
                deadline = time.perf_counter() + args.seconds
                calibrate_requests, predict_requests = requests[:1], requests[1:]
                await asyncio.gather(
                    *(client(port, calibrate_requests if c % 2 == 0 else predict_requests, c, deadline, expected, tally)
                      for c in range(args.clients)),
                    reloader(port, link, variants, args.reload_every, deadline, tally),
                    sample_rss(proc.pid, deadline, peak))

            asyncio.run(asyncio.wait_for(soak(), timeout=args.seconds + 120))
            end_rss = rss_mb(proc.pid)
        finally:
            stop_server(proc)
        log_tail = (root / "server.log").read_text().count("Traceback")

    fivexx = sum(n for (_, status), n in tally.statuses.items() if status >= 500)
    total = sum(tally.statuses.values())
    print(f"requests: {total} ({', '.join(f'{route} {status}: {n}' for (route, status), n in sorted(tally.statuses.items()))})")
    print(f"versions named: {dict(tally.versions)}")
    print(f"reloads: valid {sum(n for (v, _), n in tally.reloads.items() if v)} "
          f"{dict(sorted((s, n) for (v, s), n in tally.reloads.items() if v))}, corrupted "
          f"{sum(n for (v, _), n in tally.reloads.items() if not v)} {dict(sorted((s, n) for (v, s), n in tally.reloads.items() if not v))}")
    print(f"transport errors: {tally.transport_errors}; tracebacks in the server log: {log_tail}")
    print(f"5xx: {fivexx}")
    print(f"mixed: {len(tally.mixed)}" + (f" (first: {tally.mixed[0]})" if tally.mixed else ""))
    print(f"invalid version served: {sum(tally.invalid_version.values())}"
          + (f" ({dict(tally.invalid_version)})" if tally.invalid_version else ""))
    print(f"RSS: {start_rss:.0f} MB after warm-up, peak {peak[0]:.0f} MB, end {end_rss:.0f} MB; growth {end_rss - start_rss:+.0f} MB "
          f"(peak {peak[0] - start_rss:+.0f} MB)")
    failed_valid = sum(n for (v, s), n in tally.reloads.items() if v and s != 200)
    return 1 if fivexx or tally.mixed or tally.invalid_version or failed_valid else 0


if __name__ == "__main__":
    sys.exit(main())
