"""The DisAlign head: pure functions over tensors (references: cvpods ``DisAlignLinear``,
``DisAlignFastRCNNOutputLayers`` and the official ``DisAlignFCNHead``).

    σ(x)  = sigmoid(vᵀx + c)                        gate "linear" (x L2-normalised first for cosine heads)
    σ(x)  = sigmoid(ReLU(vᵀx + c))                  gate "relu" (segmentation: sigmoid(ReLU(BN(1×1 conv))),
                                                    BN folded into v and c once trained)
    ẑ     = z + σ(x)·(α⊙z + β)                      form "residual" = (1 + σα)⊙z + σβ (classification)
    ẑ     = σ(x)·(α⊙z + β) + (1 − σ(x))·z           form "blend", the paper's eq. (5) (detection, segmentation)
    ẑ_bg  = z_bg                                    the background logit of K+1-way heads is untouched

The two forms differ only in where α is measured from: blend α = residual α + 1. The official
initialisations (:func:`initial_parameters`): classification α = 1, β = 0, v = 0.1, c = 0 (the head starts at
(1 + σ)z); detection α = 1, β = 0, v ~ N(0, 0.01²), c = 0; segmentation α = 1, β = 0 and a BN-standardised
ReLU gate. Blend heads start as the identity.

Training runs R heads at once (a ρ grid): :func:`grw_loss_and_grads` takes stacked α, β (R, K) and each
head's gate pre-activation (R, B) and returns every head's loss and gradients from one read of the batch,
with a hand-written backward. The segmentation gate trains with BatchNorm on batch statistics, as the
official head does, and is folded with the population statistics afterwards (:func:`fold_batch_norm`). :class:`GateCoordinates` is the coordinate change the gate is trained in (standardised features),
folded back into raw-feature v and c, so prediction never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEAD_FORMS = ("residual", "blend")
GATE_INITS = ("constant", "normal", "bn-relu")  # cvpods DisAlignLinear, DisAlignFastRCNNOutputLayers, DisAlignFCNHead


def gate_input(features: torch.Tensor, dtype: torch.dtype = torch.float32, *, cosine: bool = False) -> torch.Tensor:
    """What the gate sees: features (N, d) in ``dtype``, L2-normalised for cosine heads."""
    x = features.to(dtype)
    return F.normalize(x, dim=1) if cosine else x


def confidence_gate(
    features: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, *, cosine: bool = False, relu: bool = False
) -> torch.Tensor:
    """σ(x) = sigmoid(vᵀx + c), or sigmoid(ReLU(vᵀx + c)) with ``relu``.

    features (N, d) any float dtype; gate_weight v (d,); gate_bias c () → (N,) in the dtype of v.
    """
    u = gate_input(features, gate_weight.dtype, cosine=cosine) @ gate_weight + gate_bias
    return torch.sigmoid(u.clamp_min(0) if relu else u)


def align_logits(
    logits: torch.Tensor,
    gate: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    blend: bool = False,
    background_index: int | None = None,
) -> torch.Tensor:
    """ẑ = z + σ·(α⊙z + β) (residual), or z + σ·((α − 1)⊙z + β) (blend, eq. (5)); background column as is.

    logits z (N, K); gate σ (N,); alpha α (K,); beta β (K,) → (N, K). Differentiable with autograd.
    """
    alpha, beta = effective_alpha_beta(alpha, beta, blend=blend, background_index=background_index)
    return torch.addcmul(logits, gate.unsqueeze(1), torch.addcmul(beta, alpha, logits))


def effective_alpha_beta(
    alpha: torch.Tensor, beta: torch.Tensor, *, blend: bool, background_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α', β) with ẑ = z + σ·(α'⊙z + β): α' = α − 1 for blend heads, α'_bg = β_bg = 0. Shapes (…, K)."""
    if blend:
        alpha = alpha - 1.0
    if background_index is not None:
        keep = torch.ones(alpha.shape[-1], dtype=alpha.dtype)
        keep[background_index] = 0.0
        alpha, beta = alpha * keep, beta * keep  # ⇒ ẑ_bg = z_bg exactly
    return alpha, beta


