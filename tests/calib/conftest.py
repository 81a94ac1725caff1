"""Fixtures shared by the calib tests: small synthetic long-tailed banks written with ``write_bank``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from disalign.calib.data.bank import Bank, load_bank, write_bank

LONG_TAIL_COUNTS = np.array([400, 200, 100, 50, 25, 12, 6], dtype=np.int64)  # many: 2, medium: 3, few: 2 classes


@dataclass(frozen=True)
class LongTailedBanks:
    """Train (long-tailed), val (30 per class) and test (100 per class) banks of one linear "model"."""

    train: Bank
    val: Bank
    test: Bank
    paths: dict[str, Path]
    counts: np.ndarray  # (K,) training counts
    weight: np.ndarray  # (K, d) stage-1 classifier
    bias: np.ndarray  # (K,)


def write_long_tailed_banks(directory: Path, *, counts: np.ndarray = LONG_TAIL_COUNTS, feature_dim: int = 16,
                            with_classifier: bool = True, seed: int = 0) -> LongTailedBanks:
    """Banks whose stage-1 classifier is biased toward frequent classes, as a long-tailed model is.

    Features are mostly positive (as post-ReLU features) Gaussian clusters around class means (K, d);
    the classifier is W_j = g_j·mean_j with norms g_j growing with log n_j, and bias b_j = log π_j, so the
    stored logits z = x·Wᵀ + b (of the float16 features) favour the head classes.
    """
    k = counts.size
    model = np.random.default_rng(1234)
    means = np.abs(model.normal(size=(k, feature_dim))) * 0.5 + np.eye(k, feature_dim) * 2.0
    gains = 1.0 + 0.25 * np.log(counts / counts.min())
    weight = (means * gains[:, None]).astype(np.float32)
    bias = np.log(counts / counts.sum()).astype(np.float32)
    paths, banks = {}, {}
    for offset, (split, rows) in enumerate((("train", counts), ("val", np.full(k, 30)), ("test", np.full(k, 100)))):
        rng = np.random.default_rng(seed + offset)
        labels = np.repeat(np.arange(k), rows)
        features = (means[labels] + rng.normal(size=(labels.size, feature_dim))).astype(np.float16)
        logits = features.astype(np.float32) @ weight.T + bias
        classifier = {"classifier_weight": weight, "classifier_bias": bias} if with_classifier else {}
        paths[split] = write_bank(directory / f"{split}.h5", features, logits, labels, class_counts=counts,
                                  model_fingerprint="sha256:synthetic-long-tail", **classifier)
        banks[split] = load_bank(paths[split])
    return LongTailedBanks(banks["train"], banks["val"], banks["test"], paths, counts, weight, bias)


@pytest.fixture(scope="session")
def long_tailed_banks(tmp_path_factory) -> LongTailedBanks:
    """K=7, d=16 long-tailed banks with a stored classifier (read-only: do not modify the tensors)."""
    return write_long_tailed_banks(tmp_path_factory.mktemp("long_tailed_banks"))
