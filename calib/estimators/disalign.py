"""The DisAlign estimator: fits α, β and the confidence gate on a feature bank with the GRW loss.

    est = DisAlign(rho="auto").fit("train.h5", val="val.h5")
    est = DisAlign(rho=1.0).fit(features, logits, labels)       # arrays: class counts from the labels
    calibrated = est.predict_logits(features, logits)
    est.save("calib_dir"); est = DisAlign.load("calib_dir")

``rho="auto"`` fits one head per ρ of the grid in a single pass over the training bank (stacked
parameters, the same batches; each head's result is that of a fit of that ρ alone), scores each on the
clean view of the validation bank and keeps the best; the whole curve is stored in the artifact. Without a
validation bank, ``"auto"`` falls back to :data:`DEFAULT_RHO`.

How the validation bank chooses depends on the regime (:mod:`disalign.calib.core.regime`: the share of the
held-out error the training bank still shows). Where the training bank shows the bias, heads are scored by
validation NLL (``selection="auto"``) and trained on the training bank alone (``val_weight="regime"``).
Where it is memorised, the NLL after each candidate's own temperature scores them (plain NLL there punishes
α's logit scale, not the ranking), and cross-fitted validation rows join the fit (:data:`MEMORISED_VAL_WEIGHT_GRID`):
they are the only rows that show the bias. ``selection`` "nll", "temperature-nll" or "accuracy" and a
numeric or "auto" ``val_weight`` fix either choice. The suite numbers behind these defaults are in
docs/results.md.

The head follows the official code of each task (``head_form`` and ``gate`` "auto"): the residual form
with the constant gate init for classification, the paper's eq. (5) with an N(0, 0.01²) gate for RoI banks
and with a BN-standardised ReLU gate for pixel banks (see :mod:`disalign.calib.core.head`). The gate is trained in
standardised feature coordinates (``gate_standardize``) and stored in raw ones.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from disalign.calib.core.crossfit import HeadPlan, HeldOutRows
from disalign.calib.core.grw import grw_weights
from disalign.calib.core.head import (
    GATE_INITS,
    HEAD_FORMS,
    GateCoordinates,
    batch_norm,
    batch_norm_grads,
    confidence_gate,
    disalign_logits,
    fold_batch_norm,
    gate_input,
    grw_loss_and_grads,
    initial_parameters,
    linear_gate,
    linear_gate_grads,
)
from disalign.calib.core.regime import Regime, harder_views_warning, training_regime
from disalign.calib.core.training import RowSource, SGDRecipe, run_stacked_sgd
from disalign.calib.data.bank import Bank, BankReader, clean_labelled_rows, rows_digest
from disalign.calib.errors import DisalignWarning, InputError
from disalign.calib.estimators.base import Calibrator, as_bank, check_banks_agree, require_shape
from disalign.calib.estimators.baselines.common import check_grid

DEFAULT_RHO = 1.0
DEFAULT_RHO_GRID = tuple(i * 0.25 for i in range(13))  # 0, 0.25, …, 3
# What "auto" means per bank task: (head form, gate init), as the official code of each task.
OFFICIAL_HEADS = {"classification": ("residual", "constant"), "detection": ("blend", "normal"), "segmentation": ("blend", "bn-relu")}
LEGACY_HEAD = {"form": "residual", "gate": "constant"}  # artifacts written before the head was recorded
GATE_SAMPLE_ROWS = 4096  # training rows the gate coordinates, the BN init and the gate statistics are taken on
SATURATED = 1e-3  # σ(1 − σ) below this: the gate's gradient is gone on that row
# What the validation bank minimises / maximises when it picks a head; "auto": by the regime (module docstring).
SELECTIONS = ("auto", "nll", "temperature-nll", "accuracy")
VAL_WEIGHT_GRID = (0.0, 0.1, 0.3)  # val_weight="auto": the shares of validation rows cross-fitting chooses from
# val_weight="regime" (the default) on a memorised training bank: there the validation rows are the only ones that
# show the bias, and on the memorised stand-in of docs/results.md cross-fitting chose 0.5 from this grid.
MEMORISED_VAL_WEIGHT_GRID = (0.0, 0.1, 0.3, 0.5)
VAL_WEIGHT_CHOICES = ("regime", "auto")


class DisAlign(Calibrator):
    """Distribution alignment (Zhang et al., CVPR 2021) on cached stage-1 outputs.

    Hyper-parameters: ``rho`` (float or "auto"), ``rho_grid``, the SGD recipe (``epochs``, ``batch_size``,
    ``lr``, ``momentum``, ``weight_decay``, ``seed``), ``cosine`` (gate on L2-normalised features, for
    cosine classifiers), ``use_magnitude`` (α; "auto": on classification banks the validation bank chooses
    with or without, elsewhere with), ablation switches ``use_margin`` (β) and ``use_grw`` (False = plain CE), ``count_smoothing`` (added to every class count before GRW), ``head_form``
    ("auto", "residual" or "blend"), ``gate`` ("auto", "constant", "normal" or "bn-relu"),
    ``gate_standardize`` (train the gate on standardised features), ``selection`` ("auto", "nll",
    "temperature-nll" or "accuracy": what the validation bank picks by), ``val_weight`` (share λ of the loss
    carried by validation rows mixed into the fit: a number in [0, 1), "auto" (cross-fitted over
    :data:`VAL_WEIGHT_GRID`) or "regime" (module docstring); see :mod:`disalign.calib.core.crossfit`) and
    ``val_folds`` (its folds).
    """

    method = "disalign"
    streams_training_bank = True  # fit(max_memory=…) trains from disk in windows when the rows do not fit

    def __init__(
        self,
        rho: float | str = "auto",
        *,
        rho_grid: tuple[float, ...] | list[float] = DEFAULT_RHO_GRID,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        seed: int = 0,
        cosine: bool = False,
        use_magnitude: bool | str = "auto",
        use_margin: bool = True,
        use_grw: bool = True,
        count_smoothing: float = 0.0,
        head_form: str = "auto",
        gate: str = "auto",
        gate_standardize: bool = True,
        selection: str = "auto",
        val_weight: float | str = "regime",
        val_folds: int = 5,
    ):
        self.rho = rho
        self.rho_grid = rho_grid  # as given (scikit-learn's clone relies on it); checked by fit
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed
        self.cosine = cosine
        self.use_magnitude = use_magnitude
        self.use_margin = use_margin
        self.use_grw = use_grw
        self.count_smoothing = count_smoothing
        self.head_form = head_form
        self.gate = gate
        self.gate_standardize = gate_standardize
        self.selection = selection
        self.val_weight = val_weight
        self.val_folds = val_folds

    @property
    def recipe(self) -> SGDRecipe:
        return SGDRecipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, self.seed)

    @property
    def head_(self) -> dict[str, str]:
        """The head actually fitted: {"form": "residual"|"blend", "gate": "constant"|"normal"|"bn-relu"}."""
        self._check_fitted()
        return self.meta_.report.get("head", LEGACY_HEAD)

    # -- fitting --------------------------------------------------------------------------------
    def _fit_bank(self, train: Bank | str | os.PathLike, val: Bank | str | os.PathLike | None, *,
                  max_memory: int | None, progress: bool) -> DisAlign:
        """The contract's fit (:meth:`Calibrator.fit`); with ``max_memory`` (bytes) smaller than a bank file's
        row data, the training bank is streamed from disk in windows of chunks instead of loaded."""
        if max_memory is None or isinstance(train, Bank):
            return super()._fit_bank(train, val, max_memory=None, progress=progress)
        if max_memory <= 0:
            raise InputError(f"max_memory should be a positive number of bytes, found {max_memory}.")
        with BankReader(train) as reader:
            info = reader.info
            row_bytes = info.feature_dim * np.dtype(info.feature_dtype).itemsize + info.num_classes * 4
            if info.num_rows * row_bytes <= max_memory:
                return super()._fit_bank(reader.load(), val, max_memory=None, progress=progress)
            val_bank = as_bank(val, "val") if val is not None else None
            if val_bank is not None:
                check_banks_agree(info, val_bank.info, "val")
            labels = torch.from_numpy(reader.column("labels"))
            if not (labels >= 0).any():
                raise InputError(f"train bank {info.path} has no labelled rows (all labels are -1).")
            sample_index, view = torch.from_numpy(reader.column("sample_index")), torch.from_numpy(reader.column("view"))
            counts = info.class_counts
            if counts is None:
                clean = clean_labelled_rows(view, labels)
                counts = np.bincount(labels[clean].numpy(), minlength=info.num_classes).astype(np.int64)
            # Two windows live at once (one trains while the next is read), beside the gate's float32 sample
            # of training rows and one chunk being read (with its copy, and a margin of one more).
            sample_bytes = min(GATE_SAMPLE_ROWS, info.num_rows) * info.feature_dim * 4
            window_rows = max(info.chunk_rows, ((max_memory - sample_bytes) // row_bytes - 3 * info.chunk_rows) // 2)
            source = RowSource(reader=reader, window_rows=window_rows)
            params, report = self.fit_source(source, labels, sample_index, view, counts, info.background_index, val_bank, info.task,
                                             progress=progress)
            report["streamed"] = {"window_rows": window_rows, "max_memory": max_memory}
            self._set_fitted(info, counts, params, report)
            return self.fit_probability_calibration(val_bank) if val_bank is not None else self

    def _fit(self, train: Bank, val: Bank | None, *, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.fit_source(RowSource(bank=train), train.labels, train.sample_index, train.view,
                               train.training_class_counts(), train.info.background_index, val, train.info.task, progress=progress)

    def _resolve_head(self, task: str) -> tuple[str, str]:
        official_form, official_gate = OFFICIAL_HEADS.get(task, OFFICIAL_HEADS["classification"])
        form = official_form if self.head_form == "auto" else self.head_form
        gate = official_gate if self.gate == "auto" else self.gate
        if form not in HEAD_FORMS:
            raise InputError(f"head_form should be one of auto, {', '.join(HEAD_FORMS)}, found {self.head_form!r}.")
        if gate not in GATE_INITS:
            raise InputError(f"gate should be one of auto, {', '.join(GATE_INITS)}, found {self.gate!r}.")
        return form, gate

    def _rho_grid(self, has_val: bool) -> tuple[float, ...]:
        if not self.use_grw:
            return (0.0,)
        if isinstance(self.rho, str):
            if self.rho != "auto":
                raise InputError(f"rho should be a number >= 0 or 'auto', found {self.rho!r}.")
            return check_grid("rho_grid", self.rho_grid) if has_val else (DEFAULT_RHO,)
        return (float(self.rho),)

    def fit_source(
        self,
        source: RowSource,
        labels: torch.Tensor,
        sample_index: torch.Tensor,
        view: torch.Tensor,
        class_counts: np.ndarray,
        background_index: int | None,
        val: Bank | None,
        task: str = "classification",
        *,
        progress: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Fit every head of the plan (each ρ of the grid, and with ``val_weight`` each share of validation
        rows and fold) in one pass over any :class:`RowSource`; keep the head the validation bank prefers.
        A saturated gate is said in the report's ``warnings`` and as a :class:`DisalignWarning`."""
        start = time.perf_counter()
        form, gate = self._resolve_head(task)
        blend, relu = form == "blend", gate == "bn-relu"
        if self.selection not in SELECTIONS:
            raise InputError(f"selection should be one of {', '.join(SELECTIONS)}, found {self.selection!r}.")
        regime, fit_warnings = None, []
        if val is not None and task == "classification":
            # Measured on the stage-1 logits before any validation row joins the training rows.
            predicted, train_rows = source.predicted_classes(), clean_labelled_rows(view, labels)
            val_rows = clean_labelled_rows(val.view, val.labels)
            regime = training_regime(predicted[train_rows], labels[train_rows], val.logits[val_rows].argmax(1), val.labels[val_rows],
                                     len(class_counts))
            views = harder_views_warning(predicted, labels, view, regime.val_mean_class_accuracy, len(class_counts))
            fit_warnings += [views] if views else []
        selection = resolve_selection(self.selection, regime)
        val_weights = self._val_weights(val is not None, regime)
        if max(val_weights) > 0 and source.bank is None and self.val_weight == "regime":
            val_weights = (0.0,)
            fit_warnings.append("the training bank is memorised but streamed (--max-memory): the fit could not mix validation rows "
                                "into it (val_weight needs the training bank in memory); raise --max-memory to let it.")
        plan = HeadPlan.make(self._rho_grid(val is not None), val_weights, self.val_folds, self._magnitudes(val is not None, task))
        # (R, K) GRW weights; grw_weights validates every ρ before any time is spent on the fit.
        class_weights = {rho: grw_weights(class_counts, rho, background_index=background_index, count_smoothing=self.count_smoothing)
                         for rho in plan.rhos}
        generator = torch.Generator().manual_seed(self.seed)
        # The clean, labelled validation rows: what every head is scored on, and with val_weight trained on too.
        folds = torch.Generator().manual_seed(self.seed)  # its own stream: the training draws do not depend on val
        held_out = HeldOutRows.from_bank(val, self.val_folds if plan.mixes_val else 1, folds) if val is not None else None
        if plan.mixes_val:
            if source.bank is None:
                raise InputError("val_weight > 0 mixes validation rows into the fit and needs the training bank in memory; "
                                 "raise --max-memory or use val_weight 0.")
            source, labels, sample_index, view = held_out.appended_to(source.bank)
        row_weights = plan.row_weights(class_weights, labels, held_out if plan.mixes_val else None)  # rows → (R, B) loss weights
        sample = gate_input(source.sample_features(GATE_SAMPLE_ROWS, generator), cosine=self.cosine)
        coords = GateCoordinates.standardizing(sample) if self.gate_standardize else GateCoordinates.identity(source.feature_dim)
        params, init_gate = initial_heads(plan, len(class_counts), form, gate, coords, sample, generator)
        magnitude = plan.magnitudes  # (R,) heads without α: α' = 0 (ẑ = z + σβ), never trained
        frozen = tuple(name for name, on in (("alpha", bool(magnitude.any())), ("beta", self.use_margin)) if not on)

        def loss_and_grads(p, feats, logits, y, rows):
            x = gate_input(feats, cosine=self.cosine)
            u = linear_gate(x, *coords.to_raw(p["gate_weight"], p["gate_bias"]))  # (R, B)
            if relu:
                u, cache = batch_norm(u, p["bn_weight"], p["bn_bias"])
            losses, grads = grw_loss_and_grads(u, logits, y, p["alpha"], p["beta"], row_weights[rows], blend=blend,
                                               relu_gate=relu, background_index=background_index, magnitude=magnitude)
            # Heads without α keep it fixed: a gradient of −wd·α cancels SGD's weight decay exactly.
            grads["alpha"][~magnitude] = -self.weight_decay * p["alpha"][~magnitude]
            d_u = grads.pop("preactivation")
            if relu:
                d_u, grads["bn_weight"], grads["bn_bias"] = batch_norm_grads(d_u, p["bn_weight"], cache)
            grads["gate_weight"], grads["gate_bias"] = coords.grads_from_raw(*linear_gate_grads(x, d_u))
            return losses, grads

        history = run_stacked_sgd(params, loss_and_grads, source, labels, sample_index, view, self.recipe, frozen,
                                  progress=progress, description=f"DisAlign fit, {len(plan)} heads")
        raw_weight, raw_bias = raw_gates(params, coords, sample)
        heads = [{"alpha": params["alpha"][r], "beta": params["beta"][r], "gate_weight": raw_weight[r], "gate_bias": raw_bias[r]}
                 for r in range(len(plan))]
        scoring = {"cosine": self.cosine, "blend": blend, "relu_gate": relu, "background_index": background_index}
        curve = candidate_curve(plan, heads, history["loss"][-1], held_out, scoring)
        best = min(range(len(curve)), key=lambda i: selection_key(curve[i], selection))
        chosen_spec, chosen = plan.candidates()[best]
        final_gate = confidence_gate(sample, heads[chosen]["gate_weight"], heads[chosen]["gate_bias"], relu=relu)
        report: dict[str, Any] = {
            "rho": curve[best]["rho"], "rho_curve": curve, "epoch_seconds": history["seconds"],
            "train_loss": [epoch[chosen] for epoch in history["loss"]], "selection": selection,
            "head": {"form": form, "gate": gate}, "gate": gate_statistics(init_gate, final_gate),
        }
        trained_on_val = chosen_spec.val_weight > 0  # the grid may keep a head that never saw a validation row (λ = 0)
        if regime is not None:
            report["regime"] = {**regime.to_dict(), "sentence": regime.sentence(),
                                "recommendation": regime.recommendation(validation_rows_in_fit=trained_on_val)}
        if plan.mixes_val:
            report["val_weight"] = curve[best]["val_weight"]
        if trained_on_val:
            # The kept head trained on every validation row: eval scores it on this bank out of fold (report["validation"]).
            report["validation_rows_in_fit"] = {"rows": held_out.count, "digest": rows_digest(held_out.logits, held_out.labels)}
        report["magnitude"] = chosen_spec.magnitude
        if val is not None:
            report["validation"] = curve[best]
        warning = saturation_warning(report["gate"], standardized=self.gate_standardize)
        fit_warnings += [warning] if warning else []
        if fit_warnings:
            report["warnings"] = fit_warnings
            for text in fit_warnings:
                warnings.warn(text, DisalignWarning, stacklevel=2)
        report["fit_seconds"] = time.perf_counter() - start
        return heads[chosen], report

    def _magnitudes(self, has_val: bool, task: str) -> tuple[bool, ...]:
        if self.use_magnitude == "auto":
            # Classification: the validation bank decides whether α helps (it is K parameters fitted on logits
            # the stage-1 model memorised). Pixel and RoI banks keep α, as the official heads: there the
            # validation NLL is dominated by background and preferred no α while AP fell (docs/results.md).
            return (True, False) if has_val and task == "classification" else (True,)
        if not isinstance(self.use_magnitude, bool):
            raise InputError(f"use_magnitude should be True, False or 'auto', found {self.use_magnitude!r}.")
        return (self.use_magnitude,)

    def _val_weights(self, has_val: bool, regime: Regime | None = None) -> tuple[float, ...]:
        expected = "a number in [0, 1), 'regime' or 'auto'"
        if isinstance(self.val_weight, str):
            if self.val_weight not in VAL_WEIGHT_CHOICES:
                raise InputError(f"val_weight should be {expected}, found {self.val_weight!r}.")
            if self.val_weight == "regime":
                weights = MEMORISED_VAL_WEIGHT_GRID if has_val and regime is not None and regime.memorised else (0.0,)
            else:
                weights = VAL_WEIGHT_GRID if has_val else (0.0,)
        elif not 0 <= float(self.val_weight) < 1:
            raise InputError(f"val_weight should be {expected}, found {self.val_weight!r}.")
        elif float(self.val_weight) > 0 and not has_val:
            raise InputError("val_weight > 0 mixes validation rows into the fit: pass a validation bank.")
        else:
            weights = (float(self.val_weight),)
        if max(weights) > 0 and (not isinstance(self.val_folds, int) or self.val_folds < 2):
            raise InputError(f"val_folds should be an integer >= 2, found {self.val_folds!r}.")
        return weights

    # -- prediction -----------------------------------------------------------------------------
    def _predict_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p, head = self.params_, self.head_
        return disalign_logits(features, logits, p["alpha"], p["beta"], p["gate_weight"], p["gate_bias"], cosine=self.cosine,
                               blend=head["form"] == "blend", relu_gate=head["gate"] == "bn-relu",
                               background_index=self.meta_.background_index)

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """The gate σ(x) (N,) for features (N, d)."""
        self._check_fitted()
        return confidence_gate(features, self.params_["gate_weight"], self.params_["gate_bias"], cosine=self.cosine,
                               relu=self.head_["gate"] == "bn-relu")

    def _check_loaded_params(self) -> None:
        k, d, where = self.meta_.num_classes, self.meta_.feature_dim, "disalign calibration"
        for name, shape in (("alpha", (k,)), ("beta", (k,)), ("gate_weight", (d,)), ("gate_bias", ())):
            require_shape(self.params_, name, shape, where)


