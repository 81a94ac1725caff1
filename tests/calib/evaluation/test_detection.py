"""Detection evaluation: AP from pycocotools on hand-made cases, the calibrated head inside torchvision's
post-processing, RLE masks."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
import torch

pycocotools = pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from disalign.calib.errors import InputError  # noqa: E402
from disalign.calib.evaluation.detection import (  # noqa: E402
    CalibratedBoxPredictor,
    _lvis_compatible,
    coco_ap,
    detection_ap,
    encode_mask,
    is_lvis,
)

CATEGORIES = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}, {"id": 3, "name": "c", "frequency": "c"}]


def gt_coco() -> dict:
    """Two images; category 1 has one box in each, category 2 one box in image 1; category 3 none."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [60, 10, 20, 20], "area": 400, "iscrowd": 0}]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


RESULTS = [  # category 1: hit (0.9), false positive (0.8), hit (0.7); category 2: hit (0.6)
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 1, "bbox": [70, 70, 10, 10], "score": 0.8},
    {"image_id": 2, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.7},
    {"image_id": 1, "category_id": 2, "bbox": [60, 10, 20, 20], "score": 0.6},
]


def test_ap_by_hand():
    scores = coco_ap(gt_coco(), RESULTS)
    # Category 1, at every IoU threshold: precision 1 up to recall 0.5, then 2/3 up to recall 1 → the
    # 101-point interpolated AP is (51·1 + 50·2/3) / 101. Category 2: AP 1. Category 3: no ground truth.
    ap1 = (51 + 50 * 2 / 3) / 101
    assert scores["AP"] == pytest.approx((ap1 + 1) / 2)
    assert scores["AP50"] == scores["AP75"] == pytest.approx((ap1 + 1) / 2)
    assert scores["AP_f"] == pytest.approx(ap1) and scores["AP_r"] == pytest.approx(1.0) and scores["AP_c"] is None


def summarize(coco: dict, results: list[dict], cat_ids=None) -> np.ndarray:
    gt = COCO()
    gt.dataset = coco
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_agrees_with_cocoeval_summarize_on_random_detections():
    rng = np.random.default_rng(0)
    coco = gt_coco()
    results = []
    for image in (1, 2):
        for _ in range(40):
            x, y, w, h = rng.uniform(0, 60, 2).tolist() + rng.uniform(5, 40, 2).tolist()
            results.append({"image_id": image, "category_id": int(rng.integers(1, 3)), "bbox": [x, y, w, h], "score": float(rng.random())})
    results += RESULTS
    ours = coco_ap(coco, results)  # ≤ 100 detections per image: maxDets 300 and 100 agree
    stats = summarize(coco, results)
    assert [ours[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(stats[:3].tolist())
    assert ours["AP_f"] == pytest.approx(summarize(coco, results, [1])[0])
    assert ours["AP_r"] == pytest.approx(summarize(coco, results, [2])[0])


def test_no_results_and_bad_iou_type():
    assert coco_ap(gt_coco(), [])["AP"] is None
    with pytest.raises(InputError, match="iou_type should be 'bbox' or 'segm', found 'keypoints'"):
        coco_ap(gt_coco(), RESULTS, iou_type="keypoints")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode under numpy 2
def test_rle_masks_decode_with_pycocotools():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        rle = encode_mask(mask)
        compressed = mask_utils.frPyObjects(rle, *rle["size"])
        assert np.array_equal(mask_utils.decode(compressed).astype(bool), mask)


# -- LVIS: the federated protocol ---------------------------------------------------------------------
def lvis_gt(negatives: list[int], not_exhaustive: list[int]) -> dict:
    """Category 1 ("f") has one box in image 1; image 2 has no annotation, and lists ``negatives`` as verified
    absent; image 1 lists ``not_exhaustive``. LVIS files have no iscrowd."""
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 100, "neg_category_ids": [2], "not_exhaustive_category_ids": not_exhaustive},
              {"id": 2, "file_name": "2.png", "width": 100, "height": 100, "neg_category_ids": negatives, "not_exhaustive_category_ids": []}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400}]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a", "frequency": "f"},
                                                                  {"id": 2, "name": "b", "frequency": "r"}]}


