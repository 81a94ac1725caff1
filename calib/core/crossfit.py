"""Validation rows inside the DisAlign fit, chosen by cross-fitting on the validation bank itself.

The training bank's logits come from the images the stage-1 model was trained on, so they are more
confident than any test image's; the validation bank is held out and has the test distribution, but is
small. With ``val_weight`` λ > 0 the loss is (1 − λ)·GRW-CE(train rows) + λ·CE(clean validation rows)
(validation sets are balanced, so their rows are not re-weighted). The ρ and λ of such a fit cannot be
chosen on rows it trained on: the validation rows are split into F class-stratified folds, and for every
(ρ, λ) F + 1 heads train together in the same pass, head f without fold f and the last one with every
validation row. The pooled out-of-fold predictions of heads 0 … F−1 score (ρ, λ); the last head is the one
kept (cross-fitting, as in K-fold cross-validation followed by a refit on all the data).

:class:`HeadPlan` lists the stacked heads and gives each training row its weight for each head;
:class:`HeldOutRows` holds the validation rows, their folds, and scores heads out of fold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from disalign.calib.core.head import disalign_logits
from disalign.calib.core.label_shift import fit_temperature
from disalign.calib.core.metrics import mean_class_accuracy
from disalign.calib.core.training import RowSource
from disalign.calib.data.bank import Bank, clean_labelled_rows


@dataclass(frozen=True)
class HeadSpec:
    """One stacked head: its ρ, whether it has the magnitude term α, the share λ of the loss carried by
    validation rows, and the validation fold it leaves out (None: it trains on every validation row; that
    head is the one a fit can keep)."""

    rho: float
    val_weight: float = 0.0
    fold: int | None = None
    magnitude: bool = True


@dataclass(frozen=True)
class HeadPlan:
    """The heads one fit trains together, in order."""

    specs: tuple[HeadSpec, ...]

    @classmethod
    def make(cls, rhos: tuple[float, ...], val_weights: tuple[float, ...] = (0.0,), folds: int = 0,
             magnitudes: tuple[bool, ...] = (True,)) -> HeadPlan:
        specs = []
        for magnitude in magnitudes:
            for rho in rhos:
                for share in val_weights:
                    specs.append(HeadSpec(rho, share, None, magnitude))
                    if share > 0:
                        specs.extend(HeadSpec(rho, share, fold, magnitude) for fold in range(folds))
        return cls(tuple(specs))

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def rhos(self) -> tuple[float, ...]:
        return tuple(dict.fromkeys(spec.rho for spec in self.specs))

    @property
    def mixes_val(self) -> bool:
        return any(spec.val_weight > 0 for spec in self.specs)

    @property
    def magnitudes(self) -> torch.Tensor:
        """(R,) bool: which heads train the magnitude term α."""
        return torch.tensor([spec.magnitude for spec in self.specs])

    def candidates(self) -> list[tuple[HeadSpec, int]]:
        """(spec, index) of the heads trained on every validation row: the choices the validation bank makes."""
        return [(spec, i) for i, spec in enumerate(self.specs) if spec.fold is None]

    def index(self, spec: HeadSpec) -> int:
        return self.specs.index(spec)

    def row_weights(self, class_weights: dict[float, torch.Tensor], labels: torch.Tensor, held_out: HeldOutRows | None) -> RowWeights:
        """The loss weight of every row for every head, as a :class:`RowWeights` (O(R·K) memory, not O(R·N)).

        λ = 0: the GRW weight of the row's class, w_ρ(y). λ > 0: training rows (1 − λ)·w_ρ(y)·N_train/Σw_ρ and the
        validation rows the head may see λ·N_train/n_seen, so validation rows carry the share λ of the loss.
        ``labels`` (N,): the training rows' labels, then the ``held_out.count`` validation rows'.
        """
        n_val = held_out.count if held_out is not None else 0
        train_labels = labels[: labels.numel() - n_val]
        labelled = train_labels[train_labels >= 0]
        per_class = torch.zeros(len(self.specs), len(next(iter(class_weights.values()))))
        val_weight, left_out = torch.zeros(len(self.specs)), torch.full((len(self.specs),), -1, dtype=torch.long)
        for r, spec in enumerate(self.specs):
            w = class_weights[spec.rho]
            if spec.val_weight == 0:
                per_class[r] = w
                continue
            assert held_out is not None
            per_class[r] = (1 - spec.val_weight) * w * (labelled.numel() / float(w[labelled].sum()))
            seen = int((held_out.fold != spec.fold).sum()) if spec.fold is not None else n_val
            val_weight[r] = spec.val_weight * labelled.numel() / seen
            left_out[r] = -1 if spec.fold is None else spec.fold
        fold = held_out.fold if held_out is not None else torch.zeros(0, dtype=torch.long)
        return RowWeights(per_class, val_weight, left_out, train_labels.numel(), torch.cat([train_labels.clamp_min(0), fold]))


@dataclass(frozen=True)
class RowWeights:
    """Loss weights of rows for R heads: a training row of class y weighs ``per_class[r, y]``; a validation row
    (index ≥ ``num_train``) weighs ``val_weight[r]``, or 0 for the head that leaves its fold out."""

    per_class: torch.Tensor  # (R, K)
    val_weight: torch.Tensor  # (R,)
    left_out: torch.Tensor  # (R,) the fold each head leaves out, -1 for none
    num_train: int
    key: torch.Tensor  # (N,) a training row's class, then a validation row's fold

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """Weights (R, B) of the rows at indices ``rows`` (B,)."""
        key = self.key[rows]
        is_val = rows >= self.num_train
        # A validation row's key is its fold, not a class: look up class 0 for it (overwritten below). Indexing
        # with the fold itself ran past the K columns when there are more folds than classes.
        weights = self.per_class[:, torch.where(is_val, 0, key)]  # right for training rows
        if bool(is_val.any()):
            fold = key[is_val]
            weights[:, is_val] = self.val_weight.unsqueeze(1) * (fold.unsqueeze(0) != self.left_out.unsqueeze(1))
        return weights


@dataclass(frozen=True)
class HeldOutRows:
    """The clean, labelled validation rows: features (n, d) float32, logits (n, K), labels (n,), fold (n,) int64."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    fold: torch.Tensor

    @classmethod
    def from_bank(cls, val: Bank, folds: int, generator: torch.Generator) -> HeldOutRows:
        """Clean view, labelled rows; folds stratified by class (each class's rows dealt round-robin in random order)."""
        rows = torch.nonzero(clean_labelled_rows(val.view, val.labels), as_tuple=True)[0]
        labels = val.labels[rows]
        fold = torch.zeros_like(labels)
        for c in torch.unique(labels).tolist() if folds > 1 else ():
            members = torch.nonzero(labels == c, as_tuple=True)[0]
            members = members[torch.randperm(members.numel(), generator=generator)]
            fold[members] = torch.arange(members.numel()) % folds
        return cls(val.features[rows].float(), val.logits[rows], labels, fold)

    @property
    def count(self) -> int:
        return int(self.labels.numel())

    def appended_to(self, train: Bank) -> tuple[RowSource, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A source over the training rows followed by these rows (each its own image, view 0), with the
        labels, sample_index and view (N_train + n,) an epoch is drawn from."""
        sample_index = torch.cat([train.sample_index, int(train.sample_index.max()) + 1 + torch.arange(self.count)])
        view = torch.cat([train.view, torch.zeros(self.count, dtype=train.view.dtype)])
        labels = torch.cat([train.labels, self.labels])
        both = Bank(torch.cat([train.features, self.features.to(train.features.dtype)]), torch.cat([train.logits, self.logits]),
                    labels, sample_index, view, train.info)
        return RowSource(bank=both), labels, sample_index, view

    def scores(self, head: dict[str, torch.Tensor], scoring: dict[str, Any]) -> dict[str, float]:
        """Validation metrics of one head on these rows."""
        z = disalign_logits(self.features, self.logits, head["alpha"], head["beta"], head["gate_weight"], head["gate_bias"], **scoring)
        return logit_scores(z, self.labels)

    def cross_fitted_scores(self, heads: list[dict[str, torch.Tensor]], plan: HeadPlan, spec: HeadSpec,
                            scoring: dict[str, Any]) -> dict[str, float]:
        """Validation metrics of a choice (ρ, λ, …) from out-of-fold predictions: each row scored by the head
        that never saw it."""
        z = torch.empty_like(self.logits)
        for fold in torch.unique(self.fold).tolist():
            rows = self.fold == fold
            head = heads[plan.index(replace(spec, fold=fold))]
            z[rows] = disalign_logits(self.features[rows], self.logits[rows], head["alpha"], head["beta"], head["gate_weight"],
                                      head["gate_bias"], **scoring)
        return logit_scores(z, self.labels)


def logit_scores(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Validation metrics of calibrated logits (N, K) against labels (N,) (NLL in float32: scoring a 13-head
    grid on 20,000 rows × 1,000 classes in float64 took longer than an epoch of the fit).

    ``val_nll_tempered`` is the NLL after this candidate's own temperature (``val_temperature``, fitted on the
    same rows): NLL with the logit scale taken out. A head with α rescales the logits; on a stage-1 model that
    memorised its training set plain NLL punishes that scale, which the probability calibration run after
    the fit removes anyway, while the balanced metric only sees the ranking.
    """
    predicted = z.argmax(1)
    temperature = fit_temperature(z, y)
    return {"val_mean_class_accuracy": mean_class_accuracy(predicted, y, z.shape[1]),
            "val_accuracy": float((predicted == y).double().mean()),
            "val_nll": float(F.cross_entropy(z, y)),
            "val_nll_tempered": float(F.cross_entropy(z / temperature, y)),
            "val_temperature": temperature}
