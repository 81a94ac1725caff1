"""The calibrated model as one graph: the frozen model, its preprocessing and the calibration, for ONNX
Runtime, TorchScript or Triton (:mod:`disalign.feature_extract.triton`) — ``disalign export``.

Three graphs, each with a dynamic batch dimension N (``docs/export.md``):

    fused     images (N, 3, H, W) uint8 0..255 or float32 0..1  →  probabilities (N, K), calibrated_logits (N, K)
    head      features (N, d) float32, logits (N, K) float32    →  probabilities (N, K), calibrated_logits (N, K)
    backbone  images (N, 3, H, W)                                →  features (N, d), logits (N, K)   (Triton's first step)

The fused graph is backbone then head. **Folded in** is the per-pixel part of the banks' preprocessing —
``x / 255`` for uint8 input, then ``(x − mean) / std``, the exact operations of
:func:`~disalign.feature_extract.preprocess.normalize` — so the graph takes the clean view the extractor
and the server build (``clean_view``: decode, resize the shorter side, centre-crop to (H, W)); that
geometric part stays outside, as decoding does, because it depends on each image's size and a batch has
one. For banks extracted without ``resize`` from images of the crop size (the CIFAR demo) the pixels go
in as decoded. The head is :class:`~disalign.calib.estimators.head_module.CalibrationHead`: the
estimator's own prediction, target prior included.

How: everything passes through TorchScript, the project's model format. A TorchScript model is wrapped
by a scripted adapter (``forward_features`` + its ``fc``, or a ``forward`` returning (features, logits)); an
eager model (torchvision, a factory) is copied with its classifier layer swapped for ``nn.Identity``, so
its output is the classifier's input, and traced; the head is traced (its branches are fixed when it is
built); the parts are scripted into one module — what ``--format torchscript`` saves — and ONNX is
written from it by torch's TorchScript-based exporter, the one exporter that reads TorchScript (torch
marks both deprecated; the warnings are silenced here, and the probe checks below are what vouch for the
result).

**Checked before anything is published**: every exported graph is run (onnxruntime on CPU, or the saved
TorchScript file reloaded) on probe batches of sizes other than the one it was traced at, and must agree
with the library's own path — ``model.features_and_logits`` on the normalised images and the estimator's
``predict_logits`` — within :data:`PROBABILITY_TOLERANCE` on probabilities and 1e-4 relative on logits
and features; a model that computes its logits with more than its classifier layer, or a trace that
baked in a batch size, is refused in one sentence instead of written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from disalign.calib import __version__
from disalign.calib.estimators.base import Calibrator
from disalign.calib.estimators.head_module import CalibrationHead, check_exportable
from disalign.calib.files import write_atomic, write_directory_atomic
from disalign.feature_extract.errors import ExportError
from disalign.feature_extract.models import LoadedModel
from disalign.feature_extract.preprocess import Preprocessing, normalize

FORMATS = ("onnx", "torchscript", "triton")
INPUT_TYPES = ("uint8", "float32")
OPSET = 17  # ONNX opset: what the TorchScript exporter writes best, and ONNX Runtime ≥ 1.12 / Triton ≥ 22.07 run
PROBABILITY_TOLERANCE = 1e-4  # the bar: the graph's probabilities against predict_proba
RELATIVE_TOLERANCE = 1e-4  # logits and features: |a − b| ≤ this · (1 + max |b|)
TRACE_BATCH = 2  # rows of the example a trace is recorded with ...
PROBE_BATCHES = (3, 1)  # ... and the batch sizes every graph is checked at (a baked-in batch size fails them)
MANIFEST = "export.json"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
IMAGE_INPUT = "images"
OUTPUTS = ("probabilities", "calibrated_logits")
HEAD_INPUTS = ("features", "logits")


# -- the modules -----------------------------------------------------------------------------------
class Normalize(nn.Module):
    """images (N, 3, H, W) uint8 0..255 (``x / 255`` first) or float 0..1 → ``(x − mean) / std`` float32."""

    __constants__ = ["from_uint8"]  # TorchScript compiles the branch away (Final[bool] cannot be read under __future__ annotations)

    def __init__(self, preprocessing: Preprocessing, input_type: str = "uint8"):
        super().__init__()
        if input_type not in INPUT_TYPES:
            raise ExportError(f"input type should be one of {', '.join(INPUT_TYPES)}, found {input_type!r}.")
        self.from_uint8 = input_type == "uint8"
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.from_uint8:
            x = x / 255.0
        return (x - self.mean) / self.std


class _ScriptFeaturesFc(nn.Module):
    """A TorchScript model with ``forward_features`` and a linear classifier: (features, fc(features))."""

    def __init__(self, model: torch.jit.ScriptModule, classifier: torch.jit.ScriptModule):
        super().__init__()
        self.model, self.classifier = model, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features.flatten(1).float(), self.classifier(features).float()


class _ScriptFeaturesForward(nn.Module):
    """A TorchScript model with ``forward_features`` and no reachable linear classifier: (features, forward(x))."""

    def __init__(self, model: torch.jit.ScriptModule):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_features(x).flatten(1).float(), self.model(x).float()


class _ScriptPair(nn.Module):
    """A TorchScript model whose ``forward`` returns (features, logits)."""

    def __init__(self, model: torch.jit.ScriptModule):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out[0].flatten(1).float(), out[1].float()


class _EagerFeatures(nn.Module):
    """An eager model whose classifier layer is an ``nn.Identity``: its output is the classifier's input (the
    bank's features), and the classifier, kept aside, gives the logits from them."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        if model._classifier is None:
            raise ExportError("the model's classifier layer is not reachable, so its features cannot be separated; pass --classifier-layer NAME.")
        name = next(n for n, m in model.module.named_modules() if m is model._classifier)
        body = copy.deepcopy(model.module).cpu().eval()
        for module in body.modules():  # the extractor's capture hook came along with the copy
            module._forward_pre_hooks.clear()
        self.classifier = body.get_submodule(name)
        body.set_submodule(name, nn.Identity())
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        out = getattr(out, "logits", out)  # a Hugging Face ModelOutput names the classifier's output "logits"
        return out.flatten(1).float(), self.classifier(out).float()