def disalign_logits(
    features: torch.Tensor,
    logits: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    cosine: bool = False,
    blend: bool = False,
    relu_gate: bool = False,
    background_index: int | None = None,
) -> torch.Tensor:
    """Calibrated logits from stage-1 features (N, d) and logits (N, K) → (N, K)."""
    gate = confidence_gate(features, gate_weight, gate_bias, cosine=cosine, relu=relu_gate)
    return align_logits(logits.to(alpha.dtype), gate, alpha, beta, blend=blend, background_index=background_index)


# Heads are processed in groups whose (heads, B, K) temporaries stay within about this many floats (8 MB):
# three such tensors then fit in a last-level cache, and a 26-head grid no longer streams 80 MB per batch.
HEAD_GROUP_FLOATS = 1 << 21


def grw_loss_and_grads(
    preactivation: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    blend: bool = False,
    relu_gate: bool = False,
    background_index: int | None = None,
    magnitude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted cross-entropy of R stacked heads and its gradients, in one pass over the batch.

    preactivation u (R, B): each head's gate before the sigmoid (σ = sigmoid(u), or sigmoid(ReLU(u)) with
    ``relu_gate``); logits z (B, K); labels y (B,); alpha, beta (R, K); row_weights w (R, B), e.g. the GRW
    weight of each row's class under head r's ρ. Returns the losses L_r = Σ_b w_rb ℓ_rb / Σ_b w_rb (R,) and
    {"alpha": dL/dα (R, K), "beta": dL/dβ (R, K), "preactivation": dL/du (R, B)}; the gate's own chain rule
    (:func:`linear_gate_grads`, :func:`batch_norm_grads`) takes it from there. Heads share nothing but the
    batch, so head r's numbers are those of a fit of head r alone.

    Backward by hand, with P = softmax(ẑ) and g = (P − onehot(y))·w/Σw:
    dα'_rk = Σ_b σ_rb g_rbk z_bk, dβ_rk = Σ_b σ_rb g_rbk, dσ_rb = Σ_k g_rbk (α'_rk z_bk + β_rk). Every sum
    over P is a batched matrix-vector product (P·β, (P⊙z)·α', (σg)ᵀP), so the (R, B, K) work is three
    written tensors (α'z + β, ẑ, P) and no autograd graph.

    ``magnitude`` (R,) bool marks the heads that have the magnitude term; the others have α' = 0, skip
    the P⊙z work and get dL/dα = 0 (α is not a parameter of theirs). Default: every head.
    """
    num_heads = row_weights.shape[0]
    flags = [True] * num_heads if magnitude is None else magnitude.tolist()
    group = max(1, HEAD_GROUP_FLOATS // max(1, logits.numel()))
    blocks, start = [], 0
    for end in range(1, num_heads + 1):  # runs of heads alike in magnitude, at most `group` long
        if end == num_heads or flags[end] != flags[start] or end - start == group:
            blocks.append((start, end, flags[start]))
            start = end
    parts = [_grw_loss_and_grads_block(preactivation[s:e], logits, labels, alpha[s:e], beta[s:e], row_weights[s:e], blend=blend,
                                       relu_gate=relu_gate, background_index=background_index, magnitude=m)
             for s, e, m in blocks]
    if len(parts) == 1:
        return parts[0]
    grads = {name: torch.cat([g[name] for _, g in parts]) for name in parts[0][1]}
    return torch.cat([loss for loss, _ in parts]), grads


def _grw_loss_and_grads_block(
    preactivation: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    blend: bool = False,
    relu_gate: bool = False,
    background_index: int | None = None,
    magnitude: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One group of heads of :func:`grw_loss_and_grads`, all with or all without the magnitude term."""
    num_heads, batch = row_weights.shape
    a_eff, b_eff = effective_alpha_beta(alpha, beta, blend=blend, background_index=background_index)
    gate = torch.sigmoid(preactivation.clamp_min(0) if relu_gate else preactivation)  # (R, B)
    if magnitude:
        t = torch.addcmul(b_eff.unsqueeze(1), a_eff.unsqueeze(1), logits)  # α'z + β (R, B, K)
        z_hat = torch.addcmul(logits, gate.unsqueeze(2), t)
        del t
    else:  # α' = 0: ẑ = z + σβ
        a_eff = torch.zeros_like(a_eff)
        z_hat = torch.addcmul(logits, gate.unsqueeze(2), b_eff.unsqueeze(1))
    prob = torch.softmax(z_hat, dim=2)  # (R, B, K)
    coef = row_weights / row_weights.sum(1, keepdim=True)  # (R, B)
    index = labels.expand(num_heads, batch).unsqueeze(2)
    p_label = prob.gather(2, index).squeeze(2)
    log_p = p_label.log()
    tiny = p_label < 1e-30  # log P underflows: exact log-softmax for those rows only
    if bool(tiny.any()):
        log_p[tiny] = torch.log_softmax(z_hat[tiny], dim=1).gather(1, index.squeeze(2)[tiny].unsqueeze(1)).squeeze(1)
    del z_hat
    loss = -(coef * log_p).sum(1)

    z_label = logits.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B,)
    sc = gate * coef  # σ_rb w_rb/Σw (R, B)
    # Row-vector products (R, 1, ·) @ (R, ·, ·): batched gemv this way round is ~10× faster than (R, B, K) @ (R, K, 1).
    p_beta = torch.bmm(b_eff.unsqueeze(1), prob.transpose(1, 2)).squeeze(1)  # Σ_k P β (R, B)
    d_beta = torch.bmm(sc.unsqueeze(1), prob).squeeze(1)  # Σ_b σ w P (R, K)
    y = labels.expand(num_heads, batch)
    t_label = a_eff.gather(1, y) * z_label + b_eff.gather(1, y)  # (α'z + β) at the label (R, B)
    if magnitude:
        prob.mul_(logits)  # P ⊙ z from here on
        pz_alpha = torch.bmm(a_eff.unsqueeze(1), prob.transpose(1, 2)).squeeze(1)  # Σ_k P z α'
        d_alpha = torch.bmm(sc.unsqueeze(1), prob).squeeze(1)  # Σ_b σ w P z
        d_alpha.scatter_add_(1, y, -sc * z_label)
        d_gate = coef * (p_beta + pz_alpha - t_label)
    else:
        d_alpha = torch.zeros_like(alpha)
        d_gate = coef * (p_beta - t_label)
    del prob
    d_beta.scatter_add_(1, y, -sc)
    if background_index is not None:
        d_alpha[:, background_index] = 0.0
        d_beta[:, background_index] = 0.0
    d_u = d_gate * gate * (1.0 - gate)
    if relu_gate:
        d_u = d_u * (preactivation > 0)
    return loss, {"alpha": d_alpha, "beta": d_beta, "preactivation": d_u}


def linear_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u = Vx + c for R heads: x (B, d), weight V (R, d), bias c (R,) → (R, B)."""
    return torch.addmm(bias.unsqueeze(1), weight, x.T)


def linear_gate_grads(x: torch.Tensor, d_preactivation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dV (R, d), dL/dc (R,)) from dL/du (R, B) and x (B, d)."""
    return d_preactivation @ x, d_preactivation.sum(1)


BN_EPS = 1e-5  # torch.nn.BatchNorm's, as mmcv's ConvModule


def batch_norm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """BatchNorm in training mode over the batch, per head: u = γ·(a − mean_B a)/√(var_B a + ε) + b.

    a (R, B), weight γ (R,), bias b (R,) → (u (R, B), cache for :func:`batch_norm_grads`).
    """
    centred = a - a.mean(1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(1, keepdim=True) + BN_EPS)
    normalised = centred * inv_std
    return torch.addcmul(bias.unsqueeze(1), weight.unsqueeze(1), normalised), (normalised, inv_std)


def batch_norm_grads(
    d_u: torch.Tensor, weight: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/da (R, B), dL/dγ (R,), dL/db (R,)) from dL/du (R, B): the batch-statistics backward of BatchNorm."""
    normalised, inv_std = cache
    d_norm = d_u * weight.unsqueeze(1)
    d_a = inv_std * (d_norm - d_norm.mean(1, keepdim=True) - normalised * (d_norm * normalised).mean(1, keepdim=True))
    return d_a, (d_u * normalised).sum(1), d_u.sum(1)


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in evaluation mode folded into the linear map before it: γ(Vx + c − μ)/√(σ² + ε) + b = V'x + c'.

    weight V (R, d), bias c (R,), bn_weight γ, bn_bias b, mean μ and var σ² of Vx + c over the data (R,).
    """
    scale = bn_weight * torch.rsqrt(var + BN_EPS)
    return weight * scale.unsqueeze(1), bn_bias + (bias - mean) * scale


@dataclass(frozen=True)
class GateCoordinates:
    """The coordinates the gate is trained in: x̃ = (x − mean) ⊙ scale, mean and scale (d,).

    With scale = 1/(std·√d), E‖x̃‖² ≈ 1: an SGD step moves vᵀx̃ about as much as it moves c, whatever the
    features' norm (on raw ReLU features the step on vᵀx scales with ‖x‖², which saturates or collapses
    the gate). vᵀx̃ + c = (v⊙scale)ᵀx + (c − (v⊙scale)ᵀmean), so the trained gate is stored in raw
    coordinates. A dimension constant on the sample has scale 0 (its value lives in c).
    """

    mean: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def identity(cls, feature_dim: int) -> GateCoordinates:
        return cls(torch.zeros(feature_dim), torch.ones(feature_dim))

    @classmethod
    def standardizing(cls, sample: torch.Tensor) -> GateCoordinates:
        """From a sample of gate inputs (n, d): per-dimension mean, scale 1/(std·√d)."""
        var, mean = torch.var_mean(sample.float(), dim=0, unbiased=False)
        std = var.sqrt()
        live = std > 1e-6 * float(std.max().clamp_min(1e-30))
        scale = torch.where(live, 1.0 / (std.clamp_min(1e-30) * math.sqrt(sample.shape[1])), torch.zeros_like(std))
        return cls(mean, scale)

    def to_raw(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v (R, d), c (R,)) in these coordinates → the same gate on raw inputs."""
        raw = weight * self.scale
        return raw, bias - raw @ self.mean

    def from_raw(self, raw_weight: torch.Tensor, raw_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_raw` on the inputs the coordinates were made from."""
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        weight = torch.where(self.scale > 0, raw_weight / safe, torch.zeros_like(raw_weight))
        return weight, raw_bias + raw_weight @ self.mean

    def grads_from_raw(self, d_raw_weight: torch.Tensor, d_raw_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chain rule through :meth:`to_raw`: dL/dv = scale ⊙ (dL/dv_raw − dL/dc_raw · mean), dL/dc = dL/dc_raw."""
        return self.scale * (d_raw_weight - d_raw_bias.unsqueeze(-1) * self.mean), d_raw_bias


def initial_parameters(
    num_classes: int, feature_dim: int, *, form: str = "residual", gate: str = "constant", generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The official initialisation in raw coordinates: α (K,), β (K,), v (d,), c (), and for the BN gate γ (), b ().

    α = 1, β = 0 for both forms. Gate ``constant``: v = 0.1, c = 0; ``normal``: v ~ N(0, 0.01²) from
    ``generator``, c = 0; ``bn-relu``: the 1×1 conv of mmcv's ConvModule (no bias, Kaiming normal with fan-out
    1: std √2) and BN's γ = 1, b = 0 (BN standardises vᵀx, so the conv's scale does not matter).
    """
    if form not in HEAD_FORMS:
        raise ValueError(f"form should be one of {HEAD_FORMS}, found {form!r}")
    params = {"alpha": torch.ones(num_classes), "beta": torch.zeros(num_classes), "gate_bias": torch.zeros(())}
    if gate == "constant":
        params["gate_weight"] = torch.full((feature_dim,), 0.1)
    elif gate == "normal":
        params["gate_weight"] = torch.randn(feature_dim, generator=generator) * 0.01
    elif gate == "bn-relu":
        params.update(gate_weight=torch.randn(feature_dim, generator=generator) * math.sqrt(2.0),
                      bn_weight=torch.ones(()), bn_bias=torch.zeros(()))
    else:
        raise ValueError(f"gate should be one of {GATE_INITS}, found {gate!r}")
    return params
