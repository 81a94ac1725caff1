"""Two ranks under torchrun on CPU (gloo): the assembled bank equals the single-process bank."""

from __future__ import annotations

import pytest
import torch

from disalign.calib.data.bank import load_bank
from disalign.feature_extract.distributed import chunk_range

from .conftest import extract_args, free_port, run_module


def test_chunk_ranges_cover_every_chunk_once():
    for chunks in (0, 1, 7, 8, 100):
        for world in (1, 2, 3, 8):
            ranges = [chunk_range(chunks, r, world) for r in range(world)]
            assert [c for r in ranges for c in r] == list(range(chunks))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("assemble", ["concat", "virtual"])
def test_two_ranks_equal_one_process(tmp_path, cifar_root, small_lists, reference256, assemble):
    out = tmp_path / "train256.h5"
    proc = run_module(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                       *extract_args(cifar_root, small_lists["train256"], out), "--assemble", assemble, "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "train256.h5.parts").exists()
    shards = sorted(p.name for p in (tmp_path / "train256.h5.shards").glob("*.h5")) if assemble == "virtual" else []
    assert shards == (["shard-00000-of-00002.h5", "shard-00001-of-00002.h5"] if assemble == "virtual" else [])
    bank, reference = load_bank(out), load_bank(reference256)
    for name in ("features", "logits", "labels", "sample_index", "view"):
        assert torch.equal(getattr(bank, name), getattr(reference, name)), name
    assert torch.equal(bank.classifier_weight, reference.classifier_weight)
    assert bank.info.class_counts.tolist() == reference.info.class_counts.tolist()
    assert bank.info.class_names == reference.info.class_names and bank.skipped.tolist() == []
