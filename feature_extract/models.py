"""Load a frozen stage-1 model and expose ``features_and_logits``.

``spec`` is one of:

- a TorchScript file (``.ts`` / ``.pt``) with ``forward_features(x)`` and a final linear ``fc``
  (logits = ``fc(features)``), or whose ``forward(x)`` returns ``(features, logits)``;
- ``timm:<name>`` (:mod:`.timm_models`) + optional ``weights`` state_dict;
- ``hf:<dir>``, a Hugging Face image classifier saved with ``save_pretrained`` (:mod:`.hf_models`);
- ``torchvision:<arch>`` (torchvision is an optional extra, imported only here) + optional ``weights``;
- ``package.module:function`` returning an ``nn.Module`` + optional ``weights`` (the working directory
  is importable, as under ``python -m``).

``model_args`` (``--model-arg KEY=VALUE``) are keyword arguments of whatever builds an eager model
(``timm.create_model``, ``from_pretrained``, torchvision's ``get_model``, the factory), e.g. ``num_classes``.

For eager models the features are the input of the final classifier layer, captured by a forward
pre-hook; the logits are the model output (``output.logits`` of a transformers ``ModelOutput``). The
classifier is ``classifier_layer`` if given, else the library's own (timm ``get_classifier()``), else the
first of ``fc`` / ``classifier`` / ``head`` / ``heads``; for an ``nn.Sequential`` its last ``nn.Linear``.
timm and Hugging Face models also bring their preprocessing (``LoadedModel.preprocessing``).
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disalign.calib.files import file_fingerprint
from disalign.feature_extract import hf_models, timm_models
from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.preprocess import Preprocessing

CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads")
TORCHVISION_PREFIX = "torchvision:"
PREFIXES = (TORCHVISION_PREFIX, timm_models.PREFIX, hf_models.PREFIX)
SPECS = "a TorchScript file, timm:<name>, hf:<dir>, torchvision:<arch> or package.module:function"


def state_fingerprint(module: nn.Module) -> str:
    """``sha256:<hex>`` of a module's state (names, shapes, bytes): for models built without a weights file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


