"""The compile cache verifies what it returns, and the compiler child dies with its parent.

Every entry `KEY.vmfb` carries the module's SHA-256, checked on every read: a flipped bit, a
truncation or a missing digest is discarded with one warning line and recompiled, never shipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import mhagen
import mhagen.compile
from mhagen.cli import main
from mhagen.compile import compile_program

from conftest import ROOT, make_spec

SPEC_TOML = "[layer]\nnum_heads = 2\nkey_dim = 4\n[call]\nquery = [2, 5, 8]\nvalue = [2, 7, 8]\n"
WARNING = "mhagen: warning: cache entry {key} is corrupt ({why}); recompiling"


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("mhagen: warning:")]


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# ---- through the CLI, as a user meets it --------------------------------------------------------
def test_flipped_bit_in_a_real_entry_is_recompiled_and_verified(tmp_path: Path, monkeypatch, capsys) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(cache))
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC_TOML)
    assert main(["build", str(spec), "--target", "cpu", "--out", str(tmp_path / "a")]) == 0
    (entry,) = cache.glob("*.vmfb")
    _flip_bit(entry, entry.stat().st_size // 2)          # inside the module, past the header
    capsys.readouterr()

    assert main(["build", str(spec), "--target", "cpu", "--out", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert _warnings(err) == [WARNING.format(key=entry.stem, why="SHA-256 mismatch")], err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (target,) = manifest["targets"]
    assert target["cached"] is False and target["verify"]["status"] == "pass", target
    # The bundle holds the recompiled module, byte for byte the first build's.
    assert (tmp_path / "b" / "cpu" / "module.vmfb").read_bytes() == (tmp_path / "a" / "cpu" / "module.vmfb").read_bytes()

    # The entry was rewritten whole: the next build takes it, silently.
    assert main(["build", str(spec), "--target", "cpu", "--out", str(tmp_path / "c")]) == 0
    assert _warnings(capsys.readouterr().err) == []
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["targets"][0]["cached"] is True
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]      # no temporary files left


# ---- every way an entry can be bad, through compile_program --------------------------------------
@pytest.fixture(scope="module")
def program_text() -> str:
    from mhagen.trace import trace

    spec = make_spec({"num_heads": 1, "key_dim": 2}, {"query": [1, 3, 4], "value": [1, 3, 4]})
    return trace(spec).text


@pytest.fixture()
def counted(monkeypatch, program_text: str) -> dict[str, Any]:
    """The real compiler, run once per test module, and a count of the compiles asked for."""
    real = mhagen.compile._run_compiler
    state: dict[str, Any] = {"calls": 0}

    def run(text: str, target: Any, flags: list[str]) -> bytes:
        state["calls"] += 1
        if text not in _COMPILED:
            _COMPILED[text] = real(text, target, flags)
        return _COMPILED[text]

    monkeypatch.setattr(mhagen.compile, "_run_compiler", run)
    return state


_COMPILED: dict[str, bytes] = {}


def _header() -> int:
    return mhagen.compile._ENTRY_HEADER


# name -> (how the entry is damaged, the reason in the warning)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "bit_in_module": (lambda p: _flip_bit(p, p.stat().st_size - 7), "SHA-256 mismatch"),
    "bit_in_digest": (lambda p: _flip_bit(p, _header() - 10), "SHA-256 mismatch"),
    "bit_in_magic": (lambda p: _flip_bit(p, 3), "no SHA-256 header"),
    "truncated_module": (lambda p: os.truncate(p, p.stat().st_size // 2), "SHA-256 mismatch"),
    "truncated_to_header": (lambda p: os.truncate(p, _header()), "SHA-256 mismatch"),
    "truncated_in_header": (lambda p: os.truncate(p, 20), "no SHA-256 header"),
    "empty": (lambda p: os.truncate(p, 0), "no SHA-256 header"),
    "missing_digest": (lambda p: p.write_bytes(p.read_bytes()[_header():]), "no SHA-256 header"),
    "appended_bytes": (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "SHA-256 mismatch"),
    "valid_entry_of_another_key": (lambda p: p.write_bytes(mhagen.compile._entry("0" * 64, b"other module")),
                                   "written for another key"),
    "valid_digest_other_module": (lambda p: p.write_bytes(p.read_bytes()[:_header()] + b"other module"),
                                  "SHA-256 mismatch"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_bad_entry_is_discarded_with_one_warning(damage: str, program_text: str, counted: dict[str, Any],
                                                 tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path))
    first = compile_program(program_text, "cpu")
    assert not first.cached and counted["calls"] == 1
    entry = tmp_path / f"{first.key}.vmfb"
    harm, why = DAMAGE[damage]
    harm(entry)
    capsys.readouterr()

    again = compile_program(program_text, "cpu")
    assert not again.cached and counted["calls"] == 2 and again.vmfb == first.vmfb
    assert _warnings(capsys.readouterr().err) == [WARNING.format(key=first.key, why=why)]
    third = compile_program(program_text, "cpu")
    assert third.cached and third.vmfb == first.vmfb and counted["calls"] == 2
    assert capsys.readouterr().err == ""


def test_entry_that_is_not_a_file_is_a_miss(program_text: str, counted: dict[str, Any], tmp_path: Path,
                                            monkeypatch, capsys) -> None:
    """A FIFO under the entry's name must not hang the read, a directory not break the build."""
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path))
    key = compile_program(program_text, "cpu").key
    entry = tmp_path / f"{key}.vmfb"
    entry.unlink()
    os.mkfifo(entry)
    assert not compile_program(program_text, "cpu").cached       # the FIFO was replaced atomically
    assert entry.is_file() and compile_program(program_text, "cpu").cached
    entry.unlink()
    entry.mkdir()
    assert not compile_program(program_text, "cpu").cached       # cannot replace it: compiled each time
    assert not compile_program(program_text, "cpu").cached
    assert _warnings(capsys.readouterr().err) == []


