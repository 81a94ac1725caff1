"""A Triton Inference Server model repository of the calibrated model — ``disalign export --format triton``.

    REPO/
      disalign/                     the ensemble clients call: images → probabilities, calibrated_logits
        config.pbtxt                platform "ensemble": backbone, then head
        1/                          (empty: an ensemble's version directory)
        export.json                 what was exported, and every head version with its calibration
      disalign_backbone/            preprocessing + the frozen model: images → features, logits
        config.pbtxt
        1/model.onnx
      disalign_head/                the calibration: features, logits → probabilities, calibrated_logits
        config.pbtxt                version_policy latest 1: Triton serves the highest version
        labels.txt                  class names (the probabilities' label_filename)
        1/model.onnx
        2/model.onnx                ← a re-calibration (:func:`add_head_version`) adds only this

The backbone and the head are the ONNX graphs of :mod:`disalign.feature_extract.export` (the fused
graph cut in two), so a new calibration of the same model replaces only the head: it becomes version
N + 1, written into ``.tmp-<hex>`` inside the head's directory (a name Triton skips, not being a number)
and renamed into place once complete and checked; a server polling the repository loads it and unloads
the previous one. Older versions are kept (delete one to roll back to it). ``model_version: -1`` in the
ensemble means "the served version" of each step. ``max_batch_size`` lets Triton batch requests
(``dynamic_batching``); the graphs themselves take any batch.

The ``config.pbtxt`` files are protobuf text of Triton's ``inference.ModelConfig``; the tests parse each
against that message (``tritonclient.grpc.model_config_pb2``), so a field Triton does not know fails there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from disalign.calib.estimators.base import Calibrator
from disalign.calib.files import fsync_dir, fsync_tree, write_atomic, write_directory_atomic
from disalign.feature_extract.errors import ExportError
from disalign.feature_extract.export import (
    MANIFEST,
    OPSET,
    ExportSource,
    Graphs,
    TensorSpec,
    build_graphs,
    check_graph,
    manifest,
    onnx_metadata,
    onnx_runner,
    probes,
    signature,
    write_onnx,
)

DEFAULT_NAME = "disalign"
DEFAULT_MAX_BATCH = 64
MODEL_FILE = "model.onnx"
LABELS = "labels.txt"
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value in text format (written bare, not quoted)."""

    value: str