LVIS_RESULTS = [  # a box of category 1 in image 2 (0.9), the hit in image 1 (0.8)
    {"image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.8},
]


def official_lvis_ap(gt: dict, results: list[dict], tmp_path) -> dict:
    """The lvis package as its README runs it: annotation file on disk, LVISEval(path, results, "bbox").run()."""
    lvis = pytest.importorskip("lvis")
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    with _lvis_compatible():  # lvis 0.5.3 needs np.float, gone from NumPy 2
        evaluator = lvis.LVISEval(str(path), [dict(r) for r in results], "bbox")
        evaluator.run()
    return dict(evaluator.results)


def test_lvis_does_not_score_a_detection_of_an_unverified_category(tmp_path):
    gt = lvis_gt(negatives=[], not_exhaustive=[])
    assert is_lvis(gt) and not is_lvis(gt_coco())
    # COCOeval counts the image-2 box as a false positive ranked above the hit: AP 0.5 at every IoU
    coco = {**gt, "images": [{k: v for k, v in img.items() if "category_ids" not in k} for img in gt["images"]],
            "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}
    assert coco_ap(coco, LVIS_RESULTS)["AP"] == pytest.approx(0.5)
    # LVIS: category 1 is neither annotated nor verified absent in image 2, so that box is not scored
    ours = detection_ap(gt, LVIS_RESULTS)
    reference = official_lvis_ap(gt, LVIS_RESULTS, tmp_path)
    assert ours["AP"] == reference["AP"] == pytest.approx(1.0)
    assert ours["AP_f"] == reference["APf"] and ours["AP_r"] is None and reference["APr"] == -1
    assert gt == lvis_gt(negatives=[], not_exhaustive=[])  # the caller's annotations are left as they were


def test_lvis_scores_verified_negatives_and_ignores_non_exhaustive_misses(tmp_path):
    negative = lvis_gt(negatives=[1], not_exhaustive=[])  # category 1 verified absent in image 2: a real false positive
    assert detection_ap(negative, LVIS_RESULTS)["AP"] == pytest.approx(0.5) == official_lvis_ap(negative, LVIS_RESULTS, tmp_path)["AP"]
    miss = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.95}, *LVIS_RESULTS[1:]]
    exhaustive, not_exhaustive = lvis_gt([], []), lvis_gt([], not_exhaustive=[1])
    assert detection_ap(exhaustive, miss)["AP"] == pytest.approx(0.5)
    assert detection_ap(not_exhaustive, miss)["AP"] == official_lvis_ap(not_exhaustive, miss, tmp_path)["AP"] == pytest.approx(1.0)
    assert detection_ap(exhaustive, [])["AP"] is None


def test_lvis_annotations_missing_a_field_are_named():
    gt = lvis_gt([], [])
    del gt["images"][1]["not_exhaustive_category_ids"]
    with pytest.raises(InputError, match=r"LVIS annotations: image 2 should have a list 'not_exhaustive_category_ids', found None\."):
        detection_ap(gt, LVIS_RESULTS)
    gt = lvis_gt([], [])
    gt["categories"][1]["frequency"] = "x"
    with pytest.raises(InputError, match=r"LVIS annotations: category 2 should have a frequency r, c or f, found 'x'\."):
        detection_ap(gt, LVIS_RESULTS)


class _Predictor(torch.nn.Module):
    def forward(self, x):
        return x[:, :4] * 3.0, torch.zeros(x.shape[0], 16)


def test_calibrated_predictor_keeps_the_background_logit(long_tailed_banks, tmp_path):
    from disalign.calib.data.bank import write_bank
    from disalign.calib.estimators.disalign import DisAlign

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    features = np.abs(rng.normal(size=(400, 6))).astype(np.float32)
    logits = (features[:, :4] * 3.0).astype(np.float32)
    bank = write_bank(tmp_path / "det.h5", features, logits, labels, task="detection", background_index=0,
                      class_counts=[0, 300, 60, 5])
    est = DisAlign(rho=1.0, epochs=2, batch_size=64).fit(bank)
    wrapped = CalibratedBoxPredictor(_Predictor(), est)
    x = torch.from_numpy(features[:10])
    calibrated, deltas = wrapped(x)
    raw, _ = _Predictor()(x)
    assert torch.equal(calibrated[:, 0], raw[:, 0]) and not torch.allclose(calibrated[:, 1:], raw[:, 1:])
    assert deltas.shape == (10, 16)
    assert torch.equal(CalibratedBoxPredictor(_Predictor(), None)(x)[0], raw)


