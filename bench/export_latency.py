"""CPU latency of the exported graph against eager torch: what ``/predict`` computes once an image is decoded.

    .venv/bin/python bench/export_latency.py [--batches 1 8 32] [--threads 1 2] [--rounds 5] [--seconds 1.5] [--method disalign]

The shared CIFAR ResNet-32 and a calibration fitted on the embedded demo banks (``examples/cifar10lt``)
are exported with ``disalign export`` (fused ONNX and TorchScript graphs) into a temporary directory.
Each path then classifies the same batch of uint8 clean views (the input the server's micro-batcher
hands to the model), and the time of one call is measured:

- ``torch eager``: the server's path, ``normalize`` → ``LoadedModel.features_and_logits`` →
  ``Calibrator.predict_logits`` → softmax, under ``torch.inference_mode`` (``service/runtime.py``'s
  ``_forward_batch`` less its bookkeeping);
- ``torchscript``: the exported fused TorchScript module (the same ops in one graph);
- ``onnxruntime``: the exported fused ONNX graph, ``InferenceSession.run`` on the CPU provider, with
  ``intra_op_num_threads`` = torch's thread count and graph optimisations at their default (all).

Decoding and resizing are the same for every path (outside the graph) and are not timed. The paths
alternate in short rounds (``--rounds`` of ``--seconds`` each): on a shared machine the speed drifts,
and a ratio must compare like with like. Printed: per (threads, batch) the median and 90th percentile of
one call in ms, images/s from the median, and the eager/ONNX ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "cifar10lt"
MODEL = DEMO / "cifar10lt-ir50-resnet32.ts"


def disalign(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "disalign", *argv, "--quiet"], check=True)


def timed(call, seconds: float) -> list[float]:
    """Per-call wall times (s) of ``call()`` for about ``seconds`` (at least 5 calls), after one warm-up call."""
    call()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per path per round")
    p.add_argument("--method", default="disalign")
    args = p.parse_args()

    import onnxruntime as ort

    from disalign.calib.estimators.methods import load_calibration
    from disalign.feature_extract.models import load_model
    from disalign.feature_extract.preprocess import normalize
    from disalign.service.preprocessing import recorded_preprocessing

    work = Path(tempfile.mkdtemp(prefix="export-latency-"))
    disalign("fit", str(DEMO / "train.h5"), "--val", str(DEMO / "val.h5"), "--method", args.method, "--out", str(work / "cal"))
    disalign("export", "--calibration", str(work / "cal"), "--model", str(MODEL), "--out", str(work / "onnx"))
    disalign("export", "--calibration", str(work / "cal"), "--model", str(MODEL), "--format", "torchscript", "--out", str(work / "ts"))
    calibrator = load_calibration(work / "cal")
    prep = recorded_preprocessing(calibrator.meta_.preprocessing)
    model = load_model(str(MODEL), input_size=prep.crop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(work / "ts" / "model.ts")).eval()

    print(f"model {MODEL.name}, method {args.method}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{os.cpu_count()} CPUs; rounds {args.rounds} x {args.seconds} s per path")
    print(f"{'threads':>7} {'batch':>5} {'path':<12} {'median ms':>9} {'p90 ms':>7} {'images/s':>9} {'eager/this':>10}")
    generator = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
        for batch in args.batches:
            images = torch.randint(0, 256, (batch, 3, *prep.crop), dtype=torch.uint8, generator=generator)
            feed = {"images": images.numpy()}

            def eager(images=images):
                with torch.inference_mode():
                    features, logits = model.features_and_logits(normalize(images, prep))
                    return torch.softmax(calibrator.predict_logits(features, logits, validate=False), dim=1)

            def script(images=images):
                with torch.inference_mode():
                    return scripted(images)[0]

            paths = {"torch eager": eager, "torchscript": script, "onnxruntime": lambda feed=feed, session=session: session.run(None, feed)[0]}
            reference = eager().numpy()
            assert np.abs(paths["onnxruntime"]() - reference).max() <= 1e-4, "ONNX and torch disagree"
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, call in paths.items():
                    times[name] += timed(call, args.seconds)
            medians = {name: statistics.median(t) for name, t in times.items()}
            for name, t in times.items():
                p90 = float(np.percentile(t, 90))
                print(f"{threads:>7} {batch:>5} {name:<12} {medians[name] * 1e3:>9.2f} {p90 * 1e3:>7.2f} "
                      f"{batch / medians[name]:>9.0f} {medians['torch eager'] / medians[name]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