def pbtxt(fields: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict: a str is quoted, an :class:`Enum` bare, a dict a
    nested message, a list of dicts a repeated message, a list of numbers a repeated scalar."""
    pad, lines = "  " * indent, []
    for key, value in fields.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", pbtxt(value, indent + 1), f"{pad}}}"] if value else [f"{pad}{key} {{ }}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines += [f"{pad}{key} {{", pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(str(v) for v in value)} ]")
        elif isinstance(value, Enum):
            lines.append(f"{pad}{key}: {value.value}")
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{pad}{key}: {json.dumps(value)}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(line for line in lines if line)


def _tensors(specs: Sequence[TensorSpec], labels: str | None = None) -> list[dict[str, Any]]:
    """Triton inputs / outputs: the batch dimension is implicit (``max_batch_size`` > 0), so dims drop it."""
    out = []
    for t in specs:
        entry: dict[str, Any] = {"name": t.name, "data_type": Enum(TRITON_TYPES[t.dtype]), "dims": list(t.shape[1:])}
        if labels and t.name == "probabilities":
            entry["label_filename"] = labels
        out.append(entry)
    return out


def onnx_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: int, *,
                labels: str | None = None, latest_only: bool = False) -> str:
    config: dict[str, Any] = {"name": name, "backend": "onnxruntime", "max_batch_size": max_batch}
    if latest_only:
        config["version_policy"] = {"latest": {"num_versions": 1}}
    config.update({"input": _tensors(inputs), "output": _tensors(outputs, labels), "dynamic_batching": {}})
    return pbtxt(config) + "\n"


def ensemble_config(name: str, backbone: str, head: str, inputs: Sequence[TensorSpec], middle: Sequence[TensorSpec],
                    outputs: Sequence[TensorSpec], max_batch: int) -> str:
    steps = [
        {"model_name": backbone, "model_version": -1,
         "input_map": [{"key": t.name, "value": t.name} for t in inputs],
         "output_map": [{"key": t.name, "value": t.name} for t in middle]},
        {"model_name": head, "model_version": -1,
         "input_map": [{"key": t.name, "value": t.name} for t in middle],
         "output_map": [{"key": t.name, "value": t.name} for t in outputs]},
    ]
    config = {"name": name, "platform": "ensemble", "max_batch_size": max_batch, "input": _tensors(inputs),
              "output": _tensors(outputs), "ensemble_scheduling": {"step": steps}}
    return pbtxt(config) + "\n"


def model_names(name: str) -> tuple[str, str, str]:
    """(ensemble, backbone, head) model names of a repository exported as ``name``."""
    if not NAME.fullmatch(name):
        raise ExportError(f"--name should be letters, digits, '_', '-' or '.', starting with a letter or digit, found {name!r}.")
    return name, f"{name}_backbone", f"{name}_head"


def export_repository(out: str | Path, source: ExportSource, *, name: str = DEFAULT_NAME, max_batch: int = DEFAULT_MAX_BATCH,
                      opset: int = OPSET) -> Path:
    """Write the model repository ``out`` (a new or empty directory) atomically; every graph checked first."""
    if source.model is None:
        raise ExportError("a Triton repository needs the model (--model): its backbone is the first step of the ensemble.")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch should be an integer >= 1, found {max_batch!r}.")
    ensemble, backbone_name, head_name = model_names(name)
    graphs = build_graphs(source.calibrator, source.model, source.preprocessing, source.input_type)
    images, rows = signature(graphs, "backbone", source.calibrator)
    _, outputs = signature(graphs, "head", source.calibrator)
    version = _head_entry(1, source)
    info = manifest("triton", source, images, outputs, opset=opset, models={"ensemble": ensemble, "backbone": backbone_name,
                    "head": head_name}, max_batch_size=max_batch, head_versions=[version])
    backbone_probes = probes(source.calibrator, graphs, "backbone", source.model, source.preprocessing)

    def build(staging: Path) -> None:
        for folder in (ensemble, backbone_name, head_name):
            (staging / folder).mkdir()
        os.mkdir(staging / ensemble / "1")
        write_atomic(staging / ensemble / "config.pbtxt", ensemble_config(ensemble, backbone_name, head_name, images, rows, outputs,
                                                                          max_batch).encode())
        (staging / backbone_name / "1").mkdir()
        backbone_file = staging / backbone_name / "1" / MODEL_FILE
        write_onnx(graphs.backbone, images, rows, backbone_file, onnx_metadata({k: v for k, v in info.items() if k != "head_versions"}), opset)
        check_graph(onnx_runner(backbone_file), rows, backbone_probes, "Triton backbone graph")
        write_atomic(staging / backbone_name / "config.pbtxt", onnx_config(backbone_name, images, rows, max_batch).encode())
        write_atomic(staging / head_name / LABELS, "".join(f"{c}\n" for c in source.calibrator.meta_.class_names).encode())
        write_atomic(staging / head_name / "config.pbtxt",
                     onnx_config(head_name, rows, outputs, max_batch, labels=LABELS, latest_only=True).encode())
        version["probe_max_probability_error"] = _write_head(staging / head_name / "1", graphs, source, rows, outputs, opset)
        write_atomic(staging / ensemble / MANIFEST, (json.dumps(info, indent=1) + "\n").encode())

    return write_directory_atomic(out, build, role="--out")


def add_head_version(repo: str | Path, calibrator: Calibrator, provenance: dict[str, Any] | None = None, *,
                     opset: int = OPSET) -> Path:
    """Publish ``calibrator`` as the next version of the head of an exported repository; returns its directory.

    The calibration must fit the exported model (K, d, model fingerprint, class names, preprocessing);
    the backbone and the ensemble are not touched. See the module docstring for the order of the steps.
    """
    repo = Path(repo)
    info_path, info = read_manifest(repo)
    source = ExportSource(calibrator, provenance=provenance or {})
    _check_same_model(calibrator, info, repo)
    head_dir = repo / info["models"]["head"]
    graphs = build_graphs(calibrator)
    inputs, outputs = signature(graphs, "head", calibrator)
    versions = [int(p.name) for p in head_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    number = max(versions, default=0) + 1
    staging = head_dir / f".tmp-{secrets.token_hex(6)}"
    os.mkdir(staging)
    try:
        entry = _head_entry(number, source)
        entry["probe_max_probability_error"] = _write_head(staging, graphs, source, inputs, outputs, opset)
        fsync_tree(staging)
        os.rename(staging, head_dir / str(number))  # the switch: Triton sees a complete version or none
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(head_dir)
    info["head_versions"] = [*info.get("head_versions", []), entry]
    write_atomic(info_path, (json.dumps(info, indent=1) + "\n").encode())
    return head_dir / str(number)


def read_manifest(repo: Path) -> tuple[Path, dict[str, Any]]:
    """The ``export.json`` of a repository written by :func:`export_repository`; one sentence if there is none."""
    if not repo.is_dir():
        raise ExportError(f"--out {repo} is not a directory; a new head goes into a Triton repository written by disalign export --format triton.")
    found = sorted(p for p in repo.glob(f"*/{MANIFEST}") if p.is_file())
    infos = []
    for path in found:
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path} is not readable JSON ({exc}).") from None
        if isinstance(info, dict) and info.get("format") == "triton":
            infos.append((path, info))
    if len(infos) != 1:
        raise ExportError(f"--out {repo} should hold one Triton repository written by disalign export --format triton, found "
                          f"{len(infos)} ({MANIFEST} with format 'triton' in its model folders).")
    path, info = infos[0]
    models = info.get("models")
    if not (isinstance(models, dict) and isinstance(models.get("head"), str) and (repo / models["head"]).is_dir()):
        raise ExportError(f"{path} names no head model folder of {repo} ('models.head').")
    return path, info


def _check_same_model(calibrator: Calibrator, info: dict[str, Any], repo: Path) -> None:
    meta = calibrator.meta_
    calibrator.check_compatible(num_classes=int(info["num_classes"]), feature_dim=int(info["feature_dim"]),
                                model_fingerprint=str(info.get("model_fingerprint") or ""), source=f"Triton repository {repo}")
    if list(meta.class_names) != info.get("class_names"):
        raise ExportError(f"the calibration's class names {list(meta.class_names)[:3]}… differ from the repository's "
                          f"{info.get('class_names', [])[:3]}…; export a new repository for it.")
    exported = {k: v for k, v in (info.get("preprocessing") or {}).items() if k in ("resize", "crop", "mean", "std")}
    recorded = {k: v for k, v in (meta.preprocessing or {}).items() if k in ("resize", "crop", "mean", "std")}
    if recorded and exported and recorded != exported:
        raise ExportError(f"the calibration's banks were extracted with preprocessing {recorded} but the repository's backbone "
                          f"applies {exported}; export a new repository for it.")


def _head_entry(number: int, source: ExportSource) -> dict[str, Any]:
    meta = source.calibrator.meta_
    return {"version": number, "method": meta.method, "calibration_created": meta.created,
            "target_prior": meta.target_prior is not None, "exported": datetime.now(UTC).isoformat(timespec="seconds"),
            **{k: v for k, v in source.provenance.items() if k.startswith("calibration")}}


def _write_head(folder: Path, graphs: Graphs, source: ExportSource, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], opset: int) -> float:
    """The head graph as ``folder/model.onnx``, checked; returns the largest probability difference on the probes."""
    folder.mkdir(exist_ok=True)
    path = folder / MODEL_FILE
    info = manifest("triton", ExportSource(source.calibrator, provenance=source.provenance), inputs, outputs)
    write_onnx(graphs.head, inputs, outputs, path, onnx_metadata(info), opset)
    return check_graph(onnx_runner(path), outputs, probes(source.calibrator, graphs, "head"), "Triton head graph")

