"""Stage 7, the bundle: one self-describing directory per build that deploys without JAX.

    DIR/program.mlir            the program IREE compiled (StableHLO + generated entry points)
    DIR/weights.irpa            the weights once, as an IREE parameter archive (absent with inline weights)
    DIR/TARGET/module.vmfb      one compiled module per target
    DIR/manifest.json           spec, call interface, targets, versions, verify results, SHA-256 of every file
    DIR/mhagen_runtime/         the loader package (NumPy + iree-base-runtime only)
    DIR/run.py, DIR/README.md   how to run it, generated

    build_bundle(spec, parse_targets("cpu,vulkan"), "out/encoder")

What `--out DIR` may hold. Only an mhagen bundle is replaced: a folder whose `manifest.json` says
`"format": "mhagen-bundle"` and that holds no file its manifest does not list (`__pycache__` aside).
An absent path or an empty folder is fine too. Anything else (a user's folder, a file, a bundle
someone added notes to) is refused with one `BundleError` line before anything is traced, unless
`force=True` (`--force`).

How it is written. One build at a time per DIR: an exclusive `flock` on a lock file named by the
SHA-256 of DIR's resolved path, under `$XDG_RUNTIME_DIR/mhagen/locks` (else the user cache folder),
held for the whole build, so nothing but the bundle itself is ever left beside DIR. The bundle is
assembled in `.DIR.staging.PID.XXXXXXXX` beside DIR (same filesystem, for the rename) and swapped in
with Linux's `renameat2(RENAME_EXCHANGE)`, so DIR is at every moment the old or the new complete
bundle; the old one is removed after. Where the exchange is unavailable (no glibc 2.28, a filesystem
without it) the swap is two renames, DIR -> `.DIR.old.PID.XXXXXXXX` then staging -> DIR. A build
writes each staging/old name into its lock file before creating it, and a lock file that outlives
its build (killed) tells the next build (or `mhagen reweight`) of the same DIR exactly what to undo:
it moves an orphaned old bundle back when DIR is missing, then removes the rest. Names it did not
record, or that another user owns, are never touched, however much they look like its own. OS errors
(read-only folder, full disk, a path through a file) are one `BundleError` line naming the path
and the cause, with the staging folder and any parent folders this build created removed.

Verify failures. A target whose verify failed is written, but marked `"runnable": false` in its
manifest entry (its `verify.passed` is false), so the loader refuses it unless the caller opts in;
the bundle is swapped in (a rebuild replaces the old one, whose results no longer describe the
program) and `build_bundle` then raises `VerifyError` naming the failing targets (exit 1).

Test hooks (for the kill tests only): `MHAGEN_TEST_PAUSE_AT=POINT` makes a build announce
`mhagen-test: paused at POINT` on stderr and sleep there (`MHAGEN_TEST_PAUSE_S`, default 600 s); the
points are locked (and tidied), staging-created, traced, compiled, verified, before-swap, exchanged, removing-old,
between-renames and after-renames. `MHAGEN_TEST_NO_EXCHANGE=1` forces the two-rename swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from . import runtime as _runtime
from .budget import check as check_budget
from .compile import check_supported, compile_program, compiler_version, is_cached
from .errors import BundleError, MhagenError, TargetError, VerifyError, invalid
from .progress import Steps
from .program import render
from .runtime import (MANIFEST_VERSION, driver_status, host_arch, host_cpu_features, load_bundle,
                      runtime_version, sha256_file)
from .spec import Spec
from .targets import Target, availability
from .trace import WeightsMode, trace
from .weights import normalize_weights, weight_names

__all__ = ["build_bundle", "BuildReport"]

# CPU features that change the code LLVM emits for `target-cpu=host`; recorded so a bundle refuses
# to load on a CPU that lacks one (instead of dying on an illegal instruction).
_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "popcnt", "abm", "movbe", "aes", "pclmulqdq",
                 "sha_ni", "vaes", "vpclmulqdq", "gfni", "amx", "adx", "lzcnt")

_MANIFEST_MAX_BYTES = 64 << 20   # a manifest bigger than this is not one mhagen wrote


class BuildReport(dict):
    """What a build did: per-target compile seconds, cache hits and verify results."""


def _host_isa() -> list[str]:
    return sorted(f for f in host_cpu_features() if f.startswith(_ISA_PREFIXES))


def _target_entry(target: Target) -> dict[str, Any]:
    entry = {**target.to_dict(), "module": f"{target.name}/module.vmfb",
             "cpu_features": list(target.cpu_features)}
    if target.arch == "host":
        entry["built_on"] = {"arch": host_arch()}
        entry["cpu_features"] = _host_isa()
    return entry


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _pause(point: str) -> None:
    """Test-only: stop at `point` when MHAGEN_TEST_PAUSE_AT names it, so a test can kill us there."""
    if os.environ.get("MHAGEN_TEST_PAUSE_AT") == point:
        print(f"mhagen-test: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("MHAGEN_TEST_PAUSE_S", "600")))


# ---------------------------------------------------------------------------------------------
# Claiming --out: refusals, the lock, what killed builds left, the swap
# ---------------------------------------------------------------------------------------------
def _litter_pattern(name: str) -> re.Pattern[str]:
    """`.NAME.staging.PID.XXXXXXXX` and `.NAME.old.PID.XXXXXXXX` (PID absent in older versions)."""
    return re.compile(rf"\.{re.escape(name)}\.(staging|old)\.(?:\d+\.)?[a-z0-9_]{{8}}")


def _foreign(out: Path, *, force: bool, need_bundle: bool = False) -> str | None:
    """Why `out` may not be replaced (a clause: "it is ..."), or None when it may.

    Replaceable: absent, an empty folder, or an mhagen bundle holding only the files its manifest
    lists; with `force`, anything. `need_bundle` (reweight) accepts only the last."""
    if not os.path.lexists(out):
        return "it does not exist" if need_bundle else None
    if force and not need_bundle:
        return None
    if not out.is_dir():
        return f"it is {'a file' if out.is_file() else 'not a folder'}, not an mhagen bundle"
    try:
        empty = not os.listdir(out)
    except OSError as exc:
        raise BundleError(f"Cannot read {out}: {exc.strerror}") from None
    if empty and not need_bundle:
        return None
    manifest = out / "manifest.json"
    if not os.path.lexists(manifest):
        return "it is a folder that is not an mhagen bundle (no manifest.json)"
    if not manifest.is_file() or manifest.is_symlink():   # a FIFO must not hang us
        return "it is a folder that is not an mhagen bundle (its manifest.json is not a regular file)"
    if manifest.stat().st_size > _MANIFEST_MAX_BYTES:
        return "it is a folder that is not an mhagen bundle (its manifest.json is too large)"
    try:
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != "mhagen-bundle":
        return "it is a folder that is not an mhagen bundle (its manifest.json is not mhagen's)"
    from .runtime.bundle import validate_manifest

    if validate_manifest(data):
        return "it is a folder whose manifest.json is not a valid mhagen manifest"
    extra = _unlisted(out, set(data["files"]) if isinstance(data.get("files"), dict) else set())
    if extra:
        return (f"it is an mhagen bundle that holds files mhagen did not write: "
                f"{', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
    return None


def _unlisted(out: Path, listed: set[str], limit: int = 4) -> list[str]:
    """Files (and links) under `out` that neither the manifest nor Python's bytecode cache explain."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel_dir = Path(dirpath).relative_to(out)
        if "__pycache__" in rel_dir.parts:    # Python's bytecode cache, and nothing else
            filenames = [n for n in filenames if not n.endswith(".pyc")]
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in sorted(filenames + links):
            rel = (rel_dir / name).as_posix()
            if rel != "manifest.json" and rel not in listed:
                found.append(rel)
                if len(found) >= limit:
                    return found
    return found


