"""The trust corpus: invalid inputs of every kind, each refused cleanly.

Each family lives in its own `tests/test_trust_<family>.py` and asserts, for every case, through
`refuses()`: exit code 2 (or a `MhagenError` from the API), at most 3 lines on stderr, no traceback,
and nothing written or left behind in the folders it watches. Data files of the corpus (invalid
specs and the like) sit beside this file in one folder per family.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

CORPUS = Path(__file__).resolve().parent


def tree_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `root` (hidden ones included, symlinks not followed): kind, size, mtime."""
    state: dict[str, tuple[str, int, int]] = {}
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            state[path.relative_to(root).as_posix()] = (kind, st.st_size if kind == "file" else 0,
                                                       st.st_mtime_ns if kind == "file" else 0)
    return state


def refuses(argv: Sequence[str], capsys, *, needle: str | Iterable[str] = (), code: int = 2,
            watch: Iterable[Path] = (), max_lines: int = 3) -> str:
    """Run `mhagen ARGV` in this process and assert a clean refusal; returns stderr.

    Clean: the exit code is `code`, stderr has 1..`max_lines` lines and no traceback, every `needle`
    appears in it, and no folder in `watch` changed (nothing written, nothing left behind)."""
    from mhagen.cli import main

    watch = [Path(w) for w in watch]
    before = {w: tree_state(w) for w in watch}
    capsys.readouterr()
    rc = main(list(argv))
    captured = capsys.readouterr()
    err = captured.err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == code, (rc, err, captured.out)
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert "internal error" not in err, err            # an unexpected exception, caught as a bug
    assert 1 <= len(lines) <= max_lines, lines
    for n in ([needle] if isinstance(needle, str) else list(needle)):
        assert n in err, (n, err)
    for w in watch:
        after = tree_state(w)
        assert after == before[w], {"added": sorted(set(after) - set(before[w])),
                                     "removed": sorted(set(before[w]) - set(after)),
                                     "changed": sorted(k for k in after if k in before[w] and after[k] != before[w][k])}
    return err
