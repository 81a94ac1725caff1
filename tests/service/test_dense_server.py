"""``disalign serve`` with the calibrated segmentation model and detector of ``examples/`` (real processes, HTTP).

The model card's ``task`` picks the dense runtime; the calibrations are fitted here on banks the
extractor makes from small synthetic scenes, so they carry the fixtures' fingerprints.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import load_calibration
from disalign.feature_extract.segmentation import SegmentationExtractConfig, extract_segmentation_bank
from tests.dense_data import DETECTOR, DETECTOR_CARD, FCN, FCN_CARD, seg_scenes
from tests.service.conftest import REPO, ServerProcess, free_port, wait_ready

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")  # torch >= 2.14 deprecates TorchScript


def start(model: str | Path, card: Path, calibration: Path, log: Path, *extra: str, deadline_s: float = 90.0) -> ServerProcess:
    """``disalign serve`` (``python -m disalign``) on a free loopback port, ready within ``deadline_s``."""
    env = {**os.environ, "DISALIGN_TORCH_THREADS": "1"}
    port = free_port()
    command = [sys.executable, "-m", "disalign", "serve", "--model", str(model), "--card", str(card), "--calibration",
               str(calibration), "--host", "127.0.0.1", "--port", str(port), *extra]
    with open(log, "wb") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    if wait_ready(server, deadline_s):
        return server
    server.stop()
    raise AssertionError(f"the server did not become ready:\n{log.read_text()[-3000:]}")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(text: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(text))))


# -- segmentation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("seg_server")
    scenes = seg_scenes(root, 8, size=64, seed=3)
    bank = extract_segmentation_bank(SegmentationExtractConfig(model=str(FCN), root=root, list_file=scenes, out=root / "bank.h5",
                                                               card=FCN_CARD, pixels_per_image=16))
    DisAlign(rho=1.0, epochs=2, count_smoothing=1).fit(bank).save(root / "calibration")
    server = start(FCN, FCN_CARD, root / "calibration", root / "server.log")
    yield server, root / "calibration"
    assert server.stop() == 0, server.log.read_text()[-3000:]


def test_segmentation_predict_returns_calibrated_and_stage1_label_maps(seg_server):
    server, calibration = seg_server
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    oblong = rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    files = [("file", ("a.png", png_bytes(square), "image/png")), ("file", ("b.png", png_bytes(oblong), "image/png"))]
    r = httpx.post(f"{server.url}/predict", files=files, params={"raw": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "segmentation" and len(body["predictions"]) == 2
    first, second = body["predictions"]
    assert (second["height"], second["width"]) == (40, 52) and decode_png(second["label_map"]).shape == (40, 52)
    assert sum(c["fraction"] for c in first["classes"]) == pytest.approx(1.0)
    # The stage-1 map is the model's own output; the calibrated map is DisAlign per pixel, upsampled the same way.
    model = torch.jit.load(str(FCN))
    card = json.loads(FCN_CARD.read_text())
    mean, std = (torch.tensor(card["input"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.classifier(features)
        stage1 = model(x).argmax(1)[0].numpy()
    assert np.array_equal(decode_png(first["raw_label_map"]), stage1)
    calibrator = load_calibration(calibration)
    z = calibrator.predict_logits(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]),
                                  logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]))
    z = z.reshape(1, *logits.shape[2:], -1).permute(0, 3, 1, 2)
    expected = F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert np.array_equal(decode_png(first["label_map"]), expected)
    assert r.json()["calibration_version"].startswith("disalign-")


def test_segmentation_server_keeps_the_other_routes(seg_server):
    server, _ = seg_server
    meta = httpx.get(f"{server.url}/v2/models/disalign", timeout=10).json()
    assert meta["num_classes"] == 10 and meta["feature_dim"] == 128
    row = {"features": [0.1] * 128, "logits": [float(i) for i in range(10)]}
    assert httpx.post(f"{server.url}/calibrate", json={"rows": [row]}, timeout=10).status_code == 200
    image = base64.b64encode(png_bytes(np.zeros((64, 64, 3), np.uint8))).decode()
    r = httpx.post(f"{server.url}/v2/models/disalign/infer", timeout=10,
                   json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]})
    assert r.status_code == 400 and "send images to /predict" in r.json()["error"]  # /v2 answers 400 for invalid input
    r = httpx.post(f"{server.url}/predict", files=[("file", ("x.png", b"not an image", "image/png"))], timeout=10)
    assert r.status_code == 400


# -- detection --------------------------------------------------------------------------------------
def cifar_scene(cifar_jpegs: list[Path]) -> tuple[np.ndarray, list[list[float]]]:
    """Two real CIFAR test objects (40 and 48 px) on a smooth 128x128 background, and their boxes."""
    ys, xs = np.mgrid[0:128, 0:128]
    canvas = np.stack([90 + 0.5 * ys, 120 + 0.3 * xs, 150 - 0.4 * ys], axis=-1).clip(0, 255).astype(np.uint8)
    boxes = []
    for path, (x, y, s) in zip((cifar_jpegs[0], cifar_jpegs[-1]), ((8, 12, 40), (66, 60, 48)), strict=True):
        canvas[y:y + s, x:x + s] = np.array(Image.open(path).convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
        boxes.append([x, y, x + s, y + s])
    return canvas, boxes


@pytest.fixture(scope="module")
def det_server(tmp_path_factory) -> Iterator[ServerProcess]:
    pytest.importorskip("torchvision")
    from disalign.feature_extract.detection import DetectionExtractConfig, extract_detection_bank
    from tests.dense_data import det_scenes

    root = tmp_path_factory.mktemp("det_server")
    categories = json.loads(DETECTOR_CARD.read_text())["categories"]
    coco = det_scenes(root, 6, size=128, categories=categories)
    bank = extract_detection_bank(DetectionExtractConfig(model=None, weights=DETECTOR, card=DETECTOR_CARD, root=root,
                                                         annotations=coco, out=root / "roi.h5", rois_per_image=64))
    DisAlign(rho=1.0, epochs=2, count_smoothing=1).fit(bank).save(root / "calibration")
    server = start("disalign.feature_extract.detectors:compact_faster_rcnn", DETECTOR_CARD, root / "calibration",
                   root / "server.log", "--weights", str(DETECTOR))
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def test_detection_predict_returns_calibrated_boxes(det_server, cifar_jpegs):
    from torchvision.ops import box_iou

    scene, boxes = cifar_scene(cifar_jpegs)
    image = base64.b64encode(png_bytes(scene)).decode()
    r = httpx.post(f"{det_server.url}/predict", json={"images": [image]}, params={"raw": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "detection"
    result = body["predictions"][0]
    found = result["detections"]
    names = [c["name"] for c in json.loads(DETECTOR_CARD.read_text())["categories"]]
    assert 0 < len(found) <= 300 and all(d["label"] in names and d["score"] > 1e-4 for d in found)
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    assert all(0 <= d["box"][0] < d["box"][2] <= 128 and 0 <= d["box"][1] < d["box"][3] <= 128 for d in found)
    assert all(d["mask"] is None for d in found)  # no mask head
    # The trained detector finds both pasted objects among its confident boxes.
    top = torch.tensor([d["box"] for d in found[:10]])
    assert (box_iou(torch.tensor(boxes, dtype=torch.float32), top).max(dim=1).values >= 0.5).all()
    assert result["raw_detections"] is not None and len(result["raw_detections"]) > 0