def _lock_dir() -> Path:
    """Where locks live: $XDG_RUNTIME_DIR/mhagen/locks, else the user cache folder, else /tmp."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    candidates = ([Path(runtime_dir) / "mhagen" / "locks"] if runtime_dir else []) + [
        Path(cache) / "mhagen" / "locks", Path(tempfile.gettempdir()) / f"mhagen-locks-{os.getuid()}"]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    raise BundleError(f"Cannot create a lock folder: tried {', '.join(map(str, candidates))}")


def _lock_path(out: Path) -> Path:
    """The lock of one --out path: keyed by the SHA-256 of its resolved path, outside the tree."""
    key = hashlib.sha256(os.fsencode(out.resolve())).hexdigest()
    return _lock_dir() / f"{key}.lock"


@contextlib.contextmanager
def _locked(out: Path, progress: bool) -> Iterator[Any]:
    """Hold the lock of `out`; the lock file is removed on release, so none piles up.

    A waiter that wakes on a file its holder has just removed sees a different inode at the path
    and starts over, so two builds never both hold the lock."""
    path = _lock_path(out)
    while True:
        try:
            handle = open(path, "a+")   # not inherited by child compilers (PEP 446)
        except OSError as exc:
            raise BundleError(f"Cannot create the lock file {path} for {out}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"waiting for another mhagen build of {out} to finish...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield handle
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()


def _recorded(handle: Any) -> list[str]:
    """The staging/old names a killed holder of this lock wrote into it before creating them."""
    handle.seek(0)
    return [line.strip() for line in handle.read().splitlines() if line.strip()]


def _record(handle: Any, name: str) -> None:
    """Note `name` in the lock file before creating it, so only what a build made is ever undone."""
    handle.seek(0, os.SEEK_END)
    handle.write(name + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _tidy(out: Path, recorded: list[str]) -> None:
    """Under the lock: undo what killed builds left beside `out`: only the names they recorded in
    the lock before creating them, owned by this user; a look-alike name is never touched."""
    pattern = _litter_pattern(out.name)
    uid = os.getuid()
    litter = sorted((out.parent / n for n in set(recorded)
                     if "/" not in n and pattern.fullmatch(n) and os.path.lexists(out.parent / n)
                     and (out.parent / n).lstat().st_uid == uid),
                    key=lambda p: p.lstat().st_mtime_ns, reverse=True)
    if not os.path.lexists(out):   # killed between the two renames: the old bundle goes back
        for old in (p for p in litter if ".old." in p.name):
            bundle = old if (old / "manifest.json").is_file() else old / "bundle"   # older layout
            if (bundle / "manifest.json").is_file():
                os.rename(bundle, out)
                break
    for path in litter:
        _remove(path)
    legacy = out.parent / f".{out.name}.lock"   # what mhagen 0.1 left beside every bundle
    if legacy.is_file() and not legacy.is_symlink() and legacy.stat().st_size == 0:
        legacy.unlink(missing_ok=True)


def _remove(path: Path, *, pause_at: str | None = None) -> None:
    """Delete a file or a folder tree without following links; what cannot go stays for next time."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    first = True
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            with contextlib.suppress(OSError):
                os.unlink(Path(dirpath) / name)
            if first and pause_at:
                _pause(pause_at)
            first = False
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(Path(dirpath) / name)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _make_parents(folder: Path, out: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created (to remove again if the build fails)."""
    missing = []
    probe = folder
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise BundleError(f"Cannot write the bundle to {out}: {probe} is a file, not a folder")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as exc:
            _remove_empty(created)
            raise BundleError(f"Cannot write the bundle to {out}: cannot create the folder {path} "
                              f"({exc.strerror})") from None
        created.append(path)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            path.rmdir()


def _os_error(out: Path, exc: OSError) -> BundleError:
    """One line naming the path and the cause."""
    cause = exc.strerror or str(exc)
    return BundleError(f"Cannot write the bundle to {out}: {cause}")


@contextlib.contextmanager
def _claimed(out: str | Path, *, force: bool, need_bundle: bool = False,
             progress: bool = False) -> Iterator[tuple[Path, Path]]:
    """Claim `out` and yield (its resolved path, an empty staging folder beside it).

    Refuses what is not ours before anything else, locks, tidies what killed builds left, and
    when the block finishes swaps the staging folder in; on any error the staging folder (and
    the parent folders created here) are removed and `out` is untouched. `need_bundle`: `out`
    must already be an mhagen bundle (reweight).
    """
    given = Path(out)
    out = given.resolve()
    if not out.name:
        raise BundleError(f"Received an invalid value for argument `--out`, expected a folder path "
                          f"with a name. Received: --out={str(given)!r}")

    def refuse(why: str) -> BundleError:
        if need_bundle:
            return BundleError(f"Cannot reweight {out}: {why}")
        return BundleError(f"Refusing to write the bundle to {out}: {why}; move it away or pass --force "
                           "to replace it")

    if os.path.lexists(out):   # cheap refusal, before waiting on a lock (again once locked)
        why = _foreign(out, force=force, need_bundle=need_bundle)
        if why:
            raise refuse(why)
    created = _make_parents(out.parent, out)
    staging = None
    try:
        with _locked(out, progress) as lock:
            try:
                _tidy(out, _recorded(lock))
                lock.seek(0)
                lock.truncate()
            except OSError as exc:
                raise _os_error(out, exc) from None
            _pause("locked")   # and tidied
            why = _foreign(out, force=force, need_bundle=need_bundle)
            if why:
                raise refuse(why)
            try:
                staging = out.parent / _litter_name(out, "staging")
                _record(lock, staging.name)
                staging.mkdir()
                staging.chmod(0o755)   # readable by all, as the bundle it becomes
            except OSError as exc:
                staging = None
                raise BundleError(f"Cannot write the bundle to {out}: cannot create a folder in "
                                  f"{out.parent} ({exc.strerror})") from None
            _pause("staging-created")
            yield out, staging
            _pause("before-swap")
            try:
                _swap_in(staging, out, lambda name: _record(lock, name))
            except OSError as exc:
                raise BundleError(f"Cannot write the bundle to {out}: cannot swap the new bundle in "
                                  f"({exc.strerror or exc})") from None
            staging = None
    except BaseException:
        if staging is not None:
            _remove(staging)
        _remove_empty(created)
        raise


def _litter_name(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}.{os.getpid()}.{secrets.token_hex(4)}"


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _renameat2() -> Any:
    if os.environ.get("MHAGEN_TEST_NO_EXCHANGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2   # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the C library, kernel or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(staging: Path, out: Path, record: Any) -> None:
    """Put the finished staging folder at `out`; `out` is never missing where RENAME_EXCHANGE works."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        _pause("exchanged")
        _remove(staging, pause_at="removing-old")   # the staging name now holds the old bundle
        return
    old = out.parent / _litter_name(out, "old")
    record(old.name)
    os.rename(out, old)   # under the lock: a killed build's old bundle is moved back by the next one
    _pause("between-renames")
    os.rename(staging, out)
    _pause("after-renames")
    _remove(old, pause_at="removing-old")


# ---------------------------------------------------------------------------------------------
# Writing the bundle
# ---------------------------------------------------------------------------------------------
def _write_irpa(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    import iree.runtime as rt

    index = rt.ParameterIndex()
    for name, array in zip(names, arrays):
        index.add_buffer(name, np.ascontiguousarray(array).tobytes())
    try:
        index.create_archive_file(str(path))
    except RuntimeError as exc:   # IREE reports I/O errors as RuntimeError, without errno
        needed = sum(a.nbytes for a in arrays)
        if shutil.disk_usage(path.parent).free < needed + (1 << 16):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(errno.EIO, f"IREE could not write {path.name} ({' '.join(str(exc).split())})",
                      str(path)) from None
    path.chmod(0o644)


def _copy_runtime(staging: Path) -> None:
    """The loader, as the package `mhagen_runtime/` (every *.py of mhagen's runtime, no caches)."""
    source = Path(_runtime.__file__)
    dest = staging / "mhagen_runtime"
    dest.mkdir()
    if source.name == "__init__.py":
        for path in sorted(source.parent.glob("*.py")):
            shutil.copyfile(path, dest / path.name)
    else:   # the single-file runtime of older checkouts
        shutil.copyfile(source, dest / "__init__.py")


def _verify(spec: Spec, staging: Path, name: str, weights: list[np.ndarray], runs: tuple[bool, str]
            ) -> dict[str, Any]:
    """Load the staged bundle's module for target `name` like a user would, and check it on the
    oracle at every size of `verify.shape_checks` (recorded as `shapes`, the choice as `shapes_chosen`)."""
    from .verify import check_layer, shape_checks

    if not runs[0]:
        return {"ran": False, "reason": runs[1], "status": "compiled, not run"}
    checks, chosen = shape_checks(spec)
    shapes = {"shapes": [c.label for c in checks], "shapes_chosen": chosen}
    try:
        layer = load_bundle(staging, name)
        comparisons = check_layer(layer, checks, weights)
    except MhagenError as exc:
        return {"ran": True, "status": "error", "passed": False, "message": str(exc).splitlines()[0], **shapes}
    passed = all(c.passed for c in comparisons)
    return {"ran": True, "status": "pass" if passed else "FAIL", "passed": passed,
            "max_abs": max(c.max_abs for c in comparisons), "max_rel": max(c.max_rel for c in comparisons),
            "message": next((c.message for c in comparisons if not c.passed), comparisons[0].message), **shapes}


def _verify_all(spec: Spec, staging: Path, manifest: dict[str, Any], weights: list[np.ndarray],
                runs: dict[str, tuple[bool, str]], progress: bool) -> None:
    """Verify every target entry of `manifest` in place, and mark the failed ones not runnable."""
    with Steps(enabled=progress) as steps:
        for entry in manifest["targets"]:
            name = entry["name"]
            steps.start(f"verify {name}: running")
            entry["verify"] = result = _verify(spec, staging, name, weights, runs[name])
            entry["runnable"] = result.get("passed") is not False
            detail = (f" (max abs err {result['max_abs']:.2g})" if result.get("max_abs") is not None
                      else f" ({result.get('reason') or result.get('message', '')})")
            steps.done(f"verify {name}: {result['status']}{detail}")


def _failed(out: Path, manifest: dict[str, Any]) -> VerifyError | None:
    bad = [e for e in manifest["targets"] if e.get("verify", {}).get("passed") is False]
    if not bad:
        return None
    names = ", ".join(e["name"] for e in bad)
    return VerifyError(f"{names} {'disagrees' if len(bad) == 1 else 'disagree'} with the oracle "
                       f"({bad[0]['name']}: {bad[0]['verify'].get('message', '')}); bundle written to {out} "
                       f"with {names} marked not runnable (see manifest.json)")


def build_bundle(spec: Spec, targets: list[Target], out: str | Path, *, weights: Any = None,
                 weights_mode: str = "parameters", verify: bool = True, force: bool = False,
                 progress: bool = False) -> Path:
    """Trace once, compile per target, verify, and swap the bundle directory in atomically.

    Refuses (before tracing) an `out` that is neither absent, an empty folder nor an mhagen bundle,
    unless `force=True`. Raises `VerifyError`, after writing the bundle, when a target's verify
    failed; those targets are marked `"runnable": false`.

        build_bundle(spec, parse_targets("cpu"), "out/encoder", weights=init_weights(spec))
    """
    mode = WeightsMode.parse(weights_mode)
    target_names = [t.name for t in targets]
    if not target_names or len(set(target_names)) != len(target_names):
        raise invalid("targets", "one or more distinct target names", ",".join(target_names), cls=TargetError)
    for target in targets:
        check_supported(target, spec)
    check_budget(spec, weights_mode=mode, verify=verify)  # trace steps and memory, before any work
    ws = normalize_weights(spec, weights)
    names = weight_names(spec)
    with _claimed(out, force=force, progress=progress) as (dest, staging):
        started = time.perf_counter()
        program = trace(spec, ws, weights_mode=mode)
        trace_seconds = time.perf_counter() - started
        _pause("traced")
        compiled = []
        with Steps(enabled=progress) as steps:
            for i, target in enumerate(targets, 1):
                label = f"[{i}/{len(targets)}] {target.name}"
                steps.start(f"{label}: " + ("reading the compile cache" if is_cached(program.text, target)
                                            else f"compiling ({target.backend})"))
                c = compile_program(program.text, target)
                compiled.append(c)
                steps.done(f"{label}: {'cached' if c.cached else f'compiled in {c.seconds:.1f} s'}, "
                           f"{len(c.vmfb) / 1024:.0f} KiB")
        weights_entry = None
        try:
            (staging / "program.mlir").write_text(program.text)
            if mode is WeightsMode.PARAMETERS:
                _write_irpa(staging / "weights.irpa", names, ws)
                weights_entry = {"file": "weights.irpa", "scope": "model",
                                 "entries": [t.to_dict() for t in program.weights]}
            _copy_runtime(staging)
            for target, c in zip(targets, compiled):
                (staging / target.name).mkdir()
                (staging / target.name / "module.vmfb").write_bytes(c.vmfb)
        except OSError as exc:
            raise _os_error(dest, exc) from None
        _pause("compiled")
        target_entries = []
        for target, c in zip(targets, compiled):
            entry = _target_entry(target)
            entry.update(compile_seconds=round(c.seconds, 3), cached=c.cached, size=len(c.vmfb), runnable=True)
            target_entries.append(entry)
        manifest: dict[str, Any] = {
            "format": "mhagen-bundle", "version": MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "spec": spec.to_dict(), "interface": program.interface, "program": "program.mlir",
            "weights": weights_entry, "weights_mode": mode.value, "targets": target_entries,
            "iree": {"compiler_version": compiler_version(), "runtime_version": runtime_version()},
            "jax_version": importlib.metadata.version("jax"), "mhagen_version": __version__,
            "trace_seconds": round(trace_seconds, 3),
        }
        _finish(dest, staging, manifest, spec, ws, verify=verify, progress=progress, where=str(out),
                runs={t.name: (availability(t).runs, availability(t).run_reason) for t in targets})
    error = _failed(dest, manifest)
    if error:
        raise error
    return Path(out)


def _finish(out: Path, staging: Path, manifest: dict[str, Any], spec: Spec, weights: list[np.ndarray], *,
            verify: bool, progress: bool, runs: dict[str, tuple[bool, str]], run_py: bool = True,
            where: str | None = None) -> None:
    """Hash, verify what was staged (loaded like a user would), render README (and run.py), hash again.

    `where`: the bundle's path as the README's example commands give it (default `out`)."""
    try:
        _write_manifest(staging, manifest)   # hashes, so the verify step loads what ships
    except OSError as exc:
        raise _os_error(out, exc) from None
    if verify:
        _verify_all(spec, staging, manifest, weights, runs, progress)
    _pause("verified")
    try:
        _write_rendered(staging, manifest, run_py=run_py, where=str(out) if where is None else where)
        _write_manifest(staging, manifest)
    except OSError as exc:
        raise _os_error(out, exc) from None


def _write_rendered(staging: Path, manifest: dict[str, Any], *, run_py: bool = True, where: str = ".") -> None:
    context = {"m": manifest, "targets": manifest["targets"], "interface": manifest["interface"]}
    if run_py:
        (staging / "run.py").write_text(render("run.py.j2", **context))
    (staging / "README.md").write_text(render("bundle_README.md.j2", **context, **_readme_context(manifest, where)))


def _readme_context(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """What the bundle README shows beyond the manifest: free axes, and runnable example commands for
    the bundle at `where` (the path it was written to, as given)."""
    import shlex

    from .runtime import free_dims

    interface = manifest["interface"]
    largest = interface["functions"][-1]       # sorted by bucket: its inputs hold every declared shape

    def dims(sigs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**s, "dims": free_dims(interface, s["name"], s["shape"])} for s in sigs]

    outputs = [{**s, "dims": free_dims(interface, "query" if s["name"] == "output" else "attention_mask",
                                       s["shape"])} for s in interface["outputs"]]
    run_inputs = [s["name"] for s in interface["inputs"] if s["name"] != "dropout_key"]
    bf16 = any(s["dtype"] == "bfloat16" for s in largest["inputs"])
    iree_inputs = [] if bf16 else [s["name"] for s in largest["inputs"]]
    lines = []
    for s in largest["inputs"]:
        shape = tuple(s["shape"])
        if s["name"] == "attention_mask":
            value = f'np.ones({shape}, "{s["dtype"]}")'
        elif s["name"] == "dropout_key":
            value = f'np.array([{interface["dropout"]["seed"]}, 0], "uint32")'
        else:   # run.py casts float32 to bfloat16; NumPy alone cannot write bfloat16
            value = f'rng.standard_normal({shape}).astype("{"float32" if bf16 else s["dtype"]}")'
        lines.append(f'np.save("{s["name"]}.npy", {value})')
    return {"where": where, "where_sh": shlex.quote(where), "where_py": json.dumps(where),
            "inputs": dims(interface["inputs"]), "outputs": outputs, "free_axes": _free_axes(interface),
            "example_lines": lines, "run_inputs": run_inputs, "iree_inputs": iree_inputs,
            "iree_function": largest["name"], "checked": _checked_text(manifest),
            "decoder": interface.get("decoder")}


def _free_axes(interface: dict[str, Any]) -> str:
    """One sentence on the sizes a call may have."""
    dynamic = interface.get("dynamic", [])
    declared = interface["inputs"][0]["shape"][0]
    parts = []
    if "batch" in dynamic:
        parts.append(f"batch 1 to {interface['max_batch']}")
    if "seq" in dynamic:
        parts.append(f"sequence length 1 to {interface['max_seq']}")
    if dynamic:
        buckets = ", ".join("(" + ", ".join(f"{k} {f[k]}" for k in ("batch", "seq") if f.get(k) is not None) + ")"
                            for f in interface["functions"])
        text = (f"Free axes: {' and '.join(parts)} (`<=` in the table). A call runs in the smallest compiled "
                f"shape bucket that holds it, padded (keys masked) and sliced back; the buckets: {buckets}.")
        if "batch" not in dynamic and not interface.get("dropout"):
            text += f" Any batch (`*`): the module computes {declared} rows at a time."
        return text
    if interface.get("dropout"):
        return ("Fixed shapes: training with dropout draws one random mask over the whole batch, so the "
                "batch cannot be split.")
    return (f"Any batch (`*` in the table): the module computes batch {declared}; a call with another batch "
            f"runs {declared} rows at a time (the last chunk padded and sliced back).")


def _checked_text(manifest: dict[str, Any]) -> str:
    """The shapes the build's verify ran, from the first target that ran (all ran the same)."""
    for t in manifest["targets"]:
        verify = t.get("verify", {})
        if verify.get("shapes"):
            return f"query {', '.join(verify['shapes'])} ({verify.get('shapes_chosen', '')})"
    return ""


def _write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    """Every file of the bundle, with its SHA-256 and size, then manifest.json itself."""
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != "manifest.json" and "__pycache__" not in path.parts:
            rel = path.relative_to(staging).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest["files"] = files
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _runs_here(entry: dict[str, Any]) -> tuple[bool, str]:
    """Whether a manifest's target entry runs on this machine: (True, device) or (False, why)."""
    from .runtime import check_machine

    try:
        check_machine(entry)
    except BundleError as exc:
        return False, str(exc)
    return driver_status(str(entry.get("driver", "")))
