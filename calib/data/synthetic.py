"""Synthetic long-tailed banks with a realistic shape, for tests and scale benchmarks.

Features are Gaussian clusters around class means; the "stage-1" logits are a linear classifier on them
whose bias carries ``prior_bias`` · log(class prior), the bias toward frequent classes that post-hoc
calibration must remove. Class counts can come from the real profiles in ``../shared/profiles``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from disalign.calib.data.bank import DEFAULT_CHUNK_ROWS, BankWriter


def load_profile(profiles_json: str | os.PathLike, key: str = "imagenet_lt_train") -> np.ndarray:
    """Per-class counts (K,) from ``long_tail_profiles.json`` (a list of counts or of {"count": …} records)."""
    data = json.loads(Path(profiles_json).read_text())[key]
    if isinstance(data, dict):
        data = data.get("counts", data.get("class_counts", data))
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = [row.get("count", row.get("image_count")) for row in data]
    return np.asarray(data, dtype=np.int64)


def write_synthetic_bank(
    path: str | os.PathLike,
    class_counts: np.ndarray,
    *,
    rows_per_class: np.ndarray | None = None,
    feature_dim: int = 64,
    separation: float = 3.0,
    prior_bias: float = 1.0,
    seed: int = 0,
    feature_dtype: str = "float16",
    block_rows: int = 16384,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    model_seed: int = 1234,
    overwrite: bool = True,
) -> Path:
    """Write a bank with ``rows_per_class`` rows (default: ``class_counts``, i.e. a training split).

    The class means and classifier depend only on ``model_seed`` and the shapes, so train/val/test banks
    made with different ``seed`` share one "model". Rows are written in blocks, so the bank can be far
    larger than the memory used to make it.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    rows = counts if rows_per_class is None else np.asarray(rows_per_class, dtype=np.int64)
    k, d = counts.shape[0], feature_dim
    model = np.random.default_rng(model_seed)
    means = model.normal(size=(k, d)).astype(np.float32) * (separation / np.sqrt(d))
    weight = means * 4.0
    log_prior = np.log(np.maximum(counts, 1) / counts.sum())
    bias = (prior_bias * (log_prior - log_prior.mean())).astype(np.float32)
    labels = np.repeat(np.arange(k), rows)  # sorted by class, as real list files usually are
    rng = np.random.default_rng(seed)
    writer = BankWriter(path, feature_dim=d, class_names=[f"class_{i}" for i in range(k)], feature_dtype=feature_dtype,
                        class_counts=counts, model_fingerprint=f"sha256:synthetic-{model_seed}-{k}-{d}",
                        classifier_weight=weight, classifier_bias=bias, chunk_rows=chunk_rows, overwrite=overwrite)
    with writer:
        for start in range(0, labels.shape[0], block_rows):
            y = labels[start : start + block_rows]
            x = means[y] + rng.normal(size=(y.shape[0], d)).astype(np.float32) / np.sqrt(d) * 3.0
            logits = x @ weight.T + bias
            writer.append(features=x, logits=logits, labels=y, sample_index=np.arange(start, start + y.shape[0]),
                          view=np.zeros(y.shape[0], dtype=np.int16))
        return writer.finish()
