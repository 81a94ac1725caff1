"""The regime a post-hoc fit works in: how much of the test-time bias the training bank still shows.

DisAlign, LWS and cRT learn the correction from the training bank's logits. Those logits come from the
images the stage-1 model was trained on: when it has memorised them, nearly every training row is right,
tail classes included, and the bias that hurts the test set (tail images scored as head classes) is not
there to be learned. The measure is the share of the held-out error the training bank still shows,

    visible share = (1 − train mean-class accuracy) / (1 − validation mean-class accuracy),

both of the stage-1 logits, on clean labelled rows. Mean-class accuracy weighs every class alike, so a
long-tailed training bank does not hide its tail errors behind its head classes. On the suite of shared
models (docs/results.md): IR50 linear (93.4 % training top-1) 0.46, IR100 linear stopped early 0.80,
IR10 cosine stopped early 0.95. Below :data:`MEMORISED_BELOW` the training bank shows less than a third
of the bias: the regime is called memorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disalign.calib.core.metrics import mean_class_accuracy

MEMORISED_BELOW = 0.35  # visible share under which the training bank is called memorised
VIEW_GAP = 0.10  # augmented views this much less accurate (mean-class) than held-out images: a different distribution


@dataclass(frozen=True)
class Regime:
    """What the stage-1 logits of the training and validation banks say about the fit's regime."""

    train_mean_class_accuracy: float
    val_mean_class_accuracy: float
    visible_share: float  # (1 − train mean-class accuracy) / (1 − val mean-class accuracy), clipped at 0

    @property
    def memorised(self) -> bool:
        return self.visible_share < MEMORISED_BELOW

    @property
    def name(self) -> str:
        return "memorised" if self.memorised else "bias-visible"

    def to_dict(self) -> dict:
        return {"name": self.name, "train_mean_class_accuracy": self.train_mean_class_accuracy,
                "val_mean_class_accuracy": self.val_mean_class_accuracy, "visible_share": self.visible_share,
                "memorised_below": MEMORISED_BELOW}

    def sentence(self) -> str:
        """One sentence: the regime and what it means for methods fitted on the training bank."""
        errors = (f"the stage-1 model's mean-class error is {100 * (1 - self.train_mean_class_accuracy):.1f} % on the training bank "
                  f"against {100 * (1 - self.val_mean_class_accuracy):.1f} % on the validation bank, "
                  f"so the training bank shows {100 * self.visible_share:.0f} % of the bias")
        if self.memorised:
            return (f"regime: memorised — {errors}; methods fitted on the training bank (DisAlign, LWS, cRT) "
                    "cannot see the test-time bias there.")
        return f"regime: bias visible — {errors}, and methods fitted on the training bank (DisAlign, LWS, cRT) can learn it."

    def recommendation(self, *, validation_rows_in_fit: bool = False) -> str:
        """One sentence: what to do in this regime (docs/results.md, "How fit chooses"), given whether the fit
        already trained on (cross-fitted) validation rows."""
        if not self.memorised:
            return "recommendation: the default fit (DisAlign on the training bank, rho and alpha chosen on the validation bank)."
        if validation_rows_in_fit:
            return ("recommendation: the fit trained on cross-fitted validation rows, the only ones that show the bias here, "
                    "so the more of them the better; disalign eval compares it with logit adjustment.")
        return ("recommendation: give the fit held-out rows (disalign fit --val-weight regime, the default, trains on "
                "cross-fitted validation rows of --val) and compare with logit adjustment in disalign eval.")


def training_regime(train_predicted: torch.Tensor, train_labels: torch.Tensor, val_predicted: torch.Tensor,
                    val_labels: torch.Tensor, num_classes: int) -> Regime:
    """The regime from the stage-1 model's predicted classes (argmax of its logits) on the training (N,) and
    validation (M,) banks' clean labelled rows, labels (N,) and (M,) int64 in [0, K). A validation bank without
    errors gives a visible share of 1: nothing is hidden."""
    train_accuracy = mean_class_accuracy(train_predicted, train_labels, num_classes)
    val_accuracy = mean_class_accuracy(val_predicted, val_labels, num_classes)
    val_error = 1.0 - val_accuracy
    share = 1.0 if val_error <= 0 else max(0.0, 1.0 - train_accuracy) / val_error
    return Regime(train_accuracy, val_accuracy, share)


def harder_views_warning(train_predicted: torch.Tensor, train_labels: torch.Tensor, train_view: torch.Tensor,
                         val_mean_class_accuracy: float, num_classes: int) -> str | None:
    """One sentence when the augmented views of a training bank (view >= 1) are much harder for the stage-1 model
    than held-out images (mean-class accuracy more than :data:`VIEW_GAP` below the validation bank's), else None.
    predicted, labels, view (N,) int64 over the training rows.

    Such views are another distribution: the fit learns the correction they need, not the test images'. At
    32 px the official stage-2 views (random resized crops down to 8 % of the image) cut the suite's IR100
    model from 66 % to 33 % and its DisAlign from 69.4 to 65.5 (docs/results.md)."""
    augmented = (train_view > 0) & (train_labels >= 0)
    if not bool(augmented.any()):
        return None
    accuracy = mean_class_accuracy(train_predicted[augmented], train_labels[augmented], num_classes)
    if accuracy >= val_mean_class_accuracy - VIEW_GAP:
        return None
    return (f"the augmented views of the training bank are much harder for the stage-1 model than held-out images "
            f"(mean-class accuracy {100 * accuracy:.1f} % against {100 * val_mean_class_accuracy:.1f} % on the validation bank): "
            "the fit learns a correction for them that test images do not need; extract milder or fewer views (docs/extract.md).")
