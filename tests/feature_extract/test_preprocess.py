"""Preprocessing: card parsing, decoding (corrupt, missing, too large, JPEG draft), views, normalisation."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import (
    IMAGENET_MEAN,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    augmented_view,
    clean_view,
    declared_pixels,
    decode_image,
    normalize,
)

from .conftest import CARD


def _jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(smooth).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_from_card_reads_the_shared_cifar_card():
    prep = Preprocessing.from_card(CARD)
    assert prep.resize is None and prep.crop == (32, 32) and prep.small
    assert prep.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-6)
    assert prep.std == pytest.approx((0.2023, 0.1994, 0.2010), abs=1e-6)
    assert prep.to_dict()["augmentation"] == "pad4-crop-flip"


def test_imagenet_defaults():
    prep = Preprocessing.imagenet()
    assert (prep.resize, prep.crop, prep.mean) == (256, (224, 224), IMAGENET_MEAN)
    assert not prep.small and prep.draft_size == (256, 256)


@pytest.mark.parametrize(
    ("card", "match"),
    [
        ({"name": "x"}, r"field 'input' should be an object"),
        ({"input": {"size": [32, 32], "mean": [0, 0, 0]}}, r"field 'input.std' is missing"),
        ({"input": {"size": [32, -1], "mean": [0, 0, 0], "std": [1, 1, 1]}}, r"'input.size' should be \[H, W\] positive integers, found \[32, -1\]"),
        ({"input": {"size": 32, "mean": [0, 0], "std": [1, 1, 1]}}, r"'input.mean' should be 3 numbers \(R, G, B\), found 2"),
        ({"input": {"size": 32, "mean": [0, 0, 0], "std": [1, 0, 1]}}, r"std should be positive for each channel"),
    ],
)
def test_from_card_errors(tmp_path, card, match):
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(ExtractError, match=match):
        Preprocessing.from_card(path)


def test_from_card_missing_and_not_json(tmp_path):
    with pytest.raises(ExtractError, match=r"model card .*nope.json does not exist"):
        Preprocessing.from_card(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExtractError, match=r"is not readable JSON"):
        Preprocessing.from_card(tmp_path / "bad.json")


def test_decode_real_cifar_jpeg(cifar_root):
    img = decode_image(cifar_root / "train" / "cat" / "0000.jpg")
    assert img.mode == "RGB" and img.size == (32, 32)
    same = decode_image((cifar_root / "train" / "cat" / "0000.jpg").read_bytes())
    assert np.array_equal(np.asarray(img), np.asarray(same))


def test_decode_errors(tmp_path, cifar_root):
    with pytest.raises(ImageDecodeError, match=r"image .*missing.jpg does not exist"):
        decode_image(tmp_path / "missing.jpg")
    truncated = (cifar_root / "train" / "cat" / "0000.jpg").read_bytes()[:300]
    with pytest.raises(ImageDecodeError, match=r"image <bytes> could not be decoded"):
        decode_image(truncated)
    with pytest.raises(ImageDecodeError, match=r"could not be decoded \(not an image format Pillow reads"):
        decode_image(b"this is not an image")
    with pytest.raises(ImageTooLargeError, match=r"has 640x480 = 307200 pixels, more than max_pixels=100000"):
        decode_image(_jpeg_bytes(640, 480), max_pixels=100_000)


def test_decode_converts_grayscale_and_rgba(tmp_path):
    Image.new("L", (8, 6), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(tmp_path / "a.png")
    assert decode_image(tmp_path / "g.png").getpixel((0, 0)) == (7, 7, 7)
    assert decode_image(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)


def test_jpeg_draft_keeps_at_least_the_target_size():
    data = _jpeg_bytes(1024, 768)
    assert decode_image(data).size == (1024, 768)
    assert decode_image(data, draft_size=(256, 256)).size == (341, 256) or decode_image(data, draft_size=(256, 256)).size == (512, 384)
    assert min(decode_image(data, draft_size=(256, 256)).size) >= 256
    assert decode_image(data, draft_size=(700, 700)).size == (1024, 768)  # less than 2x smaller: full decode


def test_clean_view_cifar_is_the_raw_pixels(cifar_root):
    img = decode_image(cifar_root / "train" / "cat" / "0000.jpg")
    view = clean_view(img, Preprocessing.from_card(CARD))
    assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
    assert torch.equal(view, torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_clean_view_resize_and_centre_crop():
    img = Image.open(io.BytesIO(_jpeg_bytes(500, 375))).convert("RGB")
    view = clean_view(img, Preprocessing.imagenet())
    assert view.shape == (3, 224, 224)
    # resize the shorter side to 256 then crop the centre: equals PIL's two-step resize + crop up to interpolation
    two_step = np.asarray(img.resize((341, 256), Image.Resampling.BILINEAR).crop((58, 16, 282, 240))).astype(int)
    assert np.abs(view.permute(1, 2, 0).numpy().astype(int) - two_step).mean() < 2.0
    exact = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 300, 3), dtype=np.uint8))
    assert torch.equal(clean_view(exact, Preprocessing.imagenet()), torch.from_numpy(np.array(exact)[16:240, 38:262]).permute(2, 0, 1))


def test_augmented_views_are_seeded(cifar_root):
    prep = Preprocessing.from_card(CARD)
    img = decode_image(cifar_root / "train" / "cat" / "0001.jpg")
    a = augmented_view(img, prep, seed=0, row=5, view=1)
    assert torch.equal(a, augmented_view(img, prep, seed=0, row=5, view=1))
    others = [augmented_view(img, prep, seed=s, row=r, view=v) for s, r, v in ((1, 5, 1), (0, 6, 1), (0, 5, 2))]
    assert all(not torch.equal(a, o) for o in others)
    big = Image.open(io.BytesIO(_jpeg_bytes(400, 300))).convert("RGB")
    b = augmented_view(big, Preprocessing.imagenet(), seed=3, row=0, view=1)
    assert b.shape == (3, 224, 224) and torch.equal(b, augmented_view(big, Preprocessing.imagenet(), seed=3, row=0, view=1))
    with pytest.raises(ExtractError, match=r"augmented views are numbered from 1 .* found view=0"):
        augmented_view(img, prep, seed=0, row=0, view=0)


def test_normalize_values_and_memory_format():
    prep = Preprocessing.from_card(CARD)
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = normalize(batch, prep)
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0], (-mean / std).expand(3, 4, 4)) and torch.allclose(out[1], ((1 - mean) / std).expand(3, 4, 4))
    nhwc = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert normalize(nhwc, prep).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ExtractError, match=r"normalize expects a uint8 \(N, 3, H, W\) batch, found torch.float32 of shape \(2, 3, 4, 4\)"):
        normalize(out, prep)


# -- more than 8 bits per sample, decode errors ---------------------------------------------------------
def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def gray_variants(gray: np.ndarray) -> dict[str, bytes]:
    """One 8-bit grayscale picture (H, W) uint8 as 8-bit PNG, 16-bit PNG (I;16), 32-bit int TIFF (I) and float TIFF (F)."""
    wide = gray.astype(np.uint16) * 257  # v * 257: the 16-bit sample that means the same grey as v
    return {"L png": _encoded(gray, "PNG"), "I;16 png": _encoded(wide, "PNG"),
            "I tiff": _encoded(wide.astype(np.int32), "TIFF"), "F tiff": _encoded(gray.astype(np.float32) / 255, "TIFF")}


def test_images_of_more_than_8_bits_are_scaled_not_clipped():
    gray = np.random.default_rng(0).integers(0, 256, (12, 20), dtype=np.uint8)
    variants = gray_variants(gray)
    assert Image.open(io.BytesIO(variants["I;16 png"])).mode == "I;16"  # really a 16-bit file
    for name, data in variants.items():
        decoded = np.asarray(decode_image(data))
        assert decoded.shape == (12, 20, 3) and decoded.dtype == np.uint8, name
        assert np.array_equal(decoded, np.repeat(gray[:, :, None], 3, axis=2)), name
    # round(v / 257) by hand: 128 → 0.498 → 0, 129 → 0.502 → 1, 32896 = 128 * 257 → 128, 65535 → 255
    edge = np.array([[0, 128, 129, 32896, 65535]], dtype=np.uint16)
    assert np.asarray(decode_image(_encoded(edge, "PNG")))[0, :, 0].tolist() == [0, 0, 1, 128, 255]


@pytest.mark.parametrize(("array", "match"), [
    (np.array([[0, 70000]], dtype=np.int32), r"32-bit integer samples outside 0..65535"),
    (np.array([[0.0, 2.0]], dtype=np.float32), r"floating-point samples outside \[0, 1\]"),
    (np.array([[0.0, np.nan]], dtype=np.float32), r"floating-point samples outside \[0, 1\] \(or NaN\)"),
])
def test_wide_samples_without_a_known_scale_are_refused(array, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(_encoded(array, "TIFF"))


@pytest.mark.parametrize("data", [b"not an image", b"\xff\xd8\xff" + b"a" * 20, b"\x89PNG\r\n\x1a\n" + b"x" * 30])
def test_decode_errors_name_no_python_objects(data):
    with pytest.raises(ImageDecodeError, match=r"^image <bytes> could not be decoded \(") as info:
        decode_image(data)
    assert " at 0x" not in str(info.value) and "<_io" not in str(info.value)


def test_declared_pixels_reads_only_the_header():
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")  # 25 Mpx in about 3 KB
    assert len(buf.getvalue()) < 4096
    assert declared_pixels(buf.getvalue()) == 25_000_000
    assert declared_pixels(_jpeg_bytes(40, 30)) == 1200 and declared_pixels(b"not an image") is None


def test_declared_pixels_never_decodes_and_keeps_pillows_bomb_guard_out_of_the_answer(monkeypatch):
    from PIL import ImageFile

    png = io.BytesIO()
    Image.new("1", (100, 50)).save(png, format="PNG")
    files = {"PNG": png.getvalue(), "JPEG": _jpeg_bytes(100, 50), "WebP": _encoded(np.zeros((50, 100, 3), np.uint8), "WEBP")}

    def no_decoding(self):
        raise AssertionError("declared_pixels decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 5000 px: over Pillow's limit, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape to the caller
        assert {name: declared_pixels(data) for name, data in files.items()} == {"PNG": 5000, "JPEG": 5000, "WebP": 5000}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # over twice the limit: Pillow refuses to open it
    assert declared_pixels(files["PNG"]) == 4001  # larger than anything Pillow decodes, not "unreadable"
    monkeypatch.undo()
    with pytest.raises(ImageTooLargeError, match=r"has 100x50 = 5000 pixels, more than max_pixels=4999"):
        decode_image(files["JPEG"], max_pixels=4999)  # decoding still enforces the limit itself


def test_the_extractor_reads_16_bit_and_float_images_as_their_8_bit_picture(tmp_path, cifar_root):
    from disalign.calib.data.bank import load_bank
    from disalign.feature_extract.extract import ExtractConfig, extract_bank

    from .conftest import MODEL

    gray = np.asarray(Image.open(cifar_root / "train" / "cat" / "0000.jpg").convert("L"))  # a real 32x32 picture
    lines = []
    for name, data in gray_variants(gray).items():
        path = tmp_path / (name.replace(" ", ".").replace(";", ""))
        path.write_bytes(data)
        lines.append(f"{path.name} 3")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    cfg = ExtractConfig(model=str(MODEL), card=CARD, root=tmp_path, list_file=tmp_path / "list.txt", out=tmp_path / "bank.h5",
                        workers=0, batch_size=4, feature_dtype="float32", quiet=True)
    assert extract_bank(cfg).skipped == []
    bank = load_bank(cfg.out)
    assert bank.num_rows == 4
    for row in range(1, 4):  # every variant gives exactly the features of the 8-bit PNG
        assert torch.equal(bank.features[row], bank.features[0]), lines[row]
        assert torch.equal(bank.logits[row], bank.logits[0]), lines[row]


# -- random resized crop: torchvision's parameters, drawn from our own seeded generator -------------------
class TorchDraws:
    """The two ``np.random.Generator`` methods the crop uses, drawn from torch's global RNG exactly as
    torchvision's ``RandomResizedCrop.get_params`` draws (``uniform_`` on a 1-element float tensor, ``randint``)."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, size=(1,)).item())


