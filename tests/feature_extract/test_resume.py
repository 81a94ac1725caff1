"""Resume after a real SIGKILL: the restarted run continues from the last complete chunk and the bank is
identical to an uninterrupted one; a killed run never leaves anything readable as a complete bank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from disalign.calib.data.bank import load_bank, open_bank
from disalign.calib.errors import BankError

from .conftest import REPO, extract_args, run_module


def test_sigkill_then_resume_gives_the_uninterrupted_bank(tmp_path, cifar_root, small_lists, reference256):
    out = tmp_path / "train256.h5"
    parts = tmp_path / "train256.h5.parts"
    args = extract_args(cifar_root, small_lists["train256"], out)
    proc = subprocess.Popen([sys.executable, *args, "--quiet"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and any(parts.glob("chunk-*.npz"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the extraction ended before its first part was written: {proc.communicate()[1].decode()}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in parts.glob("chunk-*.npz"))
    assert 1 <= len(done) < 8, done
    assert not out.exists()
    with pytest.raises(BankError, match=r"train256.h5 does not exist"):
        load_bank(out)
    leftovers = list(tmp_path.rglob("*.partial"))
    assert [p.parent for p in leftovers] in ([], [parts])  # the bank being appended lives inside the parts dir
    for leftover in leftovers:  # and is never readable as a complete bank
        with pytest.raises(BankError, match=r"is not a readable HDF5 file|is not a complete bank"):
            open_bank(leftover)

    rerun = run_module(args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"rank 0: resuming, {len(done)} of 8 chunks already done" in rerun.stderr
    assert not parts.exists()
    resumed, reference = load_bank(out), load_bank(reference256)
    for name in ("features", "logits", "labels", "sample_index", "view"):
        assert torch.equal(getattr(resumed, name), getattr(reference, name)), name
    assert torch.equal(resumed.classifier_weight, reference.classifier_weight)
    assert resumed.info.class_counts.tolist() == reference.info.class_counts.tolist()

