"""What the command-line tests share: running ``disalign`` in-process and capturing what it printed."""

from __future__ import annotations

from disalign.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``disalign ARGV…`` in this process → (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