@dataclass
class LoadedModel:
    """A frozen model in eval mode on its device, with its classifier (if reachable) as float32 CPU tensors."""

    module: nn.Module  # or torch.jit.ScriptModule
    kind: str  # "torchscript" | "timm" | "hf" | "torchvision" | "factory"
    fingerprint: str  # "sha256:<hex>" of the model file (torchscript) or weights file, else of the state
    feature_dim: int
    num_classes: int
    classifier_weight: torch.Tensor | None  # (K, d) float32
    classifier_bias: torch.Tensor | None  # (K,)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The model's own preprocessing (timm's data config, a saved HF image processor), where it has one,
    # what it came from, and why there is none when its config cannot be expressed (one sentence).
    preprocessing: Preprocessing | None = None
    preprocessing_source: str = ""
    preprocessing_error: str | None = None
    class_names: list[str] | None = None  # from the model's config (HF id2label, timm label_names)
    _classifier: nn.Module | None = field(default=None, repr=False)  # eager: hooked layer; script: fc
    _captured: list[torch.Tensor] = field(default_factory=list, repr=False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) float, already normalised → features (N, d) float32, logits (N, K) float32.

        On CUDA the forward runs under bf16 autocast with channels-last input.
        """
        amp = images.device.type == "cuda"
        if amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if self.kind == "torchscript":
                features, logits = self._script_forward(images)
            else:
                self._captured.clear()
                logits = model_logits(self.module(images))
                if not self._captured:
                    raise ExtractError("the classifier layer was not called during the forward pass; pass --classifier-layer NAME.")
                features = self._captured.pop()
                self._captured.clear()
                if logits.ndim != 2 or logits.shape[1] != self.num_classes:
                    raise ExtractError(f"the model output has shape {tuple(logits.shape)} but its classifier layer has "
                                       f"{self.num_classes} outputs; pass --classifier-layer NAME of the layer that gives the logits.")
        return features.flatten(1).float(), logits.float()

    def _script_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.module, "forward_features"):
            features = self.module.forward_features(images)
            logits = self._classifier(features) if self._classifier is not None else self.module(images)
            return features, logits
        out = self.module(images)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ExtractError(
                f"the TorchScript model should expose forward_features(x) or return (features, logits); its forward returned {type(out).__name__}."
            )
        return out[0], out[1]


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or the ``logits`` of a transformers ``ModelOutput`` / a dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ExtractError(f"the model's forward returned a {type(output).__name__}, expected the logits: a tensor (N, K) or an "
                       "output with a 'logits' field; wrap the model in a factory that returns the logits.")


def _linear_of(layer: nn.Module, name: str) -> nn.Module:
    """The nn.Linear at ``name``: the layer itself, or the last Linear of a Sequential/ModuleList."""
    if isinstance(layer, nn.Linear):
        return layer
    linears = [(sub, m) for sub, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(layer, nn.Sequential | nn.ModuleList) and linears:
        return linears[-1][1]
    hint = f"pass --classifier-layer {name}.{linears[-1][0]} (its last linear layer)" if linears else "pass --classifier-layer NAME"
    raise ExtractError(f"classifier layer '{name}' should be an nn.Linear or a Sequential ending in one, found "
                       f"{type(layer).__name__}; {hint}.")


def find_classifier(module: nn.Module, classifier_layer: str | None = None) -> nn.Module:
    """The final nn.Linear: ``classifier_layer`` if given, else auto-detected among fc / classifier / head / heads."""
    names = (classifier_layer,) if classifier_layer else CLASSIFIER_NAMES
    for name in names:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            continue
        return _linear_of(layer, name)
    if classifier_layer:
        raise ExtractError(f"--classifier-layer '{classifier_layer}' is not a submodule of the model.")
    raise ExtractError(
        f"could not find the classifier layer (looked for {', '.join(CLASSIFIER_NAMES)}); pass --classifier-layer NAME."
    )


def _load_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    path = Path(weights)
    if not path.is_file():
        raise ExtractError(f"--weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExtractError(f"--weights {path} is not a readable safetensors file ({exc}).") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad/unsafe file
        raise ExtractError(f"--weights {path} is not a tensors-only checkpoint loadable with weights_only=True ({exc}).") from exc
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ExtractError(f"--weights {path} should hold a state_dict (names to tensors), found {type(state).__name__}.")
    return state


def _check_class_count(module: nn.Module, linear: nn.Module, state: dict[str, torch.Tensor], weights: str | Path, kind: str) -> None:
    """The commonest mismatch, a checkpoint of another class count, said with its fix."""
    name = next((n for n, m in module.named_modules() if m is linear), None)
    stored = state.get(f"{name}.weight") if name else None
    if stored is not None and stored.ndim == 2 and stored.shape[0] != linear.out_features and kind in ("timm", "factory"):
        raise ExtractError(f"--weights {weights} has {stored.shape[0]} classes ({name}.weight) but the model was built with "
                           f"{linear.out_features}; pass --model-arg num_classes={stored.shape[0]} (or the factory's own argument).")


def _apply_weights(module: nn.Module, state: dict[str, torch.Tensor], weights: str | Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ExtractError(f"--weights {weights} does not match the model architecture: {detail}") from exc


def _torchvision_module(arch: str, state: dict[str, torch.Tensor] | None, classifier_layer: str | None,
                        model_args: dict[str, Any]) -> nn.Module:
    try:
        import torchvision  # noqa: F401 - optional extra
        from torchvision import models as tv_models
    except ImportError as exc:
        raise ExtractError(
            f"--model torchvision:{arch} needs the optional dependency torchvision; install it with pip install 'disalign[torchvision]'."
        ) from exc
    available = tv_models.list_models(module=tv_models)
    if arch not in available:
        raise ExtractError(f"--model torchvision:{arch} is not a torchvision classification model; choose one of {', '.join(sorted(available))}.")
    kwargs: dict[str, Any] = {}
    if state is not None and "num_classes" not in model_args:  # fine-tuned heads: take the class count from the checkpoint
        probe = tv_models.get_model(arch, weights=None)
        head = find_classifier(probe, classifier_layer)
        head_name = next(name for name, m in probe.named_modules() if m is head)
        if f"{head_name}.weight" in state and state[f"{head_name}.weight"].shape[0] != head.out_features:
            kwargs["num_classes"] = int(state[f"{head_name}.weight"].shape[0])
    try:
        return tv_models.get_model(arch, weights=None, **kwargs, **model_args)
    except (TypeError, ValueError) as exc:
        raise ExtractError(f"--model torchvision:{arch}: get_model refused the --model-arg values {sorted(model_args)} ({exc}).") from exc


def _import_factory_module(spec: str, module_name: str):
    """Import ``module_name`` with the working directory on the path (at the end: installed packages win),
    as ``python -m`` would have it; the console script ``disalign`` does not put it there itself."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ExtractError(f"--model {spec}: module '{module_name}' cannot be imported ({exc}); it is looked for on the "
                           f"Python path and in the working directory {cwd}: run from the directory that holds it or set "
                           "PYTHONPATH.") from exc


