"""disalign.calib.files: a whole new directory written atomically, and the targets it refuses."""

from __future__ import annotations

import pytest

from disalign.calib.errors import InputError
from disalign.calib.files import check_new_directory, write_directory_atomic


def fill(staging):
    (staging / "sub").mkdir()
    (staging / "sub" / "a.txt").write_text("a")
    (staging / "b.txt").write_text("b")


@pytest.mark.parametrize("exists", [False, True])
def test_a_new_or_empty_directory_appears_whole(tmp_path, exists):
    out = tmp_path / "parent" / "out"
    if exists:
        out.mkdir(parents=True)
    assert write_directory_atomic(out, fill) == out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["b.txt", "sub", "sub/a.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging directory left


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(staging):
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_directory_atomic(tmp_path / "out", broken)
    assert list(tmp_path.iterdir()) == []


def test_refused_targets(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match=r"^--out .*busy is not empty \(mine.txt\); give a new or empty directory \(nothing in it is replaced\)\.$"):
        write_directory_atomic(tmp_path / "busy", fill, role="--out")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"^out .*file is an existing file; give a new or empty directory\.$"):
        check_new_directory(tmp_path / "file", "out")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"is a dangling symlink"):
        check_new_directory(tmp_path / "link", "out")
    with pytest.raises(InputError, match=r"cannot be created: .*file is not a writable directory\.$"):
        check_new_directory(tmp_path / "file" / "below", "out")
