"""Publishing calibration directories: layout, atomicity under kill -9 and concurrent readers, file modes,
the old flat layout, and targets that are not calibrations (nothing of them is ever touched)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disalign.calib.artifact.format import artifact_bytes
from disalign.calib.artifact.publish import (
    ARTIFACT_FILES,
    CURRENT,
    KEEP_VERSIONS,
    VERSIONS,
    artifact_dir,
    check_publish_target,
    current_version,
    publish,
)
from disalign.calib.errors import ArtifactError
from disalign.calib.estimators.base import Calibrator
from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import load_calibration
from tests.conftest import REPO


@pytest.fixture(scope="module")
def two(lt_banks) -> tuple[DisAlign, DisAlign]:
    """Two calibrations of the same bank that differ in every parameter (seeds 0 and 1)."""
    return tuple(DisAlign(rho=1.0, epochs=1, seed=seed).fit(lt_banks["train"]) for seed in (0, 1))


def files_of(est: Calibrator) -> dict[str, bytes]:
    from dataclasses import asdict

    return artifact_bytes(est.params_, asdict(est.meta_), est.method)


def which(loaded: Calibrator, candidates: tuple[Calibrator, ...]) -> int:
    """Index of the candidate whose parameters *and* metadata ``loaded`` has exactly; fails on a mix."""
    for i, est in enumerate(candidates):
        if loaded.meta_.hyperparameters == est.meta_.hyperparameters and all(
                torch.equal(loaded.params_[n], est.params_[n]) for n in est.params_):
            return i
    raise AssertionError(f"the loaded calibration is none of the candidates (seed {loaded.meta_.hyperparameters['seed']})")


def write_flat(directory: Path, est: Calibrator) -> None:
    """The layout of artifacts written before versioned publishing: the two files directly in the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files_of(est).items():
        (directory / name).write_bytes(data)


# -- layout -----------------------------------------------------------------------------------------
def test_save_publishes_versions_behind_a_relative_current_link(two, tmp_path):
    a, b = two
    target = tmp_path / "cal"
    assert current_version(target) is None
    assert a.save(target) == target
    first = os.readlink(target / CURRENT)
    assert first.startswith(f"{VERSIONS}/") and sorted(os.listdir(target)) == [CURRENT, VERSIONS]
    assert sorted(os.listdir(target / first)) == sorted(ARTIFACT_FILES)
    assert which(load_calibration(target), two) == 0 and current_version(target) == first
    b.save(target)
    second = current_version(target)
    assert second != first and second > first  # time-ordered ids
    assert which(load_calibration(target), two) == 1
    assert (target / first).is_dir()  # the previous version stays for readers that resolved it a moment ago
    for _ in range(KEEP_VERSIONS + 2):
        a.save(target)
    kept = sorted(os.listdir(target / VERSIONS))
    assert len(kept) == KEEP_VERSIONS and os.readlink(target / CURRENT) == f"{VERSIONS}/{kept[-1]}"


def test_files_and_directories_follow_the_umask(two, tmp_path):
    """A calibration fitted on the host as root must be readable by the container's uid 10001."""
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        previous = os.umask(umask)
        try:
            two[0].save(tmp_path / f"cal{umask:o}")
        finally:
            os.umask(previous)
        files = artifact_dir(tmp_path / f"cal{umask:o}")
        assert {name: oct(os.stat(files / name).st_mode & 0o777) for name in ARTIFACT_FILES} == dict.fromkeys(ARTIFACT_FILES, oct(file_mode))
        assert oct(os.stat(files).st_mode & 0o777) == oct(dir_mode)
        assert oct(os.stat(tmp_path / f"cal{umask:o}").st_mode & 0o777) == oct(dir_mode)


def test_a_flat_artifact_loads_and_is_converted_by_the_next_publish(two, tmp_path):
    a, b = two
    target = tmp_path / "old"
    write_flat(target, a)
    assert artifact_dir(target) == target and current_version(target).startswith("flat:")
    assert which(load_calibration(target), two) == 0
    b.save(target)
    assert sorted(os.listdir(target)) == [CURRENT, VERSIONS]
    assert which(load_calibration(target), two) == 1


def test_a_copied_current_directory_is_one_sentence(two, tmp_path):
    two[0].save(tmp_path / "cal")
    link = tmp_path / "cal" / CURRENT
    resolved = link.resolve()
    link.unlink()
    resolved.rename(link)  # what `cp -r` without -a makes of the link
    with pytest.raises(ArtifactError, match=r"current should be a symlink to versions/<id>, found a directory \(copy .* cp -a\)"):
        load_calibration(tmp_path / "cal")
    (tmp_path / "abs").mkdir()
    os.symlink(tmp_path / "cal" / CURRENT, tmp_path / "abs" / CURRENT)
    with pytest.raises(ArtifactError, match="should point to versions/<id> \\(a relative path\\)"):
        load_calibration(tmp_path / "abs")