def _factory_module(spec: str, model_args: dict[str, Any]) -> nn.Module:
    module_name, _, func_name = spec.partition(":")
    package = _import_factory_module(spec, module_name)
    factory = getattr(package, func_name, None)
    if not callable(factory):
        raise ExtractError(f"--model {spec}: '{func_name}' should be a function in {module_name} returning an nn.Module, found {factory!r}.")
    try:
        inspect.signature(factory).bind(**model_args)
    except TypeError as exc:
        raise ExtractError(f"--model {spec} does not take the --model-arg values {sorted(model_args)} ({exc}); its parameters: "
                           f"{', '.join(inspect.signature(factory).parameters) or 'none'}.") from exc
    except ValueError:  # no signature to check (a builtin): the call decides
        pass
    module = factory(**model_args)
    if not isinstance(module, nn.Module):
        raise ExtractError(f"--model {spec} should return a torch.nn.Module, found {type(module).__name__}.")
    return module


def _load_torchscript(path: Path, classifier_layer: str | None, device: torch.device, input_size: tuple[int, int]) -> LoadedModel:
    try:
        with warnings.catch_warnings():  # newer torch marks TorchScript deprecated; it is one of our input formats
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - jit raises RuntimeError/ValueError variants
        raise ExtractError(
            f"--model {path} is not a TorchScript file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "for a state_dict use --model torchvision:<arch> or package.module:function with --weights."
        ) from exc
    module.eval()
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    fc_name = classifier_layer or "fc"
    fc = getattr(module, fc_name, None)
    weight = getattr(fc, "weight", None) if fc is not None else None
    linear = fc if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None
    if classifier_layer and linear is None:
        raise ExtractError(f"--classifier-layer '{classifier_layer}' is not a linear layer of the TorchScript model {path}.")
    model = LoadedModel(
        module=module,
        kind="torchscript",
        fingerprint=file_fingerprint(path),
        feature_dim=0,
        num_classes=0,
        classifier_weight=None,
        classifier_bias=None,
        device=device,
        _classifier=linear,
    )
    if linear is not None:
        model.classifier_weight = linear.weight.detach().float().cpu().clone()
        bias = getattr(linear, "bias", None)
        model.classifier_bias = bias.detach().float().cpu().clone() if isinstance(bias, torch.Tensor) else None
        model.num_classes, model.feature_dim = model.classifier_weight.shape
    else:  # (features, logits) model without a reachable fc: probe the widths once
        probe = torch.zeros(1, 3, *input_size, device=device)
        features, logits = model.features_and_logits(probe)
        model.feature_dim, model.num_classes = int(features.shape[1]), int(logits.shape[1])
    return model


