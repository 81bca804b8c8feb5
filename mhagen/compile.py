"""Stage 4, the compile: StableHLO text -> IREE VM flatbuffer (.vmfb) for one target.

Compiles go through a content-addressed cache keyed on the program, the flags and the compiler
version (and, for host targets, this CPU), so an unchanged rebuild costs a file read. The
cache lives in `MHAGEN_CACHE_DIR` (default `~/.cache/mhagen`); `MHAGEN_CACHE_DIR=off` disables it.
Each entry, `KEY.vmfb`, starts with the SHA-256 of the module it holds and is written atomically
with it; every read checks it, and an entry that fails (a flipped bit, a truncation, no digest) is
discarded with one warning line and recompiled, never returned.

A compile that runs longer than `MHAGEN_COMPILE_TIMEOUT` seconds (default 1200) is stopped and
reported as a `CompileError`, never left hanging; the `iree-compile` child is killed when this
process is interrupted, fails, or (on Linux) dies, even by SIGKILL.

    vmfb = compile_program(program.text, get_target("cpu"))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompileError, MhagenError, TargetError
from .runtime import host_cpu_features
from .targets import Target, compile_flags, get_target, stated_flags

__all__ = ["Compiled", "compile_program", "is_cached", "compiler_version", "cache_dir", "check_dtype",
           "check_supported"]

DEFAULT_TIMEOUT_S = 1200.0
# A cache entry: the header `mhagen-cache-entry key:KEY sha256:DIGEST\n` (hex), then the module.
_ENTRY_MAGIC = b"mhagen-cache-entry key:"
_ENTRY_HEADER = len(_ENTRY_MAGIC) + 64 + len(b" sha256:") + 64 + 1


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


def check_supported(target: Target, spec: Any) -> None:
    """Refuse, before compiling, what the target cannot compute: its dtypes (`check_dtype`), and
    shapes whose code IREE 3.13 gets wrong for it."""
    check_dtype(target, spec.call.dtype_policy.compute)
    g = spec.geometry
    if "spirv" in target.backend and g.key_dim == 1 and g.num_heads > 1:
        # Found by `mhagen fuzz --seed 7`: with key_dim 1 and 2 or more heads, the SPIR-V code
        # gives wrong outputs on both attention paths (|err| 0.01-2.5 on lavapipe, varying between
        # runs, like reports/iree-spirv-reduction-transpose-race); key_dim 2, or one head, is exact.
        raise TargetError(f"Target `{target.name}` cannot compute attention with key_dim 1 and "
                          f"{g.num_heads} heads: IREE 3.13's SPIR-V code gets it wrong (|err| up to 2.5 "
                          "on lavapipe); use key_dim >= 2, one head, or another target")
    unit = min(g.num_heads * g.key_dim, g.num_heads * g.value_dim) == 1
    if target.backend == "llvm-cpu" and spec.call.dtype_policy.compute == "bfloat16" and unit:
        # Found by `mhagen fuzz --seed 7`: a bfloat16 projection onto one head of size 1 fails to
        # compile ("Unable to resolve all strided buffer descriptors"); 2 heads, or size 2, compile.
        raise TargetError(f"Target `{target.name}` cannot compile bfloat16 attention whose projections have "
                          f"one output ({g.num_heads} head(s) x key_dim {g.key_dim} / value_dim {g.value_dim}): "
                          "IREE 3.13's llvm-cpu fails on it; use float32, or more heads or a larger head size")


def is_cached(text: str, target: Target | str, *, extra_flags: list[str] | None = None) -> bool:
    """Whether the cache holds an entry for this compile (checked, and maybe discarded, when read):
    lets progress say "cached" rather than "compiling" before `compile_program` runs."""
    cache = cache_dir()
    target = get_target(target)
    return cache is not None and (cache / f"{_cache_key(target, list(extra_flags or []), text)}.vmfb").is_file()


def compile_program(text: str, target: Target | str, *, extra_flags: list[str] | None = None) -> Compiled:
    """Compile StableHLO `text` for `target`. Raises `CompileError` with the diagnostics."""
    target = get_target(target)
    extra = list(extra_flags or [])
    flags = compile_flags(target) + extra
    key = _cache_key(target, extra, text)
    cache = cache_dir()
    cached_path = cache / f"{key}.vmfb" if cache else None
    if cached_path is not None:
        vmfb = _read_entry(cached_path, key)
        if vmfb is not None:
            return Compiled(vmfb, target, tuple(flags), 0.0, True, key)

    start = time.perf_counter()
    vmfb = _run_compiler(text, target, flags)
    seconds = time.perf_counter() - start
    if cached_path is not None:
        try:
            _atomic_write(cached_path, _entry(key, vmfb))
        except OSError:
            pass  # a read-only or full cache directory only costs speed
    return Compiled(vmfb, target, tuple(flags), seconds, False, key)


def _entry(key: str, vmfb: bytes) -> bytes:
    """The cache entry for `key`: header with the key and the module's SHA-256, then the module.

    One file, so one atomic write lands both. The key in the header catches an entry copied or
    renamed under another key, which the digest alone would bless."""
    return _header(key, hashlib.sha256(vmfb).hexdigest()) + vmfb


def _header(key: str, digest: str) -> bytes:
    return _ENTRY_MAGIC + f"{key} sha256:{digest}\n".encode()


def _read_entry(path: Path, key: str) -> bytes | None:
    """The module cached at `path` if its SHA-256 checks out; None on a miss or a bad entry.

    A bad entry is removed, with one warning line on stderr, so the caller recompiles it."""
    try:
        if not path.is_file():        # absent, or not a regular file (reading a FIFO would block)
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _discard(path, key, f"unreadable: {exc.strerror or exc}")
    header, vmfb = data[:_ENTRY_HEADER], data[_ENTRY_HEADER:]
    digest = hashlib.sha256(vmfb).hexdigest()
    if header == _header(key, digest):
        return vmfb
    if len(header) < _ENTRY_HEADER or not header.startswith(_ENTRY_MAGIC):
        return _discard(path, key, "no SHA-256 header")
    if header[len(_ENTRY_MAGIC):][:64] != key.encode():
        return _discard(path, key, "written for another key")
    return _discard(path, key, "SHA-256 mismatch")


def _discard(path: Path, key: str, why: str) -> None:
    print(f"mhagen: warning: cache entry {key} is corrupt ({why}); recompiling", file=sys.stderr)
    try:
        path.unlink()
    except OSError:
        pass  # a read-only cache: the entry stays, and is checked (and refused) again next time
    return None


def compile_timeout() -> float:
    value = os.environ.get("MHAGEN_COMPILE_TIMEOUT", "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < 10**7):       # also NaN and inf: a limit must be a real time
        raise MhagenError(f"MHAGEN_COMPILE_TIMEOUT must be a number of seconds; got {value!r}")
    return seconds


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
            returncode, stdout, stderr = _run_reaped(_with_parent_death(command), text.encode(), timeout)
        except subprocess.TimeoutExpired:
            raise CompileError(f"IREE did not finish compiling for target `{target.name}` within "
                               f"{timeout:g} s (stopped; MHAGEN_COMPILE_TIMEOUT sets the limit)",
                               command=command) from None
    if returncode != 0:
        raise CompileError(f"IREE failed to compile for target `{target.name}` ({target.backend})",
                           command=command,
                           diagnostics=_trim(stderr.decode(errors="replace")) or
                           f"iree-compile exited with status {returncode}")
    return stdout


def _run_reaped(command: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
    """Run `command` to completion; on the timeout or anything else that stops the wait
    (KeyboardInterrupt included) the child is killed and reaped before the exception goes on.

    `subprocess.run` kills too, but after a KeyboardInterrupt waits only 0.25 s for the child."""
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        try:
            stdout, stderr = child.communicate(stdin, timeout=timeout)
        except BaseException:
            child.kill()
            child.wait()
            raise
    return child.returncode, stdout, stderr


# Run in a fresh interpreter between fork and exec of the compiler: ask Linux for SIGKILL when the
# parent dies (PR_SET_PDEATHSIG = 1, kept across exec), then check the parent did not die first.
# A wrapper rather than `preexec_fn`, which is unsafe in a process with threads (JAX has some).
_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(137)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write("error: cannot run %s: %s\\n" % (sys.argv[2], exc.strerror))
    os._exit(127)
"""


def _with_parent_death(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGKILL when this process dies (Linux; elsewhere unchanged)."""
    if not sys.platform.startswith("linux") or not sys.executable:
        return command
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *command]


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
