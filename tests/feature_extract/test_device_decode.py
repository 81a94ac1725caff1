"""``--decode torchvision``: device-side resize/crop, batch merging, fallbacks. torchvision's decode_jpeg is
replaced by a Pillow stand-in with the same contract, so these run without the optional extra (and with
the real one when it is installed)."""

from __future__ import annotations

import importlib.util
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import disalign.feature_extract.device_decode as device_decode
from disalign.calib.data.bank import load_bank
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.extract import ExtractConfig, extract_bank
from disalign.feature_extract.preprocess import Preprocessing, make_view

from .conftest import CARD, MODEL

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


class _ReadMode:
    RGB = "RGB"


def _pil_decode_jpeg(data, mode=None, device="cpu"):
    """Stand-in for torchvision.io.decode_jpeg: a list in, a list out; RuntimeError on a bad file."""
    if isinstance(data, list):
        return [_pil_decode_jpeg(d, mode, device) for d in data]
    try:
        img = Image.open(io.BytesIO(data.numpy().tobytes()))
        img.load()
    except OSError as exc:
        raise RuntimeError(f"decode failed: {exc}") from exc
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).to(device)


@pytest.fixture
def fake_torchvision(monkeypatch):
    if not HAS_TORCHVISION:
        monkeypatch.setattr(device_decode, "require_torchvision_io", lambda: (_pil_decode_jpeg, _ReadMode))


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)


def test_clean_views_on_device_match_pillow():
    prep = Preprocessing.imagenet()
    for w, h in ((256, 256), (256, 300), (500, 375), (300, 400)):
        img = _image(w, h)
        ref = make_view(img, prep).astype(int)
        out = device_decode.clean_views_on_device([torch.from_numpy(np.array(img)).permute(2, 0, 1)], prep)
        assert out.shape == (1, 3, 224, 224) and out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
        diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - ref)
        if h == 256 or w == 256 and h > w:  # scale 1: a pure crop, identical pixels
            assert diff.max() == 0, (w, h)
        else:  # both bilinear with antialiasing; implementations round differently
            assert diff.mean() < 1.0 and diff.max() <= 12, (w, h, diff.mean(), diff.max())


def test_device_decode_equals_pillow_on_mixed_files(tmp_path, cifar_root, fake_torchvision):
    """JPEGs, a PNG, a grayscale JPEG, a truncated JPEG and a missing file: same rows, values and skips."""
    root = tmp_path / "mixed"
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(10):
        shutil.copy(cifar_root / "test" / "ship" / f"{i:04d}.jpg", root / "img" / f"{i}.jpg")
        lines.append(f"img/{i}.jpg 8")
    Image.open(cifar_root / "test" / "ship" / "0010.jpg").save(root / "img" / "p.png")
    Image.open(cifar_root / "test" / "ship" / "0011.jpg").convert("L").save(root / "img" / "g.jpg")
    (root / "img" / "bad.jpg").write_bytes((cifar_root / "test" / "ship" / "0012.jpg").read_bytes()[:150])
    lines[3:3] = ["img/p.png 8", "img/bad.jpg 8"]
    lines[8:8] = ["img/g.jpg 8", "img/missing.jpg 8"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    common = dict(model=str(MODEL), card=CARD, root=root, list_file=root / "list.txt", workers=0, batch_size=8, chunk_size=8,
                  quiet=True, feature_dtype="float32")
    pil = extract_bank(ExtractConfig(out=tmp_path / "pil.h5", **common))
    dev = extract_bank(ExtractConfig(out=tmp_path / "dev.h5", decode="torchvision", **common))
    assert pil.skipped == dev.skipped == [4, 9]
    a, b = load_bank(pil.path), load_bank(dev.path)
    assert torch.equal(a.sample_index, b.sample_index) and a.sample_index.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13]
    assert torch.allclose(a.features, b.features, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)
    assert b.info.preprocessing["decode"] == "torchvision" and b.skipped.tolist() == [4, 9]


def test_device_decode_needs_one_view(tmp_path):
    with pytest.raises(ExtractError, match=r"--decode torchvision makes the clean view only: --views should be 1, found 2"):
        ExtractConfig(model=str(MODEL), folder=tmp_path, out=tmp_path / "b.h5", views=2, decode="torchvision")


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the missing-extra error cannot occur")
def test_device_decode_without_torchvision_is_a_clear_error(tmp_path, cifar_root, small_lists):
    cfg = ExtractConfig(model=str(MODEL), card=CARD, root=cifar_root, list_file=small_lists["train16"], out=tmp_path / "b.h5",
                        decode="torchvision", workers=0, quiet=True)
    with pytest.raises(ExtractError, match=r"--decode torchvision needs the optional dependency torchvision"):
        extract_bank(cfg)
