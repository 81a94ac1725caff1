"""Load benchmark of the REST server on loopback: requests/s and latency of the row routes and /predict.

    .venv/bin/python bench/serve_load.py [--seconds 8] [--clients 16] [--predict-clients 32] [--torch-threads N]
                                         [--load-generator python|wrk] [--no-predict]

The server runs in its own process (``python -m disalign serve`` on a free 127.0.0.1 port). The load generator
is this process (``--load-generator python``: asyncio workers, one keep-alive HTTP/1.1 connection each,
sending pre-built requests and timing each answer) or, for the row phases, ``wrk`` (C, one thread;
``apt-get install wrk``) with a Lua script that sends the same request bytes and reports every latency.
Every phase is bounded in time (``--seconds``) and in requests per worker.

1. Row routes with K = 1000, d = ``--feature-dim`` (2048): a synthetic TorchScript model and a DisAlign
   calibration fitted for it on a small synthetic long-tailed bank. Against the same server, in each
   round: ``GET /v2/health/live`` (the trivial route), ``/calibrate`` (JSON, one row per request), and
   ``/v2/models/{name}/infer`` with binary tensors (FP32 features and logits after the JSON header,
   probabilities back as binary data; 1 and 64 rows per request).
   Targets: /calibrate and v2-binary (1 row) ≥ 0.5 × the trivial route's requests/s, with p99 ≤ 20 ms,
   at ``--clients``; v2-binary rows/s at 64 rows per request ≥ 20 × its requests/s at 1 row.
2. ``/predict`` with the shared CIFAR ResNet-32 and real CIFAR JPEGs, one image per request (and, for
   reference, 8 per request). Offline baseline: the same model in this process, decode + preprocess +
   forward in batches of ``--max-batch``, with the same number of torch threads.
   Target: /predict images/s ≥ 0.6 × offline images/s.

Each compared group alternates over ``--rounds`` short rounds (trivial, /calibrate, v2-binary, trivial, …;
offline, /predict, …): on a shared virtual machine the speed drifts by ±30 % within a minute, and a ratio
must compare like with like. The per-round ratios are printed beside the pooled ones.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO.parent / "shared"))
MODEL = SHARED / "models" / "cifar10lt-ir50-resnet32.ts"
CARD = SHARED / "models" / "cifar10lt-ir50-resnet32.json"
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
MAX_REQUESTS_PER_WORKER = 200_000


# -- load generator ---------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    name: str
    clients: int
    seconds: float
    ok: int
    failed: int
    latencies: list[float]
    items_per_request: int = 1
    unit: str = "images"
    generator: str = "python"

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def line(self) -> str:
        per = f", {self.rps * self.items_per_request:8.1f} {self.unit}/s" if self.items_per_request > 1 or "predict" in self.name else ""
        return (f"{self.name:<40} clients={self.clients:<3} {self.rps:8.1f} req/s{per}  p50={self.pct(50):6.2f} ms  "
                f"p99={self.pct(99):6.2f} ms  ok={self.ok} failed={self.failed}  [{self.generator}]")


def http_request(method: str, path: str, body: bytes = b"", content_type: str | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = b""
    for i, data in enumerate(files):
        parts += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\"\r\n"
                  f"Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def _worker(port: int, requests: list[bytes], offset: int, deadline: float, result: PhaseResult) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(MAX_REQUESTS_PER_WORKER):
            if time.perf_counter() >= deadline:
                break
            start = time.perf_counter()
            writer.write(requests[(offset + i) % len(requests)])
            await writer.drain()
            status = await _read_response(reader)
            if status == 200:
                result.ok += 1
                result.latencies.append(time.perf_counter() - start)
            else:
                result.failed += 1
    finally:
        writer.close()


def run_phase(name: str, port: int, requests: list[bytes], clients: int, seconds: float, items: int = 1,
              warmup: float = 1.0) -> PhaseResult:
    async def main() -> PhaseResult:
        warm = PhaseResult(name, clients, warmup, 0, 0, [])
        await asyncio.gather(*(_worker(port, requests, i, time.perf_counter() + warmup, warm) for i in range(clients)))
        result = PhaseResult(name, clients, seconds, 0, 0, [], items)
        start = time.perf_counter()
        await asyncio.gather(*(_worker(port, requests, i * 7, start + seconds, result) for i in range(clients)))
        result.seconds = time.perf_counter() - start
        return result

    return asyncio.run(asyncio.wait_for(main(), timeout=seconds + warmup + 120))


@dataclass
class Load:
    """One kind of request of a phase: the same bytes for either load generator."""

    name: str
    method: str
    path: str
    bodies: list[bytes]
    headers: dict[str, str]
    items: int = 1
    unit: str = "rows"

    def raw(self) -> list[bytes]:
        return [http_request(self.method, self.path, body, headers=self.headers) for body in self.bodies]


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = os.getenv("BENCH_METHOD")
wrk.body = f:read("*a")
f:close()
for line in string.gmatch(os.getenv("BENCH_HEADERS"), "[^\\n]+") do
  local name, value = string.match(line, "^([^:]+): (.*)$")
  wrk.headers[name] = value
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d\\n", summary.requests, summary.duration, e.status,
                         e.connect + e.read + e.write + e.timeout))
  local quantiles = {}
  for i = 1, 1000 do quantiles[i] = latency:percentile((i - 0.5) / 10) end
  io.write("LAT " .. table.concat(quantiles, " ") .. "\\n")
end
"""


