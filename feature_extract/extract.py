"""The extraction job: list → decoded uint8 views → model on the device → parts → HDF5 bank.

DataLoader workers decode (each opens its own files) into uint8 batches in shared memory, pinned on
CUDA; the batch travels to the device as uint8 and is normalised there; on CUDA the forward runs in bf16
autocast, channels-last, and results come back one batch late so the GPU never waits for the host.
Rows are grouped in chunks of ``chunk_size`` list rows; batches never cross a chunk boundary, so the
batches (and therefore the values) are the same whether a run is resumed or split across ranks.
See :mod:`disalign.feature_extract.workdir` for the resume and assembly rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from disalign.calib.data.bank import FEATURE_DTYPES, BankReader
from disalign.calib.defaults import DEFAULT_MAX_PIXELS
from disalign.calib.errors import DisalignError
from disalign.calib.files import check_output_file
from disalign.feature_extract import device_decode
from disalign.feature_extract.data import ImageList, ViewDataset, collate_views, read_list, scan_folder
from disalign.feature_extract.device_decode import DECODERS, decode_batch_on_device
from disalign.feature_extract.distributed import DistContext, chunk_range
from disalign.feature_extract.errors import EmptyBankError, ExtractError, ImageDecodeError
from disalign.feature_extract.models import LoadedModel, load_model
from disalign.feature_extract.preprocess import (
    AUGMENTS,
    Preprocessing,
    PreprocessingOverrides,
    augmentation_name,
    normalize,
)
from disalign.feature_extract.workdir import BankHeader, PartsAssembler, WorkDir, write_virtual_bank

logger = logging.getLogger("feature_extract")
ASSEMBLY_MODES = ("concat", "virtual")
MAX_QUEUED_PARTS = 2


@dataclass(frozen=True)
class ExtractConfig:
    """Arguments of one extraction (the CLI builds this; see ``disalign extract --help``)."""

    model: str
    out: Path
    list_file: Path | None = None
    root: Path | None = None
    folder: Path | None = None
    weights: Path | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # --model-arg KEY=VALUE: the model builder's keywords
    card: Path | None = None
    prep: Preprocessing | None = None  # the whole preprocessing; None: resolve_preprocessing (card, model config, defaults)
    prep_overrides: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)  # --resize, --crop … on top
    classifier_layer: str | None = None
    views: int = 1
    augment: str = "standard"  # views >= 1: the stage-1 augmentation, or "official" (DisAlign's stage 2; preprocess)
    seed: int = 0
    batch_size: int = 256
    chunk_size: int = 4096  # list rows per resumable part
    workers: int | None = None  # None: available_workers(), the cores this process may use
    prefetch: int = 4  # batches per worker in flight
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads of the main process (None: torch's default)
    feature_dtype: str = "float16"
    class_counts_from: Path | None = None
    overwrite: bool = False
    strict: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # the server's default too
    draft: bool = True
    assemble: str = "concat"
    decode: str = "pil"  # "torchvision": JPEGs decoded on the device (nvJPEG on CUDA), see device_decode
    quiet: bool = False

    def __post_init__(self):
        if (self.list_file is None) == (self.folder is None):
            raise ExtractError("give exactly one image source: --list LIST.txt (with --root DIR) or --folder DIR.")
        if self.list_file is not None and self.root is None:
            raise ExtractError("--list needs --root DIR, the directory its relative paths start from.")
        if self.views < 1:
            raise ExtractError(f"--views should be >= 1 (view 0 is the clean view), found {self.views}.")
        if self.augment not in AUGMENTS:
            raise ExtractError(f"--augment should be one of {', '.join(AUGMENTS)}, found {self.augment!r}.")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ExtractError(f"--batch-size and --chunk-size should be >= 1, found {self.batch_size} and {self.chunk_size}.")
        if self.workers is None:
            object.__setattr__(self, "workers", available_workers())  # frozen: resolved once, here
        if self.workers < 0:
            raise ExtractError(f"--workers should be >= 0, found {self.workers}.")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ExtractError(f"--feature-dtype should be one of {', '.join(FEATURE_DTYPES)}, found {self.feature_dtype!r}.")
        if self.assemble not in ASSEMBLY_MODES:
            raise ExtractError(f"--assemble should be one of {', '.join(ASSEMBLY_MODES)}, found {self.assemble!r}.")
        if self.decode not in DECODERS:
            raise ExtractError(f"--decode should be one of {', '.join(DECODERS)}, found {self.decode!r}.")
        if self.decode == "torchvision" and self.views != 1:
            raise ExtractError(f"--decode torchvision makes the clean view only: --views should be 1, found {self.views}.")
        if self.seed < 0:
            raise ExtractError(f"--seed should be >= 0, found {self.seed}.")


@dataclass
class ExtractResult:
    path: Path
    rows: int  # rows written by this process (views included)
    images: int  # list rows decoded by this process
    skipped: list[int] = field(default_factory=list)  # list rows this process could not decode
    seconds: float = 0.0  # the whole call, model loading included
    loop_seconds: float = 0.0  # decode + forward + parts, from the DataLoader's start to the last part
    assemble_seconds: float = 0.0  # parts → bank on disk

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# -- inputs ---------------------------------------------------------------------------------------
def resolve_preprocessing(cfg: ExtractConfig, card: dict, model: LoadedModel | None) -> tuple[Preprocessing, str]:
    """The preprocessing of an extraction and what it came from, in this order: ``cfg.prep`` as given; else
    the card's ``input`` or the model's own config (timm's data config, a saved HF image processor),
    which must agree when both are there; else ImageNet defaults; then the ``--resize`` … overrides.

    ``model`` None: before the model is loaded (the probe size of a TorchScript model).
    """
    if cfg.prep is not None:
        return cfg.prep, "given"
    card_prep = Preprocessing.from_card(cfg.card) if cfg.card is not None and (card.get("input") is not None or model is None
                                                                               or model.preprocessing is None) else None
    own = model.preprocessing if model is not None else None
    if card_prep is not None and own is not None:
        difference = card_prep.first_difference(own)
        if difference is not None:
            name, mine, theirs = difference
            raise ExtractError(f"the model card {cfg.card} has {name} {mine} but {model.preprocessing_source} has {theirs}; "
                               "drop the card's 'input' (the model's own preprocessing is used) or override fields with "
                               "--resize/--crop/--mean/--std/--interpolation.")
    if card_prep is not None:
        base, source = card_prep, f"model card {cfg.card}"
    elif own is not None:
        base, source = own, model.preprocessing_source
    elif model is not None and model.preprocessing_error is not None:
        raise ExtractError(model.preprocessing_error)
    else:
        base, source = Preprocessing.imagenet(), "ImageNet defaults"
    if cfg.prep_overrides:
        return cfg.prep_overrides.apply(base), f"{source}, with the command line's overrides"
    return base, source


def _card(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExtractError(f"model card {path} is not readable JSON ({exc}).") from exc


def _class_counts(source: Path | None, images: ImageList, k: int) -> tuple[np.ndarray | None, str]:
    """Per-class *training* counts: from ``source`` (a bank or a card JSON), else this list's labels."""
    if source is None:
        if not images.labelled:
            return None, "none (unlabelled list)"
        return np.bincount(images.labels, minlength=k).astype(np.int64), "labels of this list"
    source = Path(source)
    if source.suffix == ".json":
        counts = _card(source).get("class_counts")
        if counts is None:
            raise ExtractError(f"--class-counts-from {source}: the card has no 'class_counts' field.")
    else:
        with BankReader(source) as reader:
            counts = reader.info.class_counts
            if counts is None:
                clean = (reader.column("view") == 0) & (reader.column("labels") >= 0)
                counts = np.bincount(reader.column("labels")[clean], minlength=reader.info.num_classes)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if counts.shape[0] != k:
        raise ExtractError(f"--class-counts-from {source} has {counts.shape[0]} classes but the model has K={k}.")
    return counts, str(source)


def _list_digest(images: ImageList) -> str:
    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels.tolist(), strict=True):
        digest.update(f"{path}\t{label}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def available_workers() -> int:
    """The default ``--workers``: the CPU cores this process may run on (its affinity, not the machine's
    count), shared among the ranks of this node under torchrun (``LOCAL_WORLD_SIZE``). More decoding
    processes than cores only contend (and the DataLoader warns about them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // ranks_here)


def _check_images_exist(images: ImageList, list_file: Path | None) -> None:
    """A list none of whose paths exists (comma-separated fields, a wrong --root) is a mistake, not N skipped images."""
    if list_file is None:  # --folder found the files itself
        return
    if any((images.root / path).is_file() for path in images.paths):
        return
    raise ExtractError(f"none of the {len(images)} images of --list {list_file} exists under --root {images.root} "
                       f"(the first is {images.paths[0]!r}); "
                       "expected lines 'relative/path [label]' separated by whitespace.")


def _check_num_classes(spec: str, k: int) -> None:
    if k < 2:
        raise ExtractError(f"--model {spec} has K={k} output class{'' if k == 1 else 'es'}; a bank needs K >= 2 classes "
                           "(a calibration balances classes against each other).")


def _resume_hint(cfg: ExtractConfig, model: LoadedModel) -> dict[str, str]:
    """Why a changed manifest key makes a resume impossible, where the user cannot see it: a torchvision or
    factory model without ``--weights`` is a new random initialisation on every run, so its fingerprint changes."""
    if model.kind in ("torchvision", "factory") and cfg.weights is None:
        return {"model_fingerprint": (f"--model {cfg.model} has no --weights, so its parameters are a new random initialisation "
                                      "on every run")}
    return {}


def _check_labels(images: ImageList, k: int) -> None:
    bad = np.flatnonzero(images.labels >= k)
    if len(bad):
        row = int(bad[0])
        raise ExtractError(
            f"list row {row} ({images.paths[row]}) has label {int(images.labels[row])}, but the model has {k} classes (labels 0..{k - 1} or -1)."
        )


# -- the device loop ------------------------------------------------------------------------------
@dataclass
class _InFlight:
    chunk: int
    last_of_chunk: bool
    rows: torch.Tensor  # (n,) list rows decoded in this batch
    bad_rows: torch.Tensor
    features: torch.Tensor | None = None  # (n·V, d) on the host (pinned on CUDA), maybe still being copied
    logits: torch.Tensor | None = None
    event: torch.cuda.Event | None = None


class _Runner:
    """Launch batches on the device, collect them one batch late, write a part when a chunk is done."""

    def __init__(self, model: LoadedModel, prep: Preprocessing, images: ImageList, workdir: WorkDir, cfg: ExtractConfig, on_part=None):
        self.model, self.prep, self.images, self.workdir, self.cfg = model, prep, images, workdir, cfg
        self.on_part = on_part  # called with (chunk, arrays) once a part is safely on disk
        self.device = model.device
        self.feature_dtype = getattr(torch, cfg.feature_dtype)
        self.pending: deque[_InFlight] = deque()
        self.chunk_items: list[_InFlight] = []
        self.skipped: list[int] = []
        self.first_skip: str | None = None  # why the first skipped image of this run was skipped
        self.rows_written = 0
        # Parts are written (and appended to the bank) by one background thread, in order, so the device
        # never waits for the disk; at most MAX_QUEUED_PARTS completed chunks wait in memory.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature_extract-parts")
        self.writes: deque[Future] = deque()

    def to_device(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[str]]:
        """The batch as uint8 (B·V, 3, H, W) on the device, in list-row order; its rows, bad rows and errors."""
        rows, bad_rows, errors = batch["rows"], batch["bad_rows"], list(batch["errors"])
        host = batch["images"].to(self.device, non_blocking=True).permute(0, 3, 1, 2) if len(batch["images"]) else None
        if not batch["jpegs"]:
            return host, rows, bad_rows, errors
        on_device = batch["on_device"]
        jpeg_rows = rows[on_device]
        names = [f"list row {r} ({self.images.paths[r]})" for r in jpeg_rows.tolist()]
        views, good, failed = decode_batch_on_device(batch["jpegs"], self.prep, self.device, names, self.cfg.max_pixels)
        if host is None:  # all rows decoded on the device: already in row order
            x, kept = views, jpeg_rows[good]
        else:
            kept = torch.cat([rows[~on_device], jpeg_rows[good]])
            order = torch.argsort(kept)
            x = torch.cat([t for t in (host, views) if t is not None])[order.to(self.device)]
            kept = kept[order]
        if failed:
            bad_rows = torch.sort(torch.cat([bad_rows, jpeg_rows[sorted(failed)]])).values
            errors += [failed[i] for i in sorted(failed)]
        return x, kept, bad_rows, errors

    def launch(self, chunk: int, last: bool, x: torch.Tensor | None, rows: torch.Tensor, bad_rows: torch.Tensor) -> None:
        """Start the forward of ``x`` (uint8 on the device); collect the previous batch."""
        item = _InFlight(chunk, last, rows, bad_rows)
        if len(rows):
            if self.device.type == "cpu":
                x = x.contiguous()
            features, logits = self.model.features_and_logits(normalize(x, self.prep))
            features = features.to(self.feature_dtype)
            if self.device.type == "cuda":
                item.features = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
                item.logits = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
                item.features.copy_(features, non_blocking=True)
                item.logits.copy_(logits, non_blocking=True)
                item.event = torch.cuda.Event()
                item.event.record()
            else:
                item.features, item.logits = features, logits
        self.pending.append(item)
        while len(self.pending) > 1:
            self._collect(self.pending.popleft())

    def flush(self) -> None:
        """Collect every batch in flight and wait until every part is written."""
        while self.pending:
            self._collect(self.pending.popleft())
        self._reap(keep=0)

    def close(self) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)

    def _collect(self, item: _InFlight) -> None:
        if item.event is not None:
            item.event.synchronize()
        self.chunk_items.append(item)
        if item.last_of_chunk:
            self.writes.append(self.writer.submit(self._write_part, item.chunk, self.chunk_items))
            self.chunk_items = []
            self._reap(keep=MAX_QUEUED_PARTS)

    def _reap(self, keep: int) -> None:
        """Re-raise a failed write; block while more than ``keep`` parts are queued."""
        while self.writes and (self.writes[0].done() or len(self.writes) > keep):
            self.writes.popleft().result()

    def _write_part(self, chunk: int, items: list[_InFlight]) -> None:
        views = self.cfg.views
        done = [it for it in items if len(it.rows)]
        rows = torch.cat([it.rows for it in done]).numpy() if done else np.zeros(0, np.int64)
        sample_index = np.repeat(rows, views)
        d, k = self.model.feature_dim, self.model.num_classes
        features = torch.cat([it.features for it in done]).numpy() if done else np.zeros((0, d), self.cfg.feature_dtype)
        logits = torch.cat([it.logits for it in done]).numpy() if done else np.zeros((0, k), np.float32)
        for name, values in (("features", features), ("logits", logits)):
            finite = np.isfinite(values).all(axis=1)
            if not finite.all():
                row = int(sample_index[np.flatnonzero(~finite)[0]])
                hint = " (float16 overflow: rerun with --feature-dtype float32)" if name == "features" and self.cfg.feature_dtype == "float16" else ""
                raise ExtractError(f"the model gave non-finite {name} for list row {row} ({self.images.paths[row]}){hint}.")
        skipped = torch.cat([it.bad_rows for it in items]).numpy().astype(np.int64)
        part = {
            "features": features,
            "logits": logits.astype(np.float32, copy=False),
            "labels": self.images.labels[sample_index],
            "sample_index": sample_index.astype(np.int64),
            "view": np.tile(np.arange(views, dtype=np.int16), len(rows)),
            "skipped": skipped,
        }
        self.workdir.write_part(chunk, part)
        if self.on_part is not None:
            self.on_part(chunk, part)
        self.skipped.extend(skipped.tolist())
        self.rows_written += len(sample_index)


def _plan(chunks: list[int], num_rows: int, chunk_size: int, batch_size: int) -> list[tuple[int, bool, range]]:
    """(chunk, last batch of its chunk, list rows) for every batch; batches start at chunk boundaries."""
    plan = []
    for chunk in chunks:
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, num_rows)
        for b in range(start, stop, batch_size):
            plan.append((chunk, b + batch_size >= stop, range(b, min(b + batch_size, stop))))
    return plan


def _run_chunks(runner: _Runner, dataset: ViewDataset, plan: list, cfg: ExtractConfig, show: bool) -> int:
    on_cuda = runner.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[rows for _, _, rows in plan],
        num_workers=cfg.workers,
        collate_fn=collate_views,
        pin_memory=on_cuda,
        prefetch_factor=cfg.prefetch if cfg.workers > 0 else None,
    )
    total = sum(len(rows) for _, _, rows in plan)
    bar = tqdm(total=total, desc=f"extract {Path(cfg.out).name}", unit="img", file=sys.stderr, disable=not show, smoothing=0.05,
               dynamic_ncols=True)
    with bar, contextlib.closing(runner):
        for (chunk, last, planned), batch in zip(plan, loader, strict=True):
            x, rows, bad_rows, errors = runner.to_device(batch)
            for error in errors:
                if cfg.strict:
                    raise ImageDecodeError(f"{error} (--strict stops at the first bad image; without it bad images are skipped and listed).")
                logger.warning("skipped %s", error)
                runner.first_skip = runner.first_skip or str(error).rstrip(".")
            runner.launch(chunk, last, x, rows, bad_rows)
            bar.update(len(planned))
        runner.flush()
    return total


# -- the job --------------------------------------------------------------------------------------
def extract_bank(cfg: ExtractConfig, *, dist: DistContext | None = None, model: LoadedModel | None = None) -> ExtractResult:
    """Run (or resume) one extraction; returns when ``cfg.out`` is a complete bank (on rank 0).

    ``model``: an already loaded ``cfg.model`` on ``cfg.device`` (e.g. warmed up by a benchmark), else loaded here.
    """
    dist = dist or DistContext()
    start_time = time.perf_counter()
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError("--device cuda was requested but torch.cuda.is_available() is False.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    card = _card(cfg.card)
    card_classes = card.get("classes") if isinstance(card.get("classes"), list) else None
    # the images before the (slow) model: a bad list or folder is said at once
    images = read_list(cfg.list_file, cfg.root) if cfg.list_file is not None else scan_folder(cfg.folder, card_classes)
    if cfg.list_file is not None:  # none of the listed paths exists: said before the model loads
        _check_images_exist(images, cfg.list_file)
    if cfg.decode == "torchvision":
        device_decode.require_torchvision_io()
    if model is None:
        probe = resolve_preprocessing(cfg, card, None)[0] if Path(cfg.model).is_file() else None  # a TorchScript probe's size
        model = load_model(cfg.model, str(cfg.weights) if cfg.weights else None, classifier_layer=cfg.classifier_layer,
                           device=str(device), input_size=probe.crop if probe else (224, 224), model_args=cfg.model_args)
    prep, prep_source = resolve_preprocessing(cfg, card, model)
    k = model.num_classes
    _check_num_classes(cfg.model, k)
    known = card_classes if card_classes is not None else model.class_names  # the card's class names, else the model's config's
    if cfg.folder is not None and card_classes is None and known is not None:  # class folders matched against the model's names
        images = scan_folder(cfg.folder, known)
    _check_labels(images, k)
    class_names = [str(c) for c in known] if known is not None and len(known) == k else None
    if class_names is None and images.class_names is not None and len(images.class_names) == k:
        class_names = list(images.class_names)
    counts, counts_source = _class_counts(cfg.class_counts_from, images, k)
    preprocessing = {**prep.to_dict(), "augmentation": augmentation_name(prep, cfg.augment), "source": prep_source,
                     "views": cfg.views, "seed": cfg.seed, "decode": cfg.decode,
                     "jpeg_draft": cfg.draft}
    manifest = {
        "model": cfg.model,
        "model_args": cfg.model_args,
        "model_fingerprint": model.fingerprint,
        "classifier_layer": cfg.classifier_layer,
        "root": str(images.root.resolve()),
        "list_digest": _list_digest(images),
        "num_rows": len(images),
        "preprocessing": preprocessing,
        "max_pixels": cfg.max_pixels,
        "batch_size": cfg.batch_size,
        "chunk_size": cfg.chunk_size,
        "feature_dtype": cfg.feature_dtype,
        "device_type": device.type,
    }
    workdir = WorkDir(out)
    error = None
    if dist.is_main:  # rank 0 decides; every rank raises the same error
        try:
            check_output_file(out, "--out", overwrite=cfg.overwrite)  # a new name, or a regular file with --overwrite
            workdir.prepare(manifest, explain=_resume_hint(cfg, model))
        except DisalignError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error is not None:
        raise ExtractError(error)

    header = BankHeader(
        writer_kwargs={
            "feature_dim": model.feature_dim,
            "class_names": class_names or [str(i) for i in range(k)],
            "feature_dtype": cfg.feature_dtype,
            "class_counts": counts,
            "model_fingerprint": model.fingerprint,
            "preprocessing": preprocessing,
            "num_views": cfg.views,
            "classifier_weight": model.classifier_weight,
            "classifier_bias": model.classifier_bias,
        },
        extra_attrs={"class_counts_source": counts_source, "source": str(cfg.list_file or cfg.folder), "model_spec": cfg.model,
                     **({"model_args": json.dumps(cfg.model_args, sort_keys=True)} if cfg.model_args else {})},
    )
    num_chunks = -(-len(images) // cfg.chunk_size)
    mine = list(chunk_range(num_chunks, dist.rank, dist.world_size))
    todo = [c for c in mine if not workdir.has_part(c)]
    if len(todo) < len(mine):
        logger.info("rank %d: resuming, %d of %d chunks already done", dist.rank, len(mine) - len(todo), len(mine))
    # The bank (or this rank's shard) is appended while chunks complete, so little is left to do at the end.
    virtual = cfg.assemble == "virtual" and dist.world_size > 1
    shard = out.with_name(out.name + ".shards") / f"shard-{dist.rank:05d}-of-{dist.world_size:05d}.h5"
    assembler = None
    if virtual:
        shard.parent.mkdir(exist_ok=True)
        assembler = PartsAssembler(shard, header, workdir, mine, overwrite=True, temporary_path=workdir.path / f"{shard.name}.partial")
    elif dist.is_main:
        assembler = PartsAssembler(out, header, workdir, range(num_chunks), overwrite=cfg.overwrite,
                                   temporary_path=workdir.path / "bank.h5.partial")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runner = _Runner(model, prep, images, workdir, cfg, on_part=assembler.add if assembler else None)
    dataset = ViewDataset(images, prep, views=cfg.views, seed=cfg.seed, max_pixels=cfg.max_pixels, draft=cfg.draft, decode=cfg.decode,
                          augment=cfg.augment)
    plan = _plan(todo, len(images), cfg.chunk_size, cfg.batch_size)
    show = not cfg.quiet and dist.is_main and sys.stderr.isatty()
    finished = False
    try:
        loop_start = time.perf_counter()
        decoded = _run_chunks(runner, dataset, plan, cfg, show) if plan else 0
        assemble_start = time.perf_counter()
        if virtual:
            assembler.finish()
            finished = True
            dist.barrier()
            if dist.is_main:
                shards = [shard.with_name(f"shard-{r:05d}-of-{dist.world_size:05d}.h5") for r in range(dist.world_size)]
                write_virtual_bank(shards, out, overwrite=cfg.overwrite)
        else:
            dist.barrier()  # every rank's parts are on disk
            if assembler is not None:
                try:
                    assembler.finish()
                except EmptyBankError:
                    workdir.remove()  # parts of skipped images only: a rerun after a fix starts over
                    first = f", the first: {runner.first_skip}" if runner.first_skip else ""
                    raise ExtractError(f"none of the {len(images)} images of {cfg.list_file or cfg.folder} could be decoded "
                                       f"(all skipped{first}); no bank was written.") from None
                finished = True
        if dist.is_main:
            workdir.remove()
        dist.barrier()
    finally:
        if assembler is not None and not finished:
            assembler.abort()
    now = time.perf_counter()
    result = ExtractResult(out, runner.rows_written, decoded - len(runner.skipped), runner.skipped, seconds=now - start_time,
                           loop_seconds=assemble_start - loop_start, assemble_seconds=now - assemble_start)
    logger.info("rank %d: %d images (%d rows) in %.1f s, %.0f images/s, %d skipped",
                dist.rank, result.images, result.rows, result.seconds, result.images_per_second, len(result.skipped))
    return result