class _Backbone(nn.Module):
    """images → (features (N, d), logits (N, K)): preprocessing, then the frozen model."""

    def __init__(self, normalize: nn.Module, features: nn.Module):
        super().__init__()
        self.normalize, self.features = normalize, features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(self.normalize(images))


class _Fused(nn.Module):
    """images → (probabilities (N, K), calibrated logits (N, K)): preprocessing, the frozen model, the calibration."""

    def __init__(self, normalize: nn.Module, features: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize, self.features, self.head = normalize, features, head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.features(self.normalize(images))
        return self.head(features, logits)


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """torch marks TorchScript and its ONNX exporter deprecated; they are this module's route (module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


@dataclass
class Graphs:
    """The TorchScript modules of one export, and the shape and dtype of its image input (none for a head alone)."""

    head: torch.jit.ScriptModule
    backbone: torch.jit.ScriptModule | None = None  # images → (features, logits)
    fused: torch.jit.ScriptModule | None = None  # images → (probabilities, calibrated logits)
    image_shape: tuple[int, int, int] | None = None  # (3, H, W)
    input_type: str = "uint8"


def build_graphs(calibrator: Calibrator, model: LoadedModel | None = None, preprocessing: Preprocessing | None = None,
                 input_type: str = "uint8") -> Graphs:
    """The head graph, and with a model also the backbone and the fused graphs (TorchScript, on the CPU)."""
    check_exportable(calibrator)
    k, d = calibrator.meta_.num_classes, calibrator.meta_.feature_dim
    generator = torch.Generator().manual_seed(0)
    with _quiet_torchscript():
        head = torch.jit.trace(CalibrationHead(calibrator).eval(), (torch.randn(TRACE_BATCH, d, generator=generator),
                               torch.randn(TRACE_BATCH, k, generator=generator)), check_trace=False)
        if model is None:
            return Graphs(head=head)
        if preprocessing is None:
            raise ExportError("exporting a model needs its preprocessing (the calibration's record or a model card).")
        if model.device.type != "cpu":
            raise ExportError(f"load the model on the CPU to export it, found device {model.device}.")
        calibrator.check_compatible(num_classes=model.num_classes, feature_dim=model.feature_dim,
                                    model_fingerprint=model.fingerprint, source="model")
        normalize_module = torch.jit.script(Normalize(preprocessing, input_type))
        features = _features_module(model, (TRACE_BATCH, 3, *preprocessing.crop), generator)
        backbone = torch.jit.script(_Backbone(normalize_module, features).eval())
        fused = torch.jit.script(_Fused(normalize_module, features, head).eval())
    for parameter in fused.parameters():  # a TorchScript model loads with trainable parameters: the saved graph is frozen
        parameter.requires_grad_(False)
    return Graphs(head=head, backbone=backbone, fused=fused, image_shape=(3, *preprocessing.crop), input_type=input_type)


def _features_module(model: LoadedModel, shape: tuple[int, ...], generator: torch.Generator) -> torch.jit.ScriptModule:
    """The frozen model as a TorchScript module x (N, 3, H, W) normalised → (features (N, d), logits (N, K)) float32."""
    module = model.module
    if isinstance(module, torch.jit.ScriptModule):
        if hasattr(module, "forward_features"):
            adapter = _ScriptFeaturesFc(module, model._classifier) if model._classifier is not None else _ScriptFeaturesForward(module)
        else:
            adapter = _ScriptPair(module)
        try:
            return torch.jit.script(adapter)
        except RuntimeError as exc:
            raise ExportError(f"the TorchScript model cannot be wrapped for export ({str(exc).splitlines()[0]}).") from None
    try:
        return torch.jit.trace(_EagerFeatures(model), (torch.randn(*shape, generator=generator),), check_trace=False)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - tracing fails in as many ways as models are written
        raise ExportError(f"the model cannot be traced for export ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: name, dtype (numpy name) and shape, -1 for the batch dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def signature(graphs: Graphs, which: str, calibrator: Calibrator) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the ``which`` graph ("fused", "head" or "backbone")."""
    k, d = calibrator.meta_.num_classes, calibrator.meta_.feature_dim
    images = [TensorSpec(IMAGE_INPUT, graphs.input_type, (-1, *graphs.image_shape))] if graphs.image_shape else []
    rows = [TensorSpec("features", "float32", (-1, d)), TensorSpec("logits", "float32", (-1, k))]
    calibrated = [TensorSpec(name, "float32", (-1, k)) for name in OUTPUTS]
    return {"fused": (images, calibrated), "head": (rows, calibrated), "backbone": (images, rows)}[which]


def write_onnx(module: torch.jit.ScriptModule, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], path: Path,
               metadata: dict[str, str], opset: int = OPSET) -> None:
    """``module`` as an ONNX file at ``path`` with a dynamic batch dimension, ``metadata`` as its metadata_props."""
    onnx = _require("onnx")
    example = tuple(_example(t, TRACE_BATCH) for t in inputs)
    with _quiet_torchscript():
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=[t.name for t in inputs],
                          output_names=[t.name for t in outputs], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={t.name: {0: "N"} for t in (*inputs, *outputs)})
    graph = onnx.load(str(path))
    _restore_unused_inputs(onnx, graph, inputs)
    graph.doc_string = f"disalign {__version__} export: {' '.join(t.name for t in inputs)} -> {' '.join(t.name for t in outputs)}"
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    path.unlink()
    write_atomic(path, graph.SerializeToString())


