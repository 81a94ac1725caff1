"""RoI banks: ``disalign extract --task detection`` on a small untrained detector and synthetic COCO scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from torchvision.ops import box_iou  # noqa: E402

from disalign.calib.core.grw import grw_weights  # noqa: E402
from disalign.calib.data.bank import load_bank  # noqa: E402
from disalign.calib.errors import InputError  # noqa: E402
from disalign.calib.estimators.disalign import DisAlign  # noqa: E402
from disalign.cli import main as cli_main  # noqa: E402
from disalign.feature_extract.detection import (  # noqa: E402
    BACKGROUND,
    DetectionExtractConfig,
    extract_detection_bank,
    instance_counts,
    load_detector,
    read_coco,
    targets_of,
)
from disalign.feature_extract.detectors import build_detector  # noqa: E402
from disalign.feature_extract.errors import ExtractError  # noqa: E402
from tests.dense_data import det_scenes, tiny_detector  # noqa: E402


def extract_main(argv: list[str]) -> int:
    """``disalign extract ARGV…``."""
    return cli_main(["extract", *argv])



@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    coco = det_scenes(root, 6)
    weights = tiny_detector(root / "tiny.pt")
    bank = extract_detection_bank(DetectionExtractConfig(model=None, weights=weights, card=weights.with_suffix(".json"), root=root,
                                                         annotations=coco, out=root / "train.h5", rois_per_image=32,
                                                         feature_dtype="float32"))
    return root, coco, weights, bank


def test_roi_bank_header_and_round_trip(scene):
    root, coco_path, weights, path = scene
    bank, coco = load_bank(path), read_coco(coco_path)
    assert bank.info.task == "detection" and bank.info.background_index == 0
    assert bank.info.class_names == [BACKGROUND, "red", "green", "blue"]
    assert bank.info.class_counts.tolist() == instance_counts(coco).tolist()
    assert set(bank.extra) == {"image_id", "box"} and bank.extra["box"].shape == (bank.num_rows, 2 * 2)
    assert torch.bincount(bank.sample_index).tolist() == [32] * 6
    assert bank.extra["image_id"].tolist() == (bank.sample_index + 1).tolist()
    # The stored logits are the box predictor applied to the stored features (the RoI representation).
    detector = load_detector(None, weights, card=weights.with_suffix(".json"))
    torch.testing.assert_close(bank.logits, detector.module.roi_heads.box_predictor.cls_score(bank.features), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bank.classifier_weight, detector.classifier_weight)


def test_labels_follow_the_iou_rule_and_the_fg_fraction(scene):
    _, coco_path, _, path = scene
    bank, targets = load_bank(path), targets_of(read_coco(coco_path))
    for image_id in bank.extra["image_id"].unique().tolist():
        rows = bank.extra["image_id"] == image_id
        gt = targets[image_id]
        iou = box_iou(bank.extra["box"][rows], gt["boxes"])  # (R, G)
        best, match = iou.max(dim=1)
        labels = bank.labels[rows]
        expected = torch.where(best >= 0.5, gt["labels"][match], torch.zeros_like(labels))
        assert torch.equal(labels, expected)
        assert int((labels > 0).sum()) <= 8  # 25 % of 32
        assert int((labels > 0).sum()) >= len(gt["labels"])  # ground-truth boxes are proposals too


def test_extraction_is_seeded(scene, tmp_path):
    root, coco, weights, path = scene
    args = ["--task", "detection", "--model", "disalign.feature_extract.detectors:compact_faster_rcnn", "--weights", str(weights),
            "--card", str(weights.with_suffix(".json")), "--root", str(root), "--annotations", str(coco),
            "--rois-per-image", "32", "--feature-dtype", "float32", "--quiet"]
    assert extract_main([*args, "--out", str(tmp_path / "again.h5")]) == 0
    assert extract_main([*args, "--out", str(tmp_path / "other.h5"), "--seed", "1"]) == 0
    first, again, other = load_bank(path), load_bank(tmp_path / "again.h5"), load_bank(tmp_path / "other.h5")
    assert torch.equal(first.extra["box"], again.extra["box"]) and torch.equal(first.features, again.features)
    assert not torch.equal(first.extra["box"], other.extra["box"])


def test_background_logit_untouched_and_weight_one_after_fitting(scene):
    _, _, _, path = scene
    bank = load_bank(path)
    est = DisAlign(rho=1.0, epochs=2, batch_size=32).fit(bank)
    assert est.meta_.background_index == 0
    calibrated = est.predict_logits(bank.features, bank.logits)
    assert torch.equal(calibrated[:, 0], bank.logits[:, 0])
    assert not torch.allclose(calibrated[:, 1:], bank.logits[:, 1:])
    weights = grw_weights(bank.info.class_counts, 1.0, background_index=0)
    assert weights[0] == 1.0 and float(weights[1:].mean()) == pytest.approx(1.0)


def test_errors_name_the_input(scene, tmp_path):
    root, coco, weights, _ = scene
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                               "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(InputError, match="annotation 1 names an unknown image or category"):
        read_coco(bad)
    with pytest.raises(ExtractError, match="--fg-fraction should be in \\(0, 1\\], found 1.5"):
        DetectionExtractConfig(model=None, weights=weights, root=root, annotations=coco, out=tmp_path / "x.h5", fg_fraction=1.5)
    with pytest.raises(ExtractError, match="the detector has 4 classes \\(background included\\) but the categories list 2"):
        load_detector(None, weights, card=weights.with_suffix(".json"), categories=[{"id": 1}, {"id": 2}])
    with pytest.raises(ExtractError, match="is not a two-stage torchvision detector"):
        build_detector("torchvision:resnet18")
    state = tmp_path / "notdet.pt"
    torch.save({"w": torch.zeros(1)}, state)
    with pytest.raises(ExtractError, match="is not the state_dict of a two-stage detector"):
        load_detector("disalign.feature_extract.detectors:compact_faster_rcnn", state)


def test_torchvision_reference_detector_builds_by_name():
    model = build_detector("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 4})
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert np.isclose(model.roi_heads.fg_bg_sampler.positive_fraction, 0.25)
