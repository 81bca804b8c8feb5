"""Stage 4, the compile: StableHLO text -> IREE VM flatbuffer (.vmfb) for one target.

Compiles go through a content-addressed cache keyed on the program, the flags and the compiler
version (and, for host targets, this CPU), so an unchanged rebuild costs a file read. The
cache lives in `MHAGEN_CACHE_DIR` (default `~/.cache/mhagen`); `MHAGEN_CACHE_DIR=off` disables it.
A compile that runs longer than `MHAGEN_COMPILE_TIMEOUT` seconds (default 1200) is stopped and
reported as a `CompileError`, never left hanging.

    vmfb = compile_program(program.text, get_target("cpu"))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CompileError, MhagenError, TargetError
from .runtime import host_cpu_features
from .targets import Target, compile_flags, get_target, stated_flags

__all__ = ["Compiled", "compile_program", "compiler_version", "cache_dir", "check_dtype"]

DEFAULT_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class Compiled:
    """A compiled module and how it was made."""

    vmfb: bytes
    target: Target
    flags: tuple[str, ...]
    seconds: float
    cached: bool
    key: str


def compiler_version() -> str:
    try:
        return importlib.metadata.version("iree-base-compiler")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_dir() -> Path | None:
    value = os.environ.get("MHAGEN_CACHE_DIR", "")
    if value.lower() == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "mhagen"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_dtype(target: Target, dtype: str) -> None:
    """Refuse, before compiling, a compute dtype the target cannot do."""
    if dtype not in target.dtypes:
        raise TargetError(f"Target `{target.name}` cannot compute in {dtype}: it supports "
                          f"{', '.join(target.dtypes)}; pick another target or dtype")
    missing = target.missing_cpu_features(dtype)
    if missing:
        raise TargetError(f"Target `{target.name}` cannot compute in {dtype} on this machine: it needs "
                          f"the CPU feature(s) {', '.join(missing)}, which this CPU lacks; pick "
                          f"another dtype or a machine that has them")


def compile_program(text: str, target: Target | str, *, extra_flags: list[str] | None = None) -> Compiled:
    """Compile StableHLO `text` for `target`. Raises `CompileError` with the diagnostics."""
    target = get_target(target)
    extra = list(extra_flags or [])
    flags = compile_flags(target) + extra
    key = _cache_key(target, extra, text)
    cache = cache_dir()
    cached_path = cache / f"{key}.vmfb" if cache else None
    if cached_path is not None and cached_path.is_file():
        return Compiled(cached_path.read_bytes(), target, tuple(flags), 0.0, True, key)

    start = time.perf_counter()
    vmfb = _run_compiler(text, target, flags)
    seconds = time.perf_counter() - start
    if cached_path is not None:
        try:
            _atomic_write(cached_path, vmfb)
        except OSError:
            pass  # a read-only or full cache directory only costs speed
    return Compiled(vmfb, target, tuple(flags), seconds, False, key)


def compile_timeout() -> float:
    value = os.environ.get("MHAGEN_COMPILE_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise MhagenError(f"MHAGEN_COMPILE_TIMEOUT must be a number of seconds; got {value!r}") from None


def _run_compiler(text: str, target: Target, flags: list[str]) -> bytes:
    """Run iree-compile on `text` with a time limit; IREE_SAVE_TEMPS works as with IREE's tools."""
    from iree.compiler.tools.core import CompilerOptions, build_compile_command_line
    from iree.compiler.tools.debugging import TempFileSaver

    timeout = compile_timeout()
    with TempFileSaver.implicit() as tfs:
        saved_input = tfs.alloc_optional("core-input.mlir")
        if saved_input:
            Path(saved_input).write_text(text)
        command = build_compile_command_line("-", tfs, CompilerOptions(input_type="stablehlo",
                                                                       extra_args=flags))
        saved_command = tfs.alloc_optional("core-command-line.txt")
        if saved_command:
            Path(saved_command).write_text(" ".join(command))
        try:
            done = subprocess.run(command, input=text.encode(), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CompileError(f"IREE did not finish compiling for target `{target.name}` within "
                               f"{timeout:g} s (stopped; MHAGEN_COMPILE_TIMEOUT sets the limit)",
                               command=command) from None
    if done.returncode != 0:
        raise CompileError(f"IREE failed to compile for target `{target.name}` ({target.backend})",
                           command=command,
                           diagnostics=_trim(done.stderr.decode(errors="replace")) or
                           f"iree-compile exited with status {done.returncode}")
    return done.stdout


def _cache_key(target: Target, extra_flags: list[str], text: str) -> str:
    """SHA-256 of what decides the module: compiler version, flags, tuning spec content, program.

    The tuning spec enters by content, not by its path, so the key is the same in every checkout
    and changes when the spec does. A host target builds for this machine's CPU, so its features
    enter too: a cache shared by machines of different CPUs never hands one the other's code.
    """
    h = hashlib.sha256()
    for part in [compiler_version(), *stated_flags(target), *extra_flags]:
        h.update(part.encode() + b"\0")
    if target.arch == "host":
        h.update(b"host-cpu\0" + " ".join(sorted(host_cpu_features())).encode() + b"\0")
    if target.active_tuning_spec:
        h.update(b"tuning-spec\0" + Path(target.active_tuning_spec).read_bytes() + b"\0")
    h.update(text.encode())
    return h.hexdigest()


def _trim(text: str, limit: int = 40) -> str:
    """Keep the compiler's error lines, not its whole IR dump."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    chosen = errors or lines
    if len(chosen) > limit:
        chosen = chosen[:limit] + [f"... ({len(chosen) - limit} more lines)"]
    return "\n".join(chosen)