CROP_SIZES = [(500, 375), (375, 500), (224, 224), (641, 427), (1000, 20), (20, 1000), (3, 2), (1, 1)]


def test_random_resized_crop_box_is_torchvisions_get_params_draw_for_draw():
    """Same draws in, same box out: the steps, the order of the draws, the bounds and the centre-crop
    fallback (every box of the 1000x20 image; most of the 1x1 one) are torchvision's."""
    transforms = pytest.importorskip("torchvision.transforms")
    from disalign.feature_extract.preprocess import RRC_RATIO, RRC_SCALE, _random_resized_crop_box

    default = transforms.RandomResizedCrop(224)
    assert (tuple(default.scale), tuple(default.ratio)) == (RRC_SCALE, RRC_RATIO)
    state = torch.random.get_rng_state()
    try:
        for width, height in CROP_SIZES:
            image = Image.new("RGB", (width, height))
            boxes = []
            for seed in range(200):
                torch.manual_seed(seed)
                top, left, h, w = transforms.RandomResizedCrop.get_params(image, list(default.scale), list(default.ratio))
                torch.manual_seed(seed)
                box = _random_resized_crop_box(TorchDraws(), width, height)
                assert box == (left, top, left + w, top + h), (width, height, seed)
                boxes.append(box)
            if (width, height) == (1000, 20):  # no crop of the allowed scale and ratio fits: the centre 27x20
                assert set(boxes) == {(486, 0, 513, 20)}
            if (width, height) == (500, 375):  # the sampling branch: boxes differ from seed to seed
                assert len(set(boxes)) > 190
    finally:
        torch.random.set_rng_state(state)


