"""``--model hf:<dir>``: a Hugging Face image classifier and its saved image processor, loaded offline.

    disalign extract --model hf:./vit-cifar …        # a directory written by save_pretrained

- ``<dir>`` is a directory written by ``model.save_pretrained`` (and ``image_processor.save_pretrained``),
  or a hub id already in the local Hugging Face cache: everything is read with ``local_files_only=True``
  and never ``trust_remote_code``. The module is ``AutoModelForImageClassification.from_pretrained(dir,
  dtype=float32, **model_args)`` (``--model-arg``: ``num_labels`` …).
- The classifier is the model's ``classifier`` module (its last ``nn.Linear`` when it is a Sequential, as in
  ResNet's ``Flatten, Linear``); the features are its input; the logits are ``output.logits`` of the
  model's ``ImageClassifierOutput``.
- The preprocessing is the saved image processor's (``AutoImageProcessor``), mapped by :func:`hf_preprocessing`;
  the class names are ``config.id2label`` unless they are the default ``LABEL_<i>``.

transformers is an optional extra, imported only here and only when used; its progress bars are off
while loading (a library call prints nothing).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import Preprocessing

PREFIX = "hf:"
RESAMPLING = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values that image processors store
LARGE_CONVNEXT = 384  # ConvNextImageProcessor warps to the size (no crop) from this shortest edge on


def _transformers(spec: str):
    try:
        import transformers
    except ImportError as exc:
        raise ExtractError(f"--model {spec} needs the optional dependency transformers; install it with pip install 'disalign[hf]'.") from exc
    return transformers


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' progress bars ("Loading weights …") off while loading, as they were after."""
    logging = transformers.utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build(target: str, model_args: dict[str, Any]) -> tuple[nn.Module, Preprocessing | None, str | None]:
    """The model of ``target``, its processor's preprocessing, and why there is none (or None).

    Raises :class:`ExtractError` (one sentence) when the model cannot be loaded.
    """
    spec = PREFIX + target
    transformers = _transformers(spec)
    source = str(Path(target).expanduser()) if Path(target).expanduser().is_dir() else target
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ExtractError(f"--model {spec} is neither a directory written by save_pretrained nor a model in the local "
                               f"Hugging Face cache ({_first_line(exc)}); pass the directory the model was saved to.") from exc
        try:
            module = transformers.AutoModelForImageClassification.from_pretrained(
                source, local_files_only=True, **{"dtype": torch.float32, **model_args})
        except ValueError as exc:
            raise ExtractError(f"--model {spec} is a '{config.model_type}' model without an image-classification class in "
                               f"transformers ({_first_line(exc)}); save a …ForImageClassification model.") from exc
        except TypeError as exc:
            raise ExtractError(f"--model {spec}: from_pretrained refused the --model-arg values {sorted(model_args)} ({_first_line(exc)}).") from exc
        except OSError as exc:
            raise ExtractError(f"--model {spec} has no readable weights ({_first_line(exc)}); save the model with save_pretrained.") from exc
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            return module, None, (f"--model {spec} has no saved image processor ({_first_line(exc)}); save it beside the model "
                                  "(processor.save_pretrained(dir)) or pass a --card with the input preprocessing.")
    try:
        return module, hf_preprocessing(processor, spec), None
    except ExtractError as exc:
        return module, None, str(exc)


def _size(value: Any) -> dict[str, int]:
    """A processor's ``size`` / ``crop_size`` (a SizeDict, a dict or an int) as a dict of its set keys."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def hf_preprocessing(processor: Any, spec: str) -> Preprocessing:
    """An image processor's resize / centre crop / rescale / normalise as a :class:`Preprocessing`.

    ``size`` {height, width}: a straight resize. ``size`` {shortest_edge: S}: the shorter side to S, then
    ``crop_size``; ConvNeXt's processors resize to ⌊S / crop_pct⌋ and crop S (below 384, else warp to S).
    ``rescale_factor`` and ``image_mean`` / ``image_std`` fold into mean and std (the model sees
    ``(v · rescale − mean) / std`` for 0..255 pixels v either way). Anything else is refused.
    """
    fix = "pass a --card with the input preprocessing to use instead."
    kind = type(processor).__name__
    resample = getattr(processor, "resample", 2)
    interpolation = RESAMPLING.get(int(getattr(resample, "value", resample)) if resample is not None else 2)
    if interpolation is None:
        raise ExtractError(f"--model {spec}: its {kind} resizes with resampling filter {resample!r}; extract resizes "
                           f"bilinear or bicubic; {fix}")
    if not getattr(processor, "do_resize", True):
        raise ExtractError(f"--model {spec}: its {kind} does not resize images, so their size is not fixed; {fix}")
    size, crop = _size(getattr(processor, "size", None)), _size(getattr(processor, "crop_size", None))
    center_crop = bool(getattr(processor, "do_center_crop", False)) and bool(crop)
    crop_pct = getattr(processor, "crop_pct", None)
    if "height" in size and "width" in size:
        resize, out = None, (size["height"], size["width"])
        if center_crop and (crop.get("height"), crop.get("width")) != out:
            raise ExtractError(f"--model {spec}: its {kind} resizes to {out[0]}x{out[1]} and then crops "
                               f"{crop.get('height')}x{crop.get('width')}, which extract cannot do in one resize + crop; {fix}")
    elif "shortest_edge" in size and kind.startswith("ConvNext"):
        edge = size["shortest_edge"]
        resize = int(edge / (crop_pct or 224 / 256)) if edge < LARGE_CONVNEXT else None
        out = (edge, edge)
    elif "shortest_edge" in size and center_crop:
        edge = size["shortest_edge"]
        resize = int(edge / crop_pct) if crop_pct else edge
        out = (crop["height"], crop["width"])
    else:
        raise ExtractError(f"--model {spec}: its {kind} has size {size} and crop_size {crop or None}, which does not give "
                           f"one fixed input size with a resize + centre crop; {fix}")
    scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # (v·scale − m) / s = (v/255 − m') / s'  with  s' = s / (255·scale), m' = m / (255·scale)
    factor = 255.0 * scale
    factor = 1.0 if abs(factor - 1.0) < 1e-9 else factor  # 255 · (1/255) is 0.9999999999999999 in floats
    return Preprocessing(resize=resize, crop=out, mean=tuple(m / factor for m in mean),  # type: ignore[arg-type]
                         std=tuple(s / factor for s in std), interpolation=interpolation)  # type: ignore[arg-type]


DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def class_names(module: nn.Module, num_classes: int) -> list[str] | None:
    """``config.id2label`` in index order, unless it is transformers' default ``LABEL_<i>`` or incomplete."""
    id2label = getattr(getattr(module, "config", None), "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(num_classes)]
    if any(n is None for n in names) or all(DEFAULT_LABEL.fullmatch(str(n)) for n in names):
        return None
    return [str(n) for n in names]
