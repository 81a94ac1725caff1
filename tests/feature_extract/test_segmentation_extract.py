"""Pixel banks: what ``disalign extract --task segmentation`` writes, checked against the model itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disalign.calib.data.bank import load_bank
from disalign.calib.errors import DisalignError, InputError
from disalign.cli import main as cli_main
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.segmentation import (
    RATIO_SCALE,
    SegmentationExtractConfig,
    cell_labels,
    extract_segmentation_bank,
    load_segmentation_model,
    read_class_stats,
    read_pairs,
    sample_pixels,
)
from tests.conftest import SHARED
from tests.dense_data import seg_scenes, tiny_segmenter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")  # torch >= 2.14 deprecates TorchScript


def extract_main(argv: list[str]) -> int:
    """``disalign extract ARGV…``."""
    return cli_main(["extract", *argv])



@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("seg")
    return root, seg_scenes(root, 6), tiny_segmenter(root / "tiny.ts")


def model_maps(model_path: Path, root: Path, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    model = torch.jit.load(str(model_path))
    x = torch.stack([torch.from_numpy(np.array(Image.open(root / img))).permute(2, 0, 1) for img, _ in pairs]).float()
    x = (x / 255 - 0.5) / 0.25
    with torch.no_grad():
        features = model.forward_features(x)
        return features, model.classifier(features)


def test_dense_bank_round_trips_every_pixel(scene, tmp_path):
    root, list_file, model_path = scene
    out = extract_segmentation_bank(SegmentationExtractConfig(model=str(model_path), root=root, list_file=list_file,
                                                              out=tmp_path / "dense.h5", card=model_path.with_suffix(".json"),
                                                              feature_dtype="float32"))
    bank = load_bank(out)
    pairs = read_pairs(list_file)
    features, logits = model_maps(model_path, root, pairs)  # (6, 8, 4, 4), (6, 3, 4, 4)
    assert bank.info.task == "segmentation" and bank.num_rows == 6 * 16
    assert bank.info.preprocessing["feature_map"] == [4, 4] and bank.info.preprocessing["images"] == 6
    assert bank.info.class_names == ["red", "green", "blue"]
    yx = bank.extra["yx"].long()
    img = bank.sample_index
    torch.testing.assert_close(bank.features, features[img, :, yx[:, 0], yx[:, 1]])
    torch.testing.assert_close(bank.logits, logits[img, :, yx[:, 0], yx[:, 1]])
    torch.testing.assert_close(bank.classifier_weight, torch.jit.load(str(model_path)).classifier.weight.reshape(3, 8))
    for i, (_, mask) in enumerate(pairs):
        m = np.array(Image.open(root / mask)).astype(np.int64)
        rows = img == i
        expected = m[2 + 4 * yx[rows, 0].numpy(), 2 + 4 * yx[rows, 1].numpy()]  # the centre of each 4x4 cell
        assert bank.labels[rows].tolist() == np.where(expected == 255, -1, expected).tolist()
    masks = [np.array(Image.open(root / m)) for _, m in pairs]
    expected_counts = sum(np.bincount(m[m != 255].ravel(), minlength=3) for m in masks)
    assert bank.info.class_counts.tolist() == expected_counts.tolist()


def test_sampled_bank_keeps_labelled_pixels_and_its_positions(scene, tmp_path):
    root, list_file, model_path = scene
    code = extract_main(["--task", "segmentation", "--model", str(model_path), "--card", str(model_path.with_suffix(".json")),
                         "--root", str(root), "--list", str(list_file), "--out", str(tmp_path / "s.h5"),
                         "--pixels-per-image", "5", "--balanced", "--quiet"])
    assert code == 0
    bank = load_bank(tmp_path / "s.h5")
    per_image = torch.bincount(bank.sample_index)
    assert per_image.tolist() == [5] * 6 and (bank.labels >= 0).all()
    dense = load_bank(extract_segmentation_bank(SegmentationExtractConfig(
        model=str(model_path), root=root, list_file=list_file, out=tmp_path / "d.h5", card=model_path.with_suffix(".json"))))
    # Every sampled row is the dense row at the same (image, y, x).
    key = lambda b: (b.sample_index * 16 + b.extra["yx"][:, 0].long() * 4 + b.extra["yx"][:, 1].long())  # noqa: E731
    lookup = {int(k): i for i, k in enumerate(key(dense))}
    rows = torch.tensor([lookup[int(k)] for k in key(bank)])
    assert torch.equal(bank.features, dense.features[rows]) and torch.equal(bank.labels, dense.labels[rows])


def test_balanced_sampling_evens_out_classes():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1 + [-1] * 20)
    drawn = np.concatenate([labels[sample_pixels(labels, 6, balanced=True, rng=rng)] for _ in range(300)])
    counts = np.bincount(drawn, minlength=3)
    assert counts[2] > 250  # the single pixel of class 2 is drawn unless 6 class draws miss it: (2/3)^6 ≈ 9 %
    assert counts[1] > 3 * counts[2] / 2 and (drawn >= 0).all()
    plain = np.concatenate([labels[sample_pixels(labels, 6, balanced=False, rng=rng)] for _ in range(300)])
    assert np.bincount(plain, minlength=3)[2] < 60
    assert sample_pixels(labels, None, balanced=False, rng=rng).tolist() == list(range(labels.size))


def test_cell_labels_take_the_cell_centre():
    mask = np.arange(64).reshape(8, 8)
    mask[5, 1] = 255
    assert cell_labels(mask, 2, 2).tolist() == [[mask[2, 2], mask[2, 6]], [mask[6, 2], mask[6, 6]]]
    assert cell_labels(mask, 4, 4)[2, 0] == -1  # centre of the cell (2, 0) is pixel (5, 1): ignored


@pytest.mark.shared_data  # shared/profiles
def test_class_stats_of_the_real_ade20k_table():
    counts = read_class_stats(SHARED / "profiles" / "ade20k_objectInfo150.txt", 150)
    assert counts.shape == (150,) and counts[0] == round(0.1576 * RATIO_SCALE)  # wall
    with pytest.raises(ExtractError, match=r"should list Idx 0..9 \(or 1..10\) for the model's K=10 classes, found 150 rows"):
        read_class_stats(SHARED / "profiles" / "ade20k_objectInfo150.txt", 10)


def test_class_stats_set_the_bank_counts(scene, tmp_path):
    root, list_file, model_path = scene
    stats = tmp_path / "stats.tsv"
    stats.write_text("Idx\tRatio\tTrain\tVal\tName\n0\t0.7\t1\t1\tred\n1\t0.25\t1\t1\tgreen\n2\t0.05\t1\t1\tblue\n")
    bank = load_bank(extract_segmentation_bank(SegmentationExtractConfig(
        model=str(model_path), root=root, list_file=list_file, out=tmp_path / "b.h5", card=model_path.with_suffix(".json"),
        pixels_per_image=2, class_stats=stats)))
    assert bank.info.class_counts.tolist() == [round(r * RATIO_SCALE) for r in (0.7, 0.25, 0.05)]


def test_errors_name_the_input(scene, tmp_path):
    root, list_file, model_path = scene
    card = model_path.with_suffix(".json")
    cfg = dict(model=str(model_path), root=root, list_file=list_file, card=card)
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("img/0.png\n")
    with pytest.raises(InputError, match=r"line 1: expected 'image mask' \(2 fields\), found 1"):
        read_pairs(bad_list)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "seven.png")
    (tmp_path / "l.txt").write_text(f"{root / 'img/0.png'} {tmp_path / 'seven.png'}\n")
    with pytest.raises(InputError, match=r"has class id 7; ids should be 0..2 or 255"):
        extract_segmentation_bank(SegmentationExtractConfig(**{**cfg, "root": Path("/"), "list_file": tmp_path / "l.txt"}, out=tmp_path / "x.h5"))
    (tmp_path / "exists.h5").write_text("")
    with pytest.raises(DisalignError, match="--out .*exists.h5 already exists; pass --overwrite"):
        extract_segmentation_bank(SegmentationExtractConfig(**cfg, out=tmp_path / "exists.h5"))
    with pytest.raises(ExtractError, match="--pixels-per-image should be >= 1, found 0"):
        SegmentationExtractConfig(**cfg, out=tmp_path / "y.h5", pixels_per_image=0)
    resized = tmp_path / "resize.json"
    resized.write_text(json.dumps({"input": {"size": 16, "resize": 20, "mean": [0.5] * 3, "std": [0.25] * 3}}))
    with pytest.raises(ExtractError, match=r"input.resize \(20\) should be unset"):
        extract_segmentation_bank(SegmentationExtractConfig(**{**cfg, "card": resized}, out=tmp_path / "z.h5"))
    with pytest.raises(ExtractError, match="should expose forward_features"):
        plain = tmp_path / "plain.ts"
        torch.jit.script(torch.nn.Conv2d(3, 3, 1)).save(str(plain))
        load_segmentation_model(str(plain))


def test_torchvision_segmentation_model_features_are_the_last_conv_input(tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    reference = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    torch.save(reference.state_dict(), tmp_path / "dl.pt")
    model = load_segmentation_model("torchvision:deeplabv3_mobilenet_v3_large", tmp_path / "dl.pt")
    assert (model.num_classes, model.feature_dim) == (3, 256)
    x = torch.randn(2, 3, 64, 64)
    features, logits = model.features_and_logits(x)  # (2, 256, h, w), (2, 3, h, w)
    torch.testing.assert_close(logits, torch.einsum("nchw,kc->nkhw", features, model.classifier_weight) + model.classifier_bias.view(1, 3, 1, 1),
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = reference(x)["out"]
    upsampled = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ExtractError, match="is not a supported segmentation model; choose one of deeplabv3_mobilenet_v3_large"):
        load_segmentation_model("torchvision:lraspp_mobilenet_v3_large", tmp_path / "dl.pt")
