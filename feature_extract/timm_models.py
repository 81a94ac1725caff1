"""``--model timm:<name>``: a timm architecture, its classifier and its preprocessing, from timm's own API.

    disalign extract --model timm:convnext_atto --weights convnext_atto.safetensors --model-arg num_classes=10 …

- The module is ``timm.create_model(name, pretrained=False, **model_args)`` (``--model-arg KEY=VALUE``:
  ``num_classes``, ``drop_path_rate``, ``pretrained_cfg_overlay`` …; ``pretrained=true`` takes timm's
  weights from the local Hugging Face cache, where it has them); ``--weights`` is a state_dict file.
- The classifier is ``model.get_classifier()``: the features are its input, which for timm models is
  ``forward_head(forward_features(x), pre_logits=True)``; the logits are the model output.
- The preprocessing is timm's resolved data config (``timm.data.resolve_model_data_config``), mapped to
  :class:`~.preprocess.Preprocessing` as timm's eval transform does it (:func:`timm_preprocessing`).

A factory (``package.module:function``) that returns a timm model gets the same classifier and
preprocessing (:func:`is_timm_model`). timm is an optional extra, imported only here and only when used.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from torch import nn

from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import INTERPOLATIONS, Preprocessing

PREFIX = "timm:"


def _timm(spec: str):
    try:
        import timm
    except ImportError as exc:
        raise ExtractError(f"--model {spec} needs the optional dependency timm; install it with pip install 'disalign[timm]'.") from exc
    return timm


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` is a timm model (it carries timm's ``pretrained_cfg`` and ``get_classifier``)."""
    return callable(getattr(module, "get_classifier", None)) and isinstance(getattr(module, "pretrained_cfg", None), dict)


def build(name: str, model_args: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_args)``; one sentence for an unknown name or refused arguments."""
    spec = PREFIX + name
    timm = _timm(spec)
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ExtractError(f"--model {spec} is not a timm architecture; {hint}timm.list_models('{name[:4]}*') lists the names.")
    try:
        return timm.create_model(name, **{"pretrained": False, **model_args})
    except TypeError as exc:
        raise ExtractError(f"--model {spec}: timm.create_model refused the --model-arg values {sorted(model_args)} ({exc}).") from exc
    except (RuntimeError, OSError, ValueError) as exc:  # e.g. pretrained=true without the weights in the local cache
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"--model {spec}: timm.create_model failed ({first}); for local weights pass --weights FILE "
                           "instead of pretrained=true.") from exc


def classifier(module: nn.Module, spec: str) -> nn.Linear:
    """``module.get_classifier()`` when it is one linear layer; else one sentence with the fix."""
    head = module.get_classifier()
    if isinstance(head, tuple | list):  # distilled models: (head, head_dist), averaged in eval
        raise ExtractError(f"--model {spec} has {len(head)} classifiers (get_classifier() returns {len(head)} layers, as distilled "
                           "models do), so its logits are not one layer's output; pass --classifier-layer NAME for the one to use.")
    if not isinstance(head, nn.Linear):
        name = next((n for n, m in module.named_modules() if m is head), "?")
        raise ExtractError(f"--model {spec}: its classifier get_classifier() ('{name}') is a {type(head).__name__}, not an "
                           "nn.Linear (num_classes=0 removes it); pass --classifier-layer NAME of the final linear layer.")
    return head


def timm_preprocessing(config: dict[str, Any], spec: str) -> Preprocessing:
    """timm's data config → the same eval transform as ``timm.data.transforms_imagenet_eval``.

    ``crop_mode`` "center" with a square ``input_size`` (H, H): shorter side resized to ⌊H / crop_pct⌋,
    centre crop H. "squash" with crop_pct 1: a straight resize to (H, W). Anything else (a non-square
    centre crop, "border", another filter) has no equivalent here and is refused: pass a --card.
    """
    _, height, width = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct") or 0.875)
    mode = config.get("crop_mode") or "center"
    interpolation = config.get("interpolation") or "bicubic"
    fix = "pass a --card with the input preprocessing to use instead."
    if interpolation not in INTERPOLATIONS:
        raise ExtractError(f"--model {spec}: timm's data config resizes with '{interpolation}' interpolation, which extract "
                           f"does not offer ({', '.join(INTERPOLATIONS)}); {fix}")
    if mode == "center" and height == width:
        resize: int | None = math.floor(height / crop_pct)
    elif mode == "squash" and crop_pct == 1.0:
        resize = None
    else:
        raise ExtractError(f"--model {spec}: timm's data config (crop_mode {mode}, crop_pct {crop_pct:g}, input_size "
                           f"{height}x{width}) has no equivalent in extract's resize + centre crop; {fix}")
    return Preprocessing(resize=resize, crop=(height, width), mean=tuple(float(v) for v in config["mean"]),  # type: ignore[arg-type]
                         std=tuple(float(v) for v in config["std"]), interpolation=interpolation)  # type: ignore[arg-type]


def preprocessing(module: nn.Module, spec: str) -> Preprocessing:
    """The preprocessing of a timm model's resolved data config (raises ExtractError when it cannot be expressed)."""
    from timm.data import resolve_model_data_config

    return timm_preprocessing(resolve_model_data_config(module), spec)


def class_names(module: nn.Module, num_classes: int) -> list[str] | None:
    """``pretrained_cfg['label_names']`` when it names every class."""
    names = module.pretrained_cfg.get("label_names")
    return [str(n) for n in names] if isinstance(names, list | tuple) and len(names) == num_classes else None
