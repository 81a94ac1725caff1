"""The DisAlign head: pure functions over tensors (reference: cvpods ``DisAlignLinear``).

    σ(x)  = sigmoid(vᵀx + c)                       (x L2-normalised first for cosine heads)
    ẑ_j   = (1 + σ(x)·α_j)·z_j + σ(x)·β_j          for every class j except ``background_index``
    ẑ_bg  = z_bg                                    (the background logit of K+1-way heads is untouched)

Initialisation (as the reference): α = 1, β = 0, v = 0.1, c = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confidence_gate(features: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, *, cosine: bool = False) -> torch.Tensor:
    """σ(x) = sigmoid(vᵀx + c).

    features (N, d) any float dtype; gate_weight v (d,); gate_bias c () → (N,) in the dtype of v.
    With ``cosine`` the features are L2-normalised first (DisAlign on cosine classifiers).
    """
    x = features.to(gate_weight.dtype)
    if cosine:
        x = F.normalize(x, dim=1)
    return torch.sigmoid(x @ gate_weight + gate_bias)


def align_logits(
    logits: torch.Tensor,
    gate: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    background_index: int | None = None,
) -> torch.Tensor:
    """ẑ = (1 + σ·α) ⊙ z + σ·β with the background column (if any) left as is.

    logits z (N, K); gate σ (N,); alpha α (K,); beta β (K,) → (N, K).
    """
    if background_index is not None:
        keep = torch.ones_like(alpha)
        keep[background_index] = 0.0
        alpha, beta = alpha * keep, beta * keep  # α_bg = β_bg = 0 ⇒ ẑ_bg = z_bg exactly
    if torch.is_grad_enabled() and any(t.requires_grad for t in (logits, gate, alpha, beta)):
        return _Align.apply(logits, gate, alpha, beta)
    # Prediction: the same two fused ops without the autograd.Function call (≈50 µs per call, a serving hot path).
    return torch.addcmul(logits, gate.unsqueeze(1), torch.addcmul(beta, alpha, logits))


class _Align(torch.autograd.Function):
    """ẑ = z + σ⊙(α⊙z + β) (= (1 + σα)⊙z + σβ) with a hand-written backward: the fit's hot path.

    Autograd would keep and traverse five (N, K) intermediates; here the forward makes two and the
    backward one plus three matrix-vector products. The gradient for z is computed only when asked
    (stage-1 logits are frozen during a fit).
    """

    @staticmethod
    def forward(ctx, logits, gate, alpha, beta):
        t = torch.addcmul(beta, alpha, logits)  # α⊙z + β, (N, K)
        ctx.save_for_backward(logits, gate, alpha, t)
        return torch.addcmul(logits, gate.unsqueeze(1), t)

    @staticmethod
    def backward(ctx, grad):  # grad: dL/dẑ (N, K)
        logits, gate, alpha, t = ctx.saved_tensors
        d_gate = torch.einsum("nk,nk->n", grad, t) if ctx.needs_input_grad[1] else None
        d_alpha = (grad * logits).T @ gate if ctx.needs_input_grad[2] else None  # Σ_n σ_n g_nk z_nk
        d_beta = grad.T @ gate if ctx.needs_input_grad[3] else None  # Σ_n σ_n g_nk
        d_logits = grad + grad * (gate.unsqueeze(1) * alpha) if ctx.needs_input_grad[0] else None
        return d_logits, d_gate, d_alpha, d_beta


def disalign_logits(
    features: torch.Tensor,
    logits: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    cosine: bool = False,
    background_index: int | None = None,
) -> torch.Tensor:
    """Calibrated logits from stage-1 features (N, d) and logits (N, K) → (N, K)."""
    gate = confidence_gate(features, gate_weight, gate_bias, cosine=cosine)
    return align_logits(logits.to(alpha.dtype), gate, alpha, beta, background_index=background_index)


def initial_parameters(num_classes: int, feature_dim: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The reference initialisation: α = 1 (K,), β = 0 (K,), v = 0.1 (d,), c = 0 ()."""
    return {
        "alpha": torch.ones(num_classes, dtype=dtype),
        "beta": torch.zeros(num_classes, dtype=dtype),
        "gate_weight": torch.full((feature_dim,), 0.1, dtype=dtype),
        "gate_bias": torch.zeros((), dtype=dtype),
    }
