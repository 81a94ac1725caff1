"""Generalized re-weighting (GRW) and the class-weighted cross-entropy of DisAlign.

    r_c = n_c / Σ_k n_k                 (training frequency of class c)
    w_c = (1/r_c)^ρ / Σ_k (1/r_k)^ρ · K  (so the weights average to 1)

ρ = 0 gives plain cross-entropy, ρ = 1 inverse-frequency weighting. For K+1-way heads with a
background column, the foreground weights are normalised over the K foreground classes and the
background weight is 1 (the official detection recipe).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from disalign.calib.errors import InputError, some_of


def grw_weights(
    class_counts: np.ndarray | torch.Tensor | list[int],
    rho: float,
    *,
    background_index: int | None = None,
    count_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-class GRW weights (K,) float32 from per-class training counts (K,).

    A class with zero samples makes (1/r)^ρ infinite: that is an error unless ``count_smoothing`` > 0
    is added to every count. The background column's count is ignored and its weight is 1.
    """
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).reshape(-1)
    if rho < 0:
        raise InputError(f"rho should be >= 0, found {rho}.")
    if count_smoothing < 0:
        raise InputError(f"count_smoothing should be >= 0, found {count_smoothing}.")
    fg = torch.ones_like(counts, dtype=torch.bool)
    if background_index is not None:
        if not 0 <= background_index < counts.numel():
            raise InputError(f"background_index should be in 0..{counts.numel() - 1}, found {background_index}.")
        fg[background_index] = False
    fg_counts = counts[fg] + count_smoothing
    if (fg_counts < 0).any():
        raise InputError("class_counts must be non-negative.")
    if (fg_counts == 0).any() and rho > 0:
        missing = torch.nonzero(fg, as_tuple=True)[0][fg_counts == 0].tolist()
        one = len(missing) == 1
        raise InputError(
            f"class_counts: {len(missing)} of {counts.numel()} classes {'has' if one else 'have'} no training samples "
            f"({'class' if one else 'classes'} {some_of(missing)}), so {'its' if one else 'their'} GRW weight is infinite; "
            "add training samples or pass count_smoothing > 0 (disalign fit --count-smoothing)."
        )
    freq = fg_counts / fg_counts.sum()
    inv = freq.pow(-rho) if rho > 0 else torch.ones_like(freq)
    weights = torch.ones_like(counts)
    weights[fg] = inv / inv.sum() * fg.sum()
    return weights.to(torch.float32)


def grw_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i}: logits (N, K), labels (N,) int64, class_weights (K,) → scalar."""
    return F.cross_entropy(logits, labels, weight=class_weights)