def run_wrk(load: Load, port: int, clients: int, seconds: float, root: Path, threads: int = 1) -> PhaseResult:
    """One phase driven by ``wrk`` (whole seconds, at least 1) sending the first body of ``load``."""
    body, script = root / "wrk-body.bin", root / "wrk.lua"
    body.write_bytes(load.bodies[0])
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_METHOD": load.method,
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in load.headers.items())}
    duration = max(1, round(seconds))
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{clients}", f"-d{duration}s", "--timeout", "10s", "-s", str(script),
                          f"http://127.0.0.1:{port}{load.path}"], env=env, capture_output=True, text=True,
                         timeout=duration + 60, check=True).stdout
    totals = next(line for line in out.splitlines() if line.startswith("WRK ")).split()[1:]
    completed, micros, status_errors, socket_errors = (int(x) for x in totals)
    # wrk gives percentiles, not the latencies: 1,000 quantiles, each standing for a thousandth of the requests.
    quantiles = [float(us) / 1e6 for us in next(line for line in out.splitlines() if line.startswith("LAT")).split()[1:]]
    latencies = np.repeat(quantiles, max(1, completed // 1000)).tolist() if completed else []
    return PhaseResult(load.name, clients, micros / 1e6, completed - status_errors, status_errors + socket_errors, latencies,
                       load.items, load.unit, "wrk")


def run_load(load: Load, port: int, clients: int, seconds: float, args: argparse.Namespace, root: Path,
             warmup: float) -> PhaseResult:
    if args.load_generator == "wrk":
        if warmup >= 1.0:
            run_wrk(load, port, clients, 1.0, root)
        return run_wrk(load, port, clients, seconds, root)
    result = run_phase(load.name, port, load.raw(), clients, seconds, load.items, warmup=warmup)
    result.unit = load.unit
    return result


# -- server process ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, card: Path, calibration: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "disalign", "serve", "--model", str(model), "--card", str(card), "--calibration", str(calibration),
           "--host", "127.0.0.1", "--port", str(port), "--torch-threads", str(args.torch_threads),
           "--max-batch", str(args.max_batch), "--log-level", "warning"]
    if args.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(args.max_wait_ms)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(http_request("GET", "/v2/health/ready"))
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- fixtures: a K=1000 model and calibration, CIFAR JPEGs ---------------------------------------------
class WideModel(torch.nn.Module):
    """A tiny TorchScript-able classifier with K = 1000 classes and d features, for the row routes."""

    def __init__(self, feature_dim: int, num_classes: int = 1000):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, feature_dim),
                                        torch.nn.ReLU())
        self.fc = torch.nn.Linear(feature_dim, num_classes)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def fingerprint(path: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def fit_calibration(out: Path, bank_path: Path, model_fingerprint: str, num_classes: int, feature_dim: int,
                    class_names: list[str], seed: int = 0, head_count: int = 200) -> Path:
    from disalign.calib.data.bank import write_bank
    from disalign.calib.estimators.disalign import DisAlign

    rng = np.random.default_rng(seed)
    counts = np.maximum(2, (head_count * (0.01 ** (np.arange(num_classes) / max(1, num_classes - 1))))).astype(np.int64)
    labels = np.repeat(np.arange(num_classes), counts)
    n = len(labels)
    features = np.abs(rng.normal(size=(n, feature_dim))).astype(np.float32)
    logits = (rng.normal(size=(n, num_classes)) + 3.0 * np.eye(num_classes, dtype=np.float32)[labels]).astype(np.float32)
    bank = write_bank(bank_path, features, logits, labels, model_fingerprint=model_fingerprint, class_names=class_names,
                      class_counts=counts, overwrite=True)
    DisAlign(rho=1.0, epochs=1, seed=seed).fit(bank).save(out)
    return out


def wide_fixture(root: Path, feature_dim: int) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    model_path = root / "wide-k1000.ts"
    torch.jit.script(WideModel(feature_dim).eval()).save(str(model_path))
    card = root / "wide-k1000.json"
    card.write_text(json.dumps({"input": {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    # A small bank (head class 20 rows, ~4,500 in all): its fit only has to give the head real parameters.
    calibration = fit_calibration(root / "wide-calibration", root / "wide-bank.h5", fingerprint(model_path), 1000, feature_dim,
                                  [f"class{i:04d}" for i in range(1000)], head_count=20)
    return model_path, card, calibration


def cifar_jpegs(root: Path, count: int) -> list[bytes]:
    out: list[bytes] = []
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("test/") and member.name.endswith(".jpg"):
                out.append(tar.extractfile(member).read())
                if len(out) == count:
                    break
    return out


# -- offline baseline --------------------------------------------------------------------------------
class OfflineBaseline:
    """The shared model in this process: decode + preprocess + forward in batches, timed like a phase."""

    def __init__(self, blobs: list[bytes], batch_size: int, threads: int):
        from disalign.feature_extract.models import load_model
        from disalign.feature_extract.preprocess import Preprocessing

        torch.set_num_threads(threads)
        self.blobs, self.batch_size = blobs, batch_size
        self.model, self.prep = load_model(str(MODEL), input_size=(32, 32)), Preprocessing.from_card(CARD)
        self.fixed = self._decode(0)
        self._forward(self.fixed)  # warm-up

    def _decode(self, i: int) -> torch.Tensor:
        from disalign.feature_extract.preprocess import clean_view, decode_image

        n = self.batch_size
        batch = [self.blobs[(i * n + j) % len(self.blobs)] for j in range(n)]
        return torch.stack([clean_view(decode_image(b, draft_size=self.prep.draft_size), self.prep) for b in batch])

    def _forward(self, images: torch.Tensor) -> None:
        from disalign.feature_extract.preprocess import normalize

        self.model.features_and_logits(normalize(images, self.prep))

    def images_per_second(self, seconds: float, include_decode: bool = True) -> float:
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds and i < 100_000:
            self._forward(self._decode(i) if include_decode else self.fixed)
            done += self.batch_size
            i += 1
        return done / (time.perf_counter() - start)


def merge(parts: list[PhaseResult]) -> PhaseResult:
    """The rounds of one phase as one result (requests and seconds summed, latencies pooled)."""
    first = parts[0]
    return PhaseResult(first.name, first.clients, sum(p.seconds for p in parts), sum(p.ok for p in parts),
                       sum(p.failed for p in parts), [x for p in parts for x in p.latencies], first.items_per_request,
                       first.unit, first.generator)


def row_loads(model_name: str, feature_dim: int, num_classes: int = 1000) -> list[Load]:
    """The row phases: trivial route, /calibrate (JSON, 1 row), v2 infer with binary tensors (1 and 64 rows)."""
    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.abs(rng.normal(size=(n, feature_dim))).astype("<f4"), rng.normal(size=(n, num_classes)).astype("<f4"))

    def binary(n: int) -> tuple[bytes, int]:
        """A body with n rows and the length of its JSON header."""
        features, logits = rows(n)
        header = json.dumps({"inputs": [
            {"name": "features", "shape": [n, feature_dim], "datatype": "FP32", "parameters": {"binary_data_size": features.nbytes}},
            {"name": "logits", "shape": [n, num_classes], "datatype": "FP32", "parameters": {"binary_data_size": logits.nbytes}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        return header + features.tobytes() + logits.tobytes(), len(header)

    def binary_load(n: int, count: int) -> Load:
        built = [binary(n) for _ in range(count)]
        bodies, header_length = [body for body, _ in built], built[0][1]  # the same header length for all: same sizes
        return Load(f"POST v2 infer binary (K=1000, {n} row{'s' if n > 1 else ''})", "POST", f"/v2/models/{model_name}/infer",
                    bodies, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)},
                    items=n)

    calibrate = [json.dumps({"rows": [{"features": f[0].round(5).tolist(), "logits": z[0].round(5).tolist()}], "top_k": 5}).encode()
                 for f, z in (rows(1) for _ in range(64))]
    return [Load("GET /v2/health/live (trivial)", "GET", "/v2/health/live", [b""], {}),
            Load("POST /calibrate (K=1000, 1 row)", "POST", "/calibrate", calibrate, {"Content-Type": "application/json"}),
            binary_load(1, 64), binary_load(64, 8)]


def row_phases(args: argparse.Namespace, root: Path, per_round: float) -> list[list[PhaseResult]]:
    """Phase 1: the row loads against one K = 1000 server, alternating in rounds; the rounds of each load."""
    model, card, calibration = wide_fixture(root, args.feature_dim)
    loads = row_loads("disalign", args.feature_dim)
    proc, port = start_server(model, card, calibration, args, root / "server-wide.log")
    try:
        rounds: list[list[PhaseResult]] = [[] for _ in loads]
        for r in range(args.rounds):
            for load, results in zip(loads, rounds, strict=True):
                results.append(run_load(load, port, args.clients, per_round, args, root, warmup=1.0 if r == 0 else 0.2))
        return rounds
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase, split over the rounds")
    p.add_argument("--rounds", type=int, default=4,
                   help="each compared group (trivial vs the row routes, offline vs /predict) alternates this many times, "
                        "so a drift of the machine's speed hits all alike")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for the row routes and the trivial route")
    p.add_argument("--predict-clients", type=int, default=32, help="concurrent clients for /predict")
    p.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads of the server and of the offline baseline (half the CPUs: the rest drive the load)")
    p.add_argument("--max-batch", type=int, default=32, help="server micro-batch size and offline batch size")
    p.add_argument("--max-wait-ms", type=float, default=None, help="server micro-batch wait (default: the server's)")
    p.add_argument("--images", type=int, default=512, help="distinct CIFAR JPEGs sent to /predict")
    p.add_argument("--feature-dim", type=int, default=2048, help="d of the K = 1000 model of the row routes")
    p.add_argument("--load-generator", choices=("python", "wrk"), default="python",
                   help="what drives the row phases: this process (asyncio) or wrk (C; whole seconds per round)")
    p.add_argument("--no-predict", action="store_true", help="run the row phases only")
    args = p.parse_args(argv)
    per_round = args.seconds / args.rounds
    if args.load_generator == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--load-generator wrk needs wrk on the PATH (apt-get install wrk).")

    with tempfile.TemporaryDirectory(prefix="disalign-bench-") as tmp:
        root = Path(tmp)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
              f"{args.torch_threads} torch threads; {args.rounds} rounds of {per_round:.1f} s per phase; "
              f"row phases driven by {args.load_generator}", flush=True)
        lives, calibs, bin1s, bin64s = row_phases(args, root, per_round)
        results = [merge(lives), merge(calibs), merge(bin1s), merge(bin64s)]
        if not args.no_predict:
            predict = predict_phases(args, root, per_round)
            results += predict.results

    print()
    for r in results:
        print(r.line())
    live, calib, bin1, bin64 = results[:4]
    print()
    failed = sum(r.failed for r in results)
    for name, parts, merged in (("/calibrate", calibs, calib), ("v2-binary", bin1s, bin1)):
        rounds = " ".join(f"{c.rps / t.rps:.2f}" for t, c in zip(lives, parts, strict=True))
        ratio = merged.rps / live.rps
        met = ratio >= 0.5 and merged.pct(99) <= 20.0
        print(f"target {name} (1 row) >= 0.5 x trivial and p99 <= 20 ms at {args.clients} clients: "
              f"{ratio:.2f} x (rounds: {rounds}), p99 {merged.pct(99):.2f} ms -> {'met' if met else 'NOT met'}")
    rows_ratio = bin64.rps * 64 / bin1.rps
    print(f"target v2-binary rows/s at 64 rows/request >= 20 x requests/s at 1 row: {rows_ratio:.1f} x "
          f"({bin64.rps * 64:.0f} rows/s vs {bin1.rps:.0f} req/s) -> {'met' if rows_ratio >= 20 else 'NOT met'}")
    if not args.no_predict:
        predict.report()
    print(f"ratio v2-binary/trivial: {bin1.rps / live.rps:.2f}")
    print(f"failed requests: {failed}")
    return 0 if failed == 0 else 1


@dataclass
class PredictPhases:
    """Phase 2: /predict against offline batch inference of the same model."""

    pred1s: list[PhaseResult]
    offline_rounds: list[float]
    pred8: PhaseResult
    pred_json: PhaseResult
    forward_only: float
    max_batch: int

    @property
    def results(self) -> list[PhaseResult]:
        return [merge(self.pred1s), self.pred8, self.pred_json]

    def report(self) -> None:
        offline = float(np.mean(self.offline_rounds))
        pred1 = merge(self.pred1s)
        print(f"{'offline batch inference (ResNet-32)':<40} batch={self.max_batch:<4} {offline:8.1f} images/s "
              f"(decode + preprocess + forward); forward only {self.forward_only:.1f} images/s")
        rounds = " ".join(f"{p.rps / o:.2f}" for p, o in zip(self.pred1s, self.offline_rounds, strict=True))
        ratio = pred1.rps / offline
        print(f"target /predict >= 0.6 x offline images/s: 1 image/request {ratio:.2f} x (rounds: {rounds}), "
              f"8 images/request {self.pred8.rps * 8 / offline:.2f} x -> {'met' if ratio >= 0.6 else 'NOT met'} (1 image/request)")


def predict_phases(args: argparse.Namespace, root: Path, per_round: float) -> PredictPhases:
    classes = json.loads(CARD.read_text())["classes"]
    blobs = cifar_jpegs(root, args.images)
    offline_model = OfflineBaseline(blobs, args.max_batch, args.torch_threads)
    cifar_calibration = fit_calibration(root / "cifar-calibration", root / "cifar-bank.h5", fingerprint(MODEL), 10, 64, classes)
    proc, port = start_server(MODEL, CARD, cifar_calibration, args, root / "server-cifar.log")
    try:
        one = [http_request("POST", "/predict", *multipart([b])) for b in blobs]
        offline_rounds, pred1s = [], []
        for r in range(args.rounds):
            offline_rounds.append(offline_model.images_per_second(per_round))
            pred1s.append(run_phase("POST /predict (1 image/request)", port, one, args.predict_clients, per_round,
                                    warmup=1.0 if r == 0 else 0.2))
        forward_only = offline_model.images_per_second(per_round, include_decode=False)
        eight = [http_request("POST", "/predict", *multipart(blobs[i:i + 8])) for i in range(0, len(blobs) - 7, 8)]
        pred8 = run_phase("POST /predict (8 images/request)", port, eight, args.predict_clients, per_round * 2, items=8)
        b64 = [http_request("POST", "/predict", json.dumps({"images": [base64.b64encode(b).decode()]}).encode(),
                            "application/json") for b in blobs]
        pred_json = run_phase("POST /predict (JSON base64, 1 image)", port, b64, args.predict_clients, per_round * 2)
    finally:
        stop_server(proc)
    return PredictPhases(pred1s, offline_rounds, pred8, pred_json, forward_only, args.max_batch)


if __name__ == "__main__":
    sys.exit(main())