def test_unwritable_cache_keeps_refusing_a_bad_entry(program_text: str, counted: dict[str, Any],
                                                     tmp_path: Path, monkeypatch, capsys) -> None:
    """A bad entry that cannot be removed or replaced is refused (and reported) on every read."""
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path))
    key = compile_program(program_text, "cpu").key
    _flip_bit(tmp_path / f"{key}.vmfb", 200)

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:           # as a read-only folder would (root ignores chmod)
        m.setattr(mhagen.compile, "_atomic_write", read_only)
        m.setattr(Path, "unlink", read_only)
        for calls in (2, 3):
            assert not compile_program(program_text, "cpu").cached and counted["calls"] == calls
            assert _warnings(capsys.readouterr().err) == [WARNING.format(key=key, why="SHA-256 mismatch")]


def test_entry_is_digest_then_module(program_text: str, counted: dict[str, Any], tmp_path: Path,
                                     monkeypatch) -> None:
    import hashlib

    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path))
    c = compile_program(program_text, "cpu")
    data = (tmp_path / f"{c.key}.vmfb").read_bytes()
    header = f"mhagen-cache-entry key:{c.key} sha256:{hashlib.sha256(c.vmfb).hexdigest()}\n".encode()
    assert data == header + c.vmfb


# ---- the compiler child dies with its parent -----------------------------------------------------
def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, argv[0]) of the live processes whose parent is `pid`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append((int(proc.name), argv0))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")          # a zombie waits for its reaper, but runs no more


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_build_leaves_no_compiler_behind(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC_TOML)
    env = dict(os.environ, MHAGEN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    build = subprocess.Popen([sys.executable, "-m", "mhagen.cli", "build", str(spec), "--target", "cpu",
                              "--out", str(tmp_path / "out")], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    compiler = None
    try:
        deadline = time.monotonic() + 120
        while compiler is None and time.monotonic() < deadline and build.poll() is None:
            compiler = next((pid for pid, argv0 in _children(build.pid)
                             if Path(argv0).name == "iree-compile"), None)
            time.sleep(0.01)
        assert compiler is not None, "the build never ran iree-compile"
        build.send_signal(signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 10
        while _running(compiler) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _running(compiler), f"iree-compile {compiler} outlived its SIGKILLed parent"
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
        if compiler is not None and _running(compiler):
            os.kill(compiler, signal.SIGKILL)


def test_interrupted_wait_kills_and_reaps_the_compiler(program_text: str, tmp_path: Path, monkeypatch) -> None:
    """A KeyboardInterrupt while IREE runs kills the child and waits for it (subprocess.run's contract)."""
    monkeypatch.setenv("MHAGEN_CACHE_DIR", "off")
    seen: list[subprocess.Popen] = []
    real_communicate = subprocess.Popen.communicate

    def communicate(self: subprocess.Popen, *args: Any, **kwargs: Any) -> Any:
        seen.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    with pytest.raises(KeyboardInterrupt):
        compile_program(program_text, "cpu")
    monkeypatch.setattr(subprocess.Popen, "communicate", real_communicate)
    (child,) = seen
    assert child.returncode == -signal.SIGKILL and not _running(child.pid)