def _restore_unused_inputs(onnx, graph, inputs: Sequence[TensorSpec]) -> None:
    """The exporter drops an input the graph does not read (``features`` of a logits-only method); put it
    back, in its place, so every head graph has the same two inputs (ONNX allows an unread input)."""
    present = {value.name: value for value in graph.graph.input}
    if all(t.name in present for t in inputs):
        return
    elem = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}
    ordered = [present.get(t.name) or onnx.helper.make_tensor_value_info(t.name, elem[t.dtype], ["N", *t.shape[1:]])
               for t in inputs]
    del graph.graph.input[:]
    graph.graph.input.extend(ordered)


def _example(t: TensorSpec, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *t.shape[1:])
    if t.dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if t.name == IMAGE_INPUT:
        return torch.rand(shape, generator=generator)
    return torch.randn(shape, generator=generator) * 3.0


def _require(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"disalign export needs the optional dependency {name}; install it with pip install 'disalign[export]'.") from None


# -- the checks ------------------------------------------------------------------------------------
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def onnx_runner(path: Path) -> Runner:
    """Run an ONNX file with onnxruntime on the CPU: inputs by name → the outputs, in order."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check, not a benchmark: leave the cores to whoever shares the machine
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def torchscript_runner(path: Path) -> Runner:
    """Reload a saved TorchScript file and run it: inputs in the order given → the outputs."""
    with _quiet_torchscript():
        module = torch.jit.load(str(path))

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(a) for a in feed.values()))
        return [t.numpy() for t in out]

    return run


@dataclass
class Probe:
    """One probe batch: the inputs by name and what the library computes from them, by output name."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] = field(default_factory=dict)