def test_random_resized_crop_boxes_keep_the_scale_and_ratio_bounds():
    """With the numpy generator the extraction uses (no torchvision needed): area 8-100 %, ratio 3/4-4/3
    (up to the rounding of the sides to pixels), inside the image."""
    from disalign.feature_extract.preprocess import _random_resized_crop_box, _rng

    for row in range(500):
        left, top, right, bottom = _random_resized_crop_box(_rng(0, row, 1), 500, 375)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.08 * 500 * 375 * 0.98 <= w * h <= 500 * 375
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02


def test_the_official_stage2_view_is_torchvisions_crop_flip_and_jitter_for_the_same_draws(cifar_root):
    """``augment="official"``: RandomResizedCrop, flip and ColorJitter(0.4, 0.4, 0.4), replayed with
    torchvision's functional ops on the draws of the same seeded generator."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    from disalign.feature_extract.preprocess import _random_resized_crop_box, _rng, make_view

    prep = Preprocessing.from_card(CARD)
    for source in (decode_image(cifar_root / "train" / "cat" / "0001.jpg"), Image.open(io.BytesIO(_jpeg_bytes(400, 300))).convert("RGB")):
        for row in range(6):
            view = make_view(source, prep, 1, seed=7, row=row, augment="official")
            rng = _rng(7, row, 1)
            left, top, right, bottom = _random_resized_crop_box(rng, *source.size)
            expected = functional.resized_crop(source, top, left, bottom - top, right - left, list(prep.crop),
                                               interpolation=InterpolationMode.BILINEAR)
            if rng.random() < 0.5:
                expected = functional.hflip(expected)
            factors = rng.uniform(0.6, 1.4, size=3)
            ops = (functional.adjust_brightness, functional.adjust_contrast, functional.adjust_saturation)
            for index in rng.permutation(3):
                expected = ops[index](expected, float(factors[index]))
            assert view.shape == (32, 32, 3) and view.dtype == np.uint8
            assert np.abs(view.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    # Seeded like every view, and not the standard (pad-crop-flip) view of the same row.
    img = decode_image(cifar_root / "train" / "cat" / "0001.jpg")
    assert np.array_equal(make_view(img, prep, 2, seed=0, row=3, augment="official"), make_view(img, prep, 2, seed=0, row=3, augment="official"))
    assert not np.array_equal(make_view(img, prep, 2, seed=0, row=3, augment="official"), make_view(img, prep, 2, seed=0, row=3))
    assert np.array_equal(make_view(img, prep, 0, augment="official"), make_view(img, prep, 0))  # view 0 stays the clean view