# -- targets that are not calibrations ---------------------------------------------------------------
def test_publish_refuses_what_is_not_a_calibration_and_touches_nothing(two, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.h5").write_bytes(b"bank")
    (work / "notes.txt").write_text("notes")
    with pytest.raises(ArtifactError, match=r"calibration directory .*work holds files that are not a calibration \(notes.txt, train.h5\)"):
        two[0].save(work)
    assert sorted(os.listdir(work)) == ["notes.txt", "train.h5"] and (work / "train.h5").read_bytes() == b"bank"
    (tmp_path / "report.txt").write_text("report")
    with pytest.raises(ArtifactError, match="report.txt is an existing file, not a calibration directory"):
        two[0].save(tmp_path / "report.txt")
    assert (tmp_path / "report.txt").read_text() == "report"
    with pytest.raises(ArtifactError, match=r"cannot be created: .*report.txt is not a directory"):
        check_publish_target(tmp_path / "report.txt" / "cal")
    monkeypatch.chdir(work)
    with pytest.raises(ArtifactError, match=r"--out \. holds files that are not a calibration"):
        check_publish_target(Path("."), role="--out")
    empty = tmp_path / "empty"
    empty.mkdir()
    two[0].save(empty)
    with pytest.raises(ArtifactError, match="already holds a calibration"):
        two[1].save(empty, overwrite=False)
    assert which(load_calibration(empty), two) == 0


@pytest.mark.parametrize("case", ["notes", "junk_pair", "half_pair", "json_not_an_artifact", "symlinked"])
def test_a_flat_calibration_json_that_is_not_an_artifact_is_never_replaced(case, two, tmp_path):
    """Issue 21 §2: a user's notes named calibration.json (or junk beside a parameters.safetensors) was deleted, exit 0."""
    target = tmp_path / "cal"
    target.mkdir()
    files = {"notes": {"calibration.json": b"my notes, not JSON"},
             "junk_pair": {"calibration.json": b"junk", "parameters.safetensors": b"junk"},
             "half_pair": {"calibration.json": files_of(two[0])["calibration.json"]},
             "json_not_an_artifact": {"calibration.json": b'{"my": "settings"}', "parameters.safetensors": files_of(two[0])["parameters.safetensors"]},
             "symlinked": {}}[case]
    for name, data in files.items():
        (target / name).write_bytes(data)
    if case == "symlinked":
        (tmp_path / "mine.json").write_bytes(files_of(two[0])["calibration.json"])
        (target / "calibration.json").symlink_to(tmp_path / "mine.json")
        (target / "parameters.safetensors").write_bytes(files_of(two[0])["parameters.safetensors"])
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    message = {"notes": r"cal holds calibration\.json without parameters\.safetensors",
               "junk_pair": r"cal/calibration\.json is not a calibration artifact's metadata \(not a JSON object\)",
               "half_pair": r"cal holds calibration\.json without parameters\.safetensors",
               "json_not_an_artifact": r"cal/calibration\.json is not a calibration artifact's metadata \(no 'method', 'num_classes', "
                                       r"'artifact_version'\)",
               "symlinked": r"cal/calibration\.json is a symlink; a calibration's files are regular files"}[case]
    with pytest.raises(ArtifactError, match=message + r".*; move (it|them) away or give another directory\."):
        two[1].save(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(target)) == sorted(before)  # no versions/, no current


@pytest.mark.parametrize("case", ["current_file", "versions_file", "current_outside", "current_absolute", "versions_symlink"])
def test_a_current_or_versions_that_is_not_ours_is_refused_by_the_check(case, two, tmp_path):
    """Issue 21 §2: these passed check_publish_target, so `fit` ran and then failed, leaving an empty versions/."""
    target = tmp_path / "cal"
    target.mkdir()
    (tmp_path / "outside").mkdir()
    if case == "current_file":
        (target / CURRENT).write_text("my current notes")
    elif case == "versions_file":
        (target / VERSIONS).write_text("my version list")
    elif case == "current_outside":
        (target / CURRENT).symlink_to("../outside")
    elif case == "current_absolute":
        (target / CURRENT).symlink_to(tmp_path / "outside")
    else:
        (target / VERSIONS).symlink_to(tmp_path / "outside")
    before = sorted(os.listdir(target))
    message = {"current_file": r"cal/current should be a symlink to versions/<id>, found a file",
               "versions_file": r"cal/versions should be a directory of versions, found a file",
               "current_outside": r"cal/current should point to versions/<id> \(a relative path\), found '\.\./outside'",
               "current_absolute": r"cal/current should point to versions/<id> \(a relative path\), found '/",
               "versions_symlink": r"cal/versions should be a directory of versions, found a symlink"}[case]
    with pytest.raises(ArtifactError, match=message):
        check_publish_target(target)
    with pytest.raises(ArtifactError, match=message):
        two[0].save(target)
    assert sorted(os.listdir(target)) == before and os.listdir(tmp_path / "outside") == []


# -- atomicity --------------------------------------------------------------------------------------
WRITER = r"""
import os, signal, sys
from pathlib import Path

target, kill_at, source = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
files = {name: (source / name).read_bytes() for name in sorted(os.listdir(source))}
from disalign.calib.artifact.publish import publish
EVENTS = {"open", "os.mkdir", "os.rename", "os.symlink", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod"}
count = 0

def hook(event, args):  # runs before each file-system operation: SIGKILL right before the kill_at-th one
    global count
    if event in EVENTS:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
publish(target, files)
sys.stdout.write(f"{count}\n")
"""


def run_writer(target: Path, kill_at: int, source: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", WRITER, str(target), str(kill_at), str(source)],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("layout", ["published", "flat"])
def test_kill_9_between_any_two_file_operations_leaves_a_complete_artifact(two, tmp_path, layout):
    """A real writer process is SIGKILLed right before each of its file-system operations in turn; after each
    kill the directory serves the old or the new complete calibration, and a new publish still succeeds."""
    a, b = two
    source = tmp_path / "b_files"
    source.mkdir()
    for name, data in files_of(b).items():
        (source / name).write_bytes(data)
    for kill_at in itertools.count(1):
        target = tmp_path / f"cal{kill_at}"
        if layout == "flat":
            write_flat(target, a)
        else:
            for _ in range(KEEP_VERSIONS + 1):  # a full history, so the publish has old versions to remove
                a.save(target)
        done = run_writer(target, kill_at, source)
        if done.returncode == 0:  # no operation left to kill before: every one was tried
            assert int(done.stdout) == kill_at - 1
            assert which(load_calibration(target), two) == 1
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert which(load_calibration(target), two) in (0, 1), f"after a kill before operation {kill_at}"
        b.save(target)  # recovery: the next publish is not disturbed by what the killed one left
        assert which(load_calibration(target), two) == 1
        assert kill_at < 200, "the writer never finished"
    assert kill_at > 8  # the publish really had that many operations to interrupt


def test_concurrent_readers_never_fail_during_repeated_saves(two, tmp_path):
    """A writer process publishes, alternating two calibrations, while this process reads continuously (at
    least 30 publishes and 60 reads, however the machine's load shares the time between them): every read
    gets one complete calibration (parameters and metadata of the same one)."""
    target = tmp_path / "cal"
    two[0].save(target)
    sources = []
    for i, est in enumerate(two):
        sources.append(tmp_path / f"src{i}.json")
        sources[-1].write_text(json.dumps({name: data.hex() for name, data in files_of(est).items()}))
    stop = tmp_path / "stop"
    script = ("import json, os, sys\nfrom disalign.calib.artifact.publish import publish\n"  # no torch: the writer starts at once
              "files = [{n: bytes.fromhex(h) for n, h in json.load(open(p)).items()} for p in sys.argv[3:]]\n"
              "i = 0\nwhile i < 30 or not os.path.exists(sys.argv[2]):\n    publish(sys.argv[1], files[(i + 1) % 2])\n    i += 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", script, str(target), str(stop), *map(str, sources)], env=env)
    reads, failures, seen = 0, [], set()
    try:
        while writer.poll() is None:
            try:
                seen.add(which(load_calibration(target), two))
            except (ArtifactError, AssertionError) as exc:
                failures.append(str(exc))
            reads += 1
            if reads == 60:
                stop.touch()
    finally:
        stop.touch()
        writer.wait(60)
    assert writer.returncode == 0
    assert reads >= 60 and failures == [], f"{len(failures)} of {reads} reads failed: {failures[:3]}"
    assert seen == {0, 1}


def test_current_version_is_one_readlink_and_changes_on_publish(two, tmp_path):
    target = tmp_path / "cal"
    two[0].save(target)
    before = current_version(target)
    start = time.perf_counter()
    for _ in range(1000):
        current_version(target)
    assert (time.perf_counter() - start) / 1000 < 1e-3  # cheap enough to poll every second in every replica
    publish(target, files_of(two[1]))
    assert current_version(target) != before
    assert json.loads((artifact_dir(target) / "calibration.json").read_text())["hyperparameters"]["seed"] == 1