def initial_heads(plan: HeadPlan, num_classes: int, form: str, gate: str, coords: GateCoordinates, sample: torch.Tensor,
                  generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The R heads of ``plan`` at their official initialisation, the gate in ``coords``; and the initial gate
    on the ``sample`` of gate inputs (n,)."""
    init = initial_parameters(num_classes, sample.shape[1], form=form, gate=gate, generator=generator)
    raw_weight, raw_bias = raw_gates({name: t.unsqueeze(0) for name, t in init.items()}, GateCoordinates.identity(sample.shape[1]), sample)
    init_gate = confidence_gate(sample, raw_weight[0], raw_bias[0], relu=gate == "bn-relu")
    init["gate_weight"], init["gate_bias"] = coords.from_raw(init["gate_weight"], init["gate_bias"])
    params = {name: t.expand(len(plan), *t.shape).clone() for name, t in init.items()}  # (R, …)
    params["alpha"][~plan.magnitudes] = 1.0 if form == "blend" else 0.0  # α' = 0
    return params, init_gate


def candidate_curve(plan: HeadPlan, heads: list[dict[str, torch.Tensor]], final_losses: list[float], held_out: HeldOutRows | None,
                    scoring: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per choice the validation bank makes: its ρ (and magnitude, val_weight), final training loss
    and validation metrics — out of fold where the head trained on validation rows."""
    both = len(set(plan.magnitudes.tolist())) > 1
    curve = []
    for spec, index in plan.candidates():
        point: dict[str, Any] = {"rho": spec.rho, "train_loss": final_losses[index]}
        if both:
            point["magnitude"] = spec.magnitude
        if plan.mixes_val:
            point["val_weight"] = spec.val_weight
        if held_out is not None:
            if spec.val_weight > 0:  # scored out of fold: head f never saw the validation rows of fold f
                point.update(held_out.cross_fitted_scores(heads, plan, spec, scoring), cross_fitted=True)
            else:
                point.update(held_out.scores(heads[index], scoring))
        curve.append(point)
    return curve


def raw_gates(params: dict[str, torch.Tensor], coords: GateCoordinates, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The R trained gates as (v (R, d), c (R,)) on raw gate inputs; a BN gate is folded with the statistics of
    its pre-activation over the training ``sample`` (n, d), as BN runs in evaluation mode."""
    weight, bias = coords.to_raw(params["gate_weight"], params["gate_bias"])
    if "bn_weight" not in params:
        return weight, bias
    a = linear_gate(sample, weight, bias)
    return fold_batch_norm(weight, bias, params["bn_weight"], params["bn_bias"], a.mean(1), a.var(1, unbiased=False))


def resolve_selection(selection: str, regime: Regime | None) -> str:
    """The selection "auto" stands for: the NLL after each candidate's own temperature where the training bank
    is memorised (there plain NLL punishes α's logit scale, not the ranking the balanced metric sees), plain
    NLL elsewhere (docs/results.md, "How fit chooses")."""
    if selection != "auto":
        return selection
    return "temperature-nll" if regime is not None and regime.memorised else "nll"


def selection_key(point: dict[str, Any], selection: str) -> tuple[float, float]:
    """Smaller is better. "nll": validation NLL, ties broken by mean-class accuracy; "temperature-nll": the NLL
    after each candidate's own temperature (scale-free), the same tie-break; "accuracy": mean-class accuracy,
    ties broken by NLL. Without validation metrics every point ties (a single ρ)."""
    nll, accuracy = point.get("val_nll", 0.0), point.get("val_mean_class_accuracy", 0.0)
    if selection == "accuracy":
        return (-accuracy, nll)
    return (point.get("val_nll_tempered", 0.0) if selection == "temperature-nll" else nll, -accuracy)


def gate_statistics(initial: torch.Tensor, final: torch.Tensor) -> dict[str, float]:
    """Mean and std of the gate (N,) over the training sample at initialisation and at the end; the fraction
    of rows where it is saturated (σ(1 − σ) < 1e-3: no gradient, the head cannot adapt there) and where it
    is exactly 0.5 (a ReLU gate whose ReLU is inactive: also no gradient)."""
    def saturated(g: torch.Tensor) -> float:
        return float(((g * (1 - g)) < SATURATED).double().mean())

    def inactive(g: torch.Tensor) -> float:
        return float((g == 0.5).double().mean())

    return {"init_mean": float(initial.mean()), "init_std": float(initial.std(unbiased=False)), "init_saturated": saturated(initial),
            "init_inactive": inactive(initial), "final_mean": float(final.mean()), "final_std": float(final.std(unbiased=False)),
            "final_saturated": saturated(final), "final_inactive": inactive(final)}


def saturation_warning(stats: dict[str, float], *, standardized: bool = True) -> str | None:
    """One sentence when the fitted gate is saturated, collapsed or inactive on more than 99 % of the rows;
    it suggests standardised gate coordinates only to a fit that did not use them."""
    if stats["final_saturated"] > 0.99:
        state = "collapsed to 0" if stats["final_mean"] < 0.5 else "saturated at 1"
        share = stats["final_saturated"]
    elif stats["final_inactive"] > 0.99:
        state, share = "stuck at 0.5 (its ReLU is inactive)", stats["final_inactive"]
    else:
        return None
    return (f"the DisAlign gate is {state} on {share:.1%} of the training rows (mean {stats['final_mean']:.4f}): "
            "it no longer depends on the input; try another gate (--gate)"
            + ("." if standardized else " or standardised gate coordinates (without --no-gate-standardize)."))