def _kind(spec: str) -> str:
    for prefix, kind in ((TORCHVISION_PREFIX, "torchvision"), (timm_models.PREFIX, "timm"), (hf_models.PREFIX, "hf")):
        if spec.startswith(prefix):
            return kind
    if Path(spec).is_file():
        return "torchscript"
    if ":" in spec and not spec.startswith((".", "/")):
        return "factory"
    raise ExtractError(f"--model should be {SPECS}, found {spec!r} (no such file).")


def load_model(
    spec: str,
    weights: str | None = None,
    *,
    classifier_layer: str | None = None,
    device: str = "cpu",
    input_size: tuple[int, int] = (224, 224),
    model_args: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load ``spec`` (see the module docstring) frozen on ``device``.

    ``model_args``: keyword arguments of the model's builder (not for TorchScript files). ``input_size``
    (H, W) is only used to probe the output widths of a TorchScript model without ``fc``. On CUDA the
    model is converted to channels-last.
    """
    dev = torch.device(device)
    kind = _kind(spec)
    model_args = dict(model_args or {})
    if kind == "torchscript":
        if weights is not None:
            raise ExtractError(f"--weights is for timm:, torchvision: and package.module:function models, but --model {spec} is a file.")
        if model_args:
            raise ExtractError(f"--model-arg is for the models a library builds (timm:, hf:, torchvision:, factories), but --model {spec} is a file.")
        return _load_torchscript(Path(spec), classifier_layer, dev, input_size)
    if kind == "hf" and weights is not None:
        raise ExtractError(f"--model {spec} reads its weights from its directory; --weights is for timm:, torchvision: and "
                           "package.module:function models.")
    state = _load_state_dict(weights) if weights is not None else None
    prep, prep_source, prep_error = None, "", None
    name = spec.partition(":")[2]
    if kind == "torchvision":
        module = _torchvision_module(name, state, classifier_layer, model_args)
    elif kind == "timm":
        module = timm_models.build(name, model_args)
    elif kind == "hf":
        module, prep, prep_error = hf_models.build(name, model_args)
        prep_source = f"the image processor of {spec}"
    else:
        module = _factory_module(spec, model_args)
    timm_like = kind == "timm" or (kind == "factory" and timm_models.is_timm_model(module))
    if classifier_layer or not timm_like:
        linear = find_classifier(module, classifier_layer)
    else:
        linear = timm_models.classifier(module, spec)
    if state is not None:
        _check_class_count(module, linear, state, weights, kind)
        _apply_weights(module, state, weights)  # in place: ``linear`` is still the model's layer
    module.eval().requires_grad_(False)
    if timm_like:
        prep_source = f"timm's data config of {spec}"
        try:
            prep = timm_models.preprocessing(module, spec)
        except ExtractError as exc:
            prep_error = str(exc)
    num_classes = int(linear.out_features)
    names = (hf_models.class_names(module, num_classes) if kind == "hf" else
             timm_models.class_names(module, num_classes) if timm_like else None)
    fingerprint = file_fingerprint(weights) if weights is not None else state_fingerprint(module)
    module.to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)
    model = LoadedModel(
        module=module,
        kind=kind,
        fingerprint=fingerprint,
        feature_dim=int(linear.in_features),
        num_classes=num_classes,
        classifier_weight=linear.weight.detach().float().cpu().clone(),
        classifier_bias=linear.bias.detach().float().cpu().clone() if linear.bias is not None else None,
        device=dev,
        preprocessing=prep,
        preprocessing_source=prep_source if prep is not None else "",
        preprocessing_error=prep_error,
        class_names=names,
        _classifier=linear,
    )
    captured = model._captured
    linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    return model