def probes(calibrator: Calibrator, graphs: Graphs, which: str, model: LoadedModel | None = None,
           preprocessing: Preprocessing | None = None) -> list[Probe]:
    """Probe batches of :data:`PROBE_BATCHES` rows for the ``which`` graph, with the library's answers."""
    inputs, _ = signature(graphs, which, calibrator)
    out: list[Probe] = []
    for seed, batch in enumerate(PROBE_BATCHES, start=1):
        if which == "head":
            features, logits = (_example(t, batch, seed) for t in inputs)
        else:
            u8 = _example(TensorSpec(IMAGE_INPUT, "uint8", inputs[0].shape), batch, seed)
            with torch.inference_mode():
                features, logits = model.features_and_logits(normalize(u8, preprocessing))
            images = u8 if graphs.input_type == "uint8" else u8.float() / 255.0
        probe = Probe({"features": features.numpy(), "logits": logits.numpy()} if which == "head" else {IMAGE_INPUT: images.numpy()})
        if which == "backbone":
            probe.expected = {"features": features.numpy(), "logits": logits.numpy()}
        else:
            calibrated = calibrator.predict_logits(features, logits)
            probe.expected = {"probabilities": torch.softmax(calibrated, dim=1).numpy(), "calibrated_logits": calibrated.numpy()}
        out.append(probe)
    return out


def check_graph(run: Runner, outputs: Sequence[TensorSpec], batches: list[Probe], what: str) -> float:
    """Raise :class:`ExportError` unless ``run`` answers every probe as the library does; returns the largest
    probability difference seen (0 for a graph without probabilities)."""
    worst = 0.0
    for probe in batches:
        got = dict(zip((t.name for t in outputs), run(probe.inputs), strict=True))
        rows = next(iter(probe.inputs.values())).shape[0]
        for name, expected in probe.expected.items():
            value = np.asarray(got[name])
            if value.shape != expected.shape or not np.isfinite(value).all():
                raise ExportError(f"the exported {what} answers a batch of {rows} with {name} of shape {value.shape} "
                                  f"(finite: {bool(np.isfinite(value).all())}), expected {expected.shape}; it cannot be exported faithfully.")
            error = float(np.abs(value - expected).max()) if value.size else 0.0
            bound = PROBABILITY_TOLERANCE if name == "probabilities" else RELATIVE_TOLERANCE * (1.0 + float(np.abs(expected).max(initial=0.0)))
            if error > bound:
                raise ExportError(f"the exported {what} differs from the library by {error:.3g} in {name} on a probe batch of "
                                  f"{rows} (allowed {bound:.3g}); the model computes something the export does not reproduce "
                                  "(e.g. its logits are more than its classifier layer), so it is not exported.")
            if name == "probabilities":
                worst = max(worst, error)
    return worst


