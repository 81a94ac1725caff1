"""A timm model and a Hugging Face model, built from configs and saved locally, through the whole road on real
CIFAR JPEGs: extract (preprocessing from their own configs, recorded in the bank; no card) → fit → eval →
serve /predict in a real server process, whose probabilities equal `disalign predict`'s on the same images.
And a factory in the working directory, found by the `disalign` console script without PYTHONPATH."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from disalign.cli import main
from tests.conftest import REPO
from tests.feature_extract.library_models import CIFAR_CLASSES, save_hf_vit, save_timm_model, timm_cli_args

LISTS = ("train", "val", "test")
SERVED_IMAGES = 12  # test images sent to the server (the first rows of the test list)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lists(shared_dir, tmp_path_factory) -> dict[str, Path]:
    """Subsets of the CIFAR-10-LT IR50 lists: train every 50th row (long-tailed, 280 rows), val every 2nd (100),
    test every 98th (100)."""
    out = tmp_path_factory.mktemp("lists")
    steps = {"train": 50, "val": 2, "test": 98}
    paths = {}
    for split in LISTS:
        rows = (shared_dir / "data" / "cifar10lt-ir50" / f"{split}.txt").read_text().splitlines()[:: steps[split]]
        paths[split] = out / f"{split}.txt"
        paths[split].write_text("\n".join(rows) + "\n")
    return paths


def cli(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"disalign {' '.join(map(str, argv))} exited {code}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_predict(model_args: list[str], calibration: Path, images: list[Path], log: Path, names: list[str]) -> list[list[float]]:
    """Start `disalign serve` (no card: the calibration's recorded preprocessing), POST the images to /predict
    with top_k=10, stop the server; returns each image's probabilities by class index."""
    port = free_port()
    env = {**os.environ, "DISALIGN_TORCH_THREADS": "1", "DISALIGN_WATCH_INTERVAL_S": "0"}
    with open(log, "wb") as fh:
        process = subprocess.Popen([sys.executable, "-m", "disalign", "serve", *map(str, model_args), "--calibration", str(calibration),
                                    "--host", "127.0.0.1", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"the server did not become ready:\n{log.read_text()[-3000:]}")
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        response = httpx.post(f"{url}/predict", params={"top_k": 10}, files=files, timeout=60)
        assert response.status_code == 200, response.text
        out = []
        for prediction in response.json()["predictions"]:
            by_index = {p["index"]: p["probability"] for p in prediction["top_k"]}
            assert [p["label"] for p in prediction["top_k"]] == [names[p["index"]] for p in prediction["top_k"]]
            out.append([by_index[i] for i in range(10)])
        return out
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()[-3000:]


def predict_rows(bank: Path, calibration: Path, out: Path) -> dict[int, list[float]]:
    """`disalign predict` of a bank: each list row's calibrated probabilities by class index."""
    cli("predict", bank, "--calibration", calibration, "--out", out, "--top-k", 10, "--quiet")
    rows = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        rows[record["sample_index"]] = [p["probability"] for p in sorted(record["top_k"], key=lambda p: p["label"])]
    return rows


def end_to_end(model_args: list[str], source: str, interpolation: str, mean: list[float], lists, cifar_root, tmp_path) -> None:
    banks = {}
    for split in LISTS:
        banks[split] = tmp_path / f"{split}.h5"
        extra = ["--class-counts-from", banks["train"]] if split != "train" else []
        extra += ["--feature-dtype", "float32"] if split == "test" else []  # the server's features are float32 too
        cli("extract", *model_args, "--root", cifar_root, "--list", lists[split], "--out", banks[split], "--workers", 0,
            "--batch-size", 32, "--quiet", *extra)
    with h5py.File(banks["train"]) as f:
        recorded = json.loads(f.attrs["preprocessing"])
        names = json.loads(f.attrs["class_names"])
    assert recorded["source"] == source  # from the model's own config: no card anywhere
    assert (recorded["crop"], recorded["interpolation"]) == ([32, 32], interpolation) and recorded["mean"] == pytest.approx(mean)
    assert names == (CIFAR_CLASSES if source.startswith("the image processor") else [str(i) for i in range(10)])  # HF: id2label
    calibration = tmp_path / "calibration"
    cli("fit", banks["train"], "--val", banks["val"], "--epochs", 2, "--out", calibration, "--quiet")
    cli("eval", banks["test"], "--calibration", calibration, "--train", banks["train"], "--json", tmp_path / "report.json",
        "--methods", "joint,disalign,logit-adjust", "--quiet")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == {"joint", "disalign", "logit-adjust"}
    offline = predict_rows(banks["test"], calibration, tmp_path / "predictions.jsonl")
    test_rows = lists["test"].read_text().splitlines()[:SERVED_IMAGES]
    served = serve_and_predict(model_args, calibration, [cifar_root / row.split()[0] for row in test_rows], tmp_path / "server.log",
                               names)
    # The same pixels, the same float32 forward (another batch size), the same calibration: equal up to float rounding.
    assert np.allclose(np.array(served), np.array([offline[i] for i in range(SERVED_IMAGES)]), atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="optional extra timm is not installed")
def test_timm_model_extract_fit_eval_serve(lists, cifar_root, tmp_path):
    weights = save_timm_model(tmp_path / "model")
    end_to_end(timm_cli_args(weights), "timm's data config of timm:convnext_atto", "bicubic", [0.485, 0.456, 0.406],
               lists, cifar_root, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="optional extra hf is not installed")
def test_hf_model_extract_fit_eval_serve(lists, cifar_root, tmp_path):
    directory = save_hf_vit(tmp_path / "vit")
    end_to_end(["--model", f"hf:{directory}"], f"the image processor of hf:{directory}", "bilinear", [0.5, 0.5, 0.5],
               lists, cifar_root, tmp_path)


def test_console_script_imports_a_factory_from_the_working_directory(shared_dir, cifar_root, tmp_path):
    """`disalign extract --model my_net:build --model-arg num_classes=10` from the folder that holds my_net.py."""
    (tmp_path / "my_net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build(num_classes=3):\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join((shared_dir / "data" / "cifar10lt-ir50" / "val.txt").read_text().splitlines()[::20]) + "\n")
    script = Path(sys.executable).with_name("disalign")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [str(script), "extract", "--model", "my_net:build", "--model-arg", "num_classes=10", "--classifier-layer", "3",
            "--crop", "32", "--no-resize", "--root", str(cifar_root), "--list", str(listing), "--out", "bank.h5", "--workers", "0", "--quiet"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "bank.h5") as f:
        assert f["logits"].shape == (10, 10) and json.loads(f.attrs["model_args"]) == {"num_classes": 10}
    absent = subprocess.run([*argv[:3], "no_such_net:build", *argv[4:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert absent.returncode == 2
    assert absent.stderr == (f"error: --model no_such_net:build: module 'no_such_net' cannot be imported (No module named 'no_such_net'); "
                             f"it is looked for on the Python path and in the working directory {tmp_path}: run from the directory "
                             "that holds it or set PYTHONPATH.\n")