def test_detector_runs_with_the_calibrated_head(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from disalign.calib.estimators.disalign import DisAlign
    from disalign.calib.evaluation.detection import calibrated_head
    from disalign.cli.evaluate_dense import add_parsers
    from disalign.feature_extract.detection import (
        DetectionExtractConfig,
        detect,
        extract_detection_bank,
        load_detector,
        read_coco,
    )
    from tests.dense_data import det_scenes, tiny_detector

    coco_path = det_scenes(tmp_path, 4)
    weights = tiny_detector(tmp_path / "tiny.pt")
    card = weights.with_suffix(".json")
    bank = extract_detection_bank(DetectionExtractConfig(model=None, weights=weights, card=card, root=tmp_path, annotations=coco_path,
                                                         out=tmp_path / "roi.h5", rois_per_image=32))
    est = DisAlign(rho=1.0, epochs=1, batch_size=32, count_smoothing=1).fit(bank)  # 4 scenes may miss a category
    est.save(tmp_path / "calib")
    detector = load_detector(None, weights, card=card)
    heads = detector.module.roi_heads
    before = (heads.box_predictor, heads.score_thresh, heads.detections_per_img)
    both = detect(detector, read_coco(coco_path), tmp_path, {"joint": None, "disalign": est})
    assert (heads.box_predictor, heads.score_thresh, heads.detections_per_img) == before  # restored
    # The shared backbone / RPN pass gives exactly what the detector's own forward gives with each head.
    with calibrated_head(detector.module, None) as module, torch.no_grad():
        from disalign.feature_extract.detection import load_image

        own = module([load_image(tmp_path, read_coco(coco_path)["images"][0])])[0]
    first = [r for r in both["joint"] if r["image_id"] == 1]
    assert len(first) == own["boxes"].shape[0] and [r["score"] for r in first] == pytest.approx(own["scores"].tolist())
    results = both["disalign"]
    assert results and all(r["score"] > 1e-4 and r["category_id"] in (1, 2, 3) for r in results)
    assert max(sum(r["image_id"] == i for r in results) for i in range(1, 5)) <= 300
    with calibrated_head(detector.module, est, detections_per_image=5) as module, torch.no_grad():
        out = module([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[0] <= 5
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["eval-detection", "--weights", str(weights), "--card", str(card), "--calibration", str(tmp_path / "calib"),
                              "--annotations", str(coco_path), "--root", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["methods"]) == {"joint", "disalign"} and set(report["methods"]["joint"]) == {"bbox"}
    assert report["protocol"] == "coco" and "AP_r" in capsys.readouterr().out
    # with the training RoI bank every method runs: a row per method (the baselines fitted on the bank)
    args = parser.parse_args(["eval-detection", "--weights", str(weights), "--card", str(card), "--calibration", str(tmp_path / "calib"),
                              "--annotations", str(coco_path), "--root", str(tmp_path), "--train", str(tmp_path / "roi.h5"),
                              "--max-steps", "4", "--json", str(tmp_path / "all.json")])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "all.json").read_text())
    assert list(report["methods"]) == ["joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde"]
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:10]] == list(report["methods"])
    args = parser.parse_args(["eval-detection", "--weights", str(weights), "--card", str(card), "--calibration", str(tmp_path / "calib"),
                              "--annotations", str(coco_path), "--root", str(tmp_path), "--methods", "joint,lws"])
    with pytest.raises(InputError, match=r"--train is needed to fit lws; pass the training bank or drop them from --methods\."):
        args.func(args)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' RLE code under numpy 2
def test_mask_head_gives_rle_masks_and_segm_ap(tmp_path):
    pytest.importorskip("torchvision")
    from disalign.feature_extract.detection import detect, load_detector, read_coco
    from disalign.feature_extract.detectors import COMPACT, build_detector
    from tests.dense_data import det_scenes

    coco_path = det_scenes(tmp_path, 3)
    coco = read_coco(coco_path)
    for ann in coco["annotations"]:  # the squares are their own instance masks
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "channels": [8, 8, 16], "representation": 32, "image_size": 64, "anchor_sizes": [12, 24], "mask_head": True}
    torch.save(build_detector(COMPACT, kwargs).state_dict(), tmp_path / "mask.pt")
    (tmp_path / "mask.json").write_text(json.dumps({"model": COMPACT, "model_kwargs": kwargs}))
    detector = load_detector(None, tmp_path / "mask.pt", card=tmp_path / "mask.json", categories=coco["categories"])
    assert detector.has_masks
    results = detect(detector, coco, tmp_path, {"joint": None})["joint"]
    assert results and all(r["segmentation"]["size"] == [64, 64] for r in results)
    decoded = mask_utils.decode(mask_utils.frPyObjects(results[0]["segmentation"], 64, 64))
    assert decoded.shape == (64, 64)
    scores = coco_ap(coco, results, iou_type="segm")
    assert scores["AP"] is not None and 0.0 <= scores["AP"] <= 1.0