# -- the exports -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSource:
    """What an export holds: a fitted calibration, and for a fused graph the frozen model (loaded on the CPU)
    and the preprocessing of its banks; ``provenance`` (calibration path and version, model spec) goes
    into the manifest and the ONNX metadata as given."""

    calibrator: Calibrator
    model: LoadedModel | None = None  # None: the head alone
    preprocessing: Preprocessing | None = None
    input_type: str = "uint8"
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> str:
        return "head" if self.model is None else "fused"


def manifest(fmt: str, source: ExportSource, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], **extra: Any) -> dict[str, Any]:
    """The self-description written beside an exported graph (``export.json``; ``docs/export.md``)."""
    meta = source.calibrator.meta_
    out: dict[str, Any] = {
        "format": fmt,
        "graph": source.graph,
        "tool_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": [t.to_json() for t in inputs],
        "outputs": [t.to_json() for t in outputs],
        "num_classes": meta.num_classes,
        "feature_dim": meta.feature_dim,
        "class_names": list(meta.class_names),
        "model_fingerprint": meta.model_fingerprint,
        "method": meta.method,
        "target_prior": meta.target_prior is not None,
        **source.provenance,
    }
    if source.model is not None:
        out["preprocessing"] = {"in_graph": "x / 255 (uint8 input), then (x - mean) / std" if source.input_type == "uint8"
                                else "(x - mean) / std (float input in 0..1)",
                                "outside": "decode, resize the shorter side to 'resize' (if set), centre-crop to 'crop'",
                                "input_type": source.input_type, **(meta.preprocessing or {})}
    out.update(extra)
    return out


def onnx_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The manifest's fields as ONNX ``metadata_props`` (strings; lists and objects as JSON)."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()
            if key not in ("inputs", "outputs")}


def export_graph(out: str | Path, source: ExportSource, fmt: str = "onnx", *, opset: int = OPSET) -> Path:
    """Write ``out`` (a new or empty directory) holding ``model.onnx`` or ``model.ts`` and ``export.json``, atomically.

    The graph is checked against the library before the directory appears (module docstring).
    """
    if fmt not in MODEL_FILES:
        raise ExportError(f"format should be one of {', '.join(MODEL_FILES)} here, found {fmt!r} (triton: disalign.feature_extract.triton).")
    graphs = build_graphs(source.calibrator, source.model, source.preprocessing, source.input_type)
    module = graphs.head if source.model is None else graphs.fused
    inputs, outputs = signature(graphs, source.graph, source.calibrator)
    batches = probes(source.calibrator, graphs, source.graph, source.model, source.preprocessing)
    info = manifest(fmt, source, inputs, outputs, **({"opset": opset} if fmt == "onnx" else {}))

    def build(staging: Path) -> None:
        path = staging / MODEL_FILES[fmt]
        if fmt == "onnx":
            write_onnx(module, inputs, outputs, path, onnx_metadata(info), opset)
            run = onnx_runner(path)
        else:
            with _quiet_torchscript():
                module.save(str(path))
            run = torchscript_runner(path)
        info["probe_max_probability_error"] = check_graph(run, outputs, batches, f"{fmt} {source.graph} graph")
        write_atomic(staging / MANIFEST, (json.dumps(info, indent=1) + "\n").encode())

    return write_directory_atomic(out, build, role="--out")
