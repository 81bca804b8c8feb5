"""Stage 7, the bundle: one self-describing directory per build that deploys without JAX.

    DIR/program.mlir            the program IREE compiled (StableHLO + generated entry points)
    DIR/weights.irpa            the weights once, as an IREE parameter archive (absent with inline weights)
    DIR/TARGET/module.vmfb      one compiled module per target
    DIR/manifest.json           spec, call interface, targets, versions, verify results, SHA-256 of every file
    DIR/mhagen_runtime.py       the loader (NumPy + iree-base-runtime only)
    DIR/run.py, DIR/README.md   how to run it, generated

Writes are atomic: the bundle is assembled in a staging directory beside DIR and swapped in under a
lock, so a killed or concurrent build never leaves a half-written bundle.

    build_bundle(spec, parse_targets("cpu,vulkan"), "out/encoder")
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .compile import check_dtype, compile_program, compiler_version
from .errors import BundleError, MhagenError
from .program import render
from .runtime import MANIFEST_VERSION, load_bundle, runtime_version, sha256_file
from .spec import Spec
from .runtime import host_arch, host_cpu_features
from .targets import Target, availability
from .trace import WeightsMode, trace
from .weights import normalize_weights, weight_names

__all__ = ["build_bundle", "BuildReport"]

# CPU features that change the code LLVM emits for `target-cpu=host`; recorded so a bundle refuses
# to load on a CPU that lacks one (instead of dying on an illegal instruction).
_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "popcnt", "abm", "movbe", "aes", "pclmulqdq",
                 "sha_ni", "vaes", "vpclmulqdq", "gfni", "amx", "adx", "lzcnt")


class BuildReport(dict):
    """What a build did: per-target compile seconds, cache hits and verify results."""


def _write_irpa(path: Path, names: list[str], arrays: list[np.ndarray]) -> None:
    import iree.runtime as rt

    index = rt.ParameterIndex()
    for name, array in zip(names, arrays):
        index.add_buffer(name, np.ascontiguousarray(array).tobytes())
    index.create_archive_file(str(path))


def _host_isa() -> list[str]:
    return sorted(f for f in host_cpu_features() if f.startswith(_ISA_PREFIXES))


def _target_entry(target: Target) -> dict[str, Any]:
    entry = {**target.to_dict(), "module": f"{target.name}/module.vmfb",
             "cpu_features": list(target.cpu_features)}
    if target.arch == "host":
        entry["built_on"] = {"arch": host_arch()}
        entry["cpu_features"] = _host_isa()
    return entry


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the finished staging directory; the old bundle is removed only after."""
    with _lock(out):
        if out.exists() and not out.is_dir():
            raise BundleError(f"Output path {out} exists and is not a directory")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "bundle")
        os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _verify(spec: Spec, staging: Path, target: Target, weights: list[np.ndarray]) -> dict[str, Any]:
    """Load the staged bundle's module for `target` like a user would, and check it on the oracle."""
    from .verify import check_outputs, expected_outputs, random_inputs

    avail = availability(target)
    if not avail.runs:
        return {"ran": False, "reason": avail.run_reason, "status": "compiled, not run"}
    layer = load_bundle(staging, target.name)
    checks = []
    sizes = [None]
    if spec.call.dynamic:  # the declared shape, plus the smallest batch and sequence
        sizes.append((1 if "batch" in spec.call.dynamic else None, 3 if "seq" in spec.call.dynamic else None))
    for size in sizes:
        sub = spec if size is None else spec.at_size(size[0], size[1], size[1])
        inputs = random_inputs(sub, seed=0)
        result = layer(**inputs)
        got = list(result) if isinstance(result, tuple) else [result]
        checks += check_outputs(sub, got, expected_outputs(sub, weights, inputs))
    passed = all(c.passed for c in checks)
    return {"ran": True, "status": "pass" if passed else "FAIL", "passed": passed,
            "max_abs": max(c.max_abs for c in checks), "max_rel": max(c.max_rel for c in checks),
            "message": next((c.message for c in checks if not c.passed), checks[0].message)}


def build_bundle(spec: Spec, targets: list[Target], out: str | Path, *, weights: Any = None,
                 weights_mode: str = "parameters", verify: bool = True,
                 progress: bool = False) -> Path:
    """Trace once, compile per target, verify, and write the bundle directory atomically."""
    out = Path(out)
    mode = WeightsMode.parse(weights_mode)
    for target in targets:
        check_dtype(target, spec.call.dtype_policy.compute)
    ws = normalize_weights(spec, weights)
    names = weight_names(spec)
    started = time.perf_counter()
    program = trace(spec, ws, weights_mode=mode)
    trace_seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging."))
    staging.chmod(0o755)  # mkdtemp's 0700 would ship a bundle only its builder can read
    try:
        (staging / "program.mlir").write_text(program.text)
        weights_entry = None
        if mode is WeightsMode.PARAMETERS:
            _write_irpa(staging / "weights.irpa", names, ws)
            (staging / "weights.irpa").chmod(0o644)
            weights_entry = {"file": "weights.irpa", "scope": "model",
                             "entries": [t.to_dict() for t in program.weights]}
        from . import runtime as _runtime_pkg
        shutil.copytree(Path(_runtime_pkg.__file__).parent, staging / "mhagen_runtime",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        target_entries = []
        for i, target in enumerate(targets, 1):
            _say(progress, f"[{i}/{len(targets)}] {target.name}: compiling ({target.backend})...")
            compiled = compile_program(program.text, target)
            (staging / target.name).mkdir()
            (staging / target.name / "module.vmfb").write_bytes(compiled.vmfb)
            entry = _target_entry(target)
            entry.update(compile_seconds=round(compiled.seconds, 3), cached=compiled.cached,
                         size=len(compiled.vmfb))
            target_entries.append(entry)
            _say(progress, f"[{i}/{len(targets)}] {target.name}: "
                 f"{'cached' if compiled.cached else f'compiled in {compiled.seconds:.1f} s'}, "
                 f"{len(compiled.vmfb) / 1024:.0f} KiB")
        manifest: dict[str, Any] = {
            "format": "mhagen-bundle", "version": MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "spec": spec.to_dict(), "interface": program.interface, "program": "program.mlir",
            "weights": weights_entry, "weights_mode": mode.value, "targets": target_entries,
            "iree": {"compiler_version": compiler_version(), "runtime_version": runtime_version()},
            "jax_version": importlib.metadata.version("jax"), "mhagen_version": __version__,
            "trace_seconds": round(trace_seconds, 3),
        }
        _write_manifest(staging, manifest)  # hashes, so the verify step loads what ships
        if verify:
            for target, entry in zip(targets, target_entries):
                _say(progress, f"verify {target.name}...")
                try:
                    entry["verify"] = _verify(spec, staging, target, ws)
                except MhagenError as exc:
                    entry["verify"] = {"ran": True, "status": "error", "passed": False, "message": str(exc)}
                _say(progress, f"verify {target.name}: {entry['verify']['status']}"
                     + (f" (max abs err {entry['verify']['max_abs']:.2g})" if entry["verify"].get("max_abs")
                        is not None else f" ({entry['verify'].get('reason', '')})"))
        _writerender(staging, manifest)
        _write_manifest(staging, manifest)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    failed = [e["name"] for e in target_entries if e.get("verify", {}).get("passed") is False]
    if failed:
        raise BundleError(f"bundle written to {out}, but verify FAILED on {', '.join(failed)} "
                          "(see manifest.json)")
    return out


def _writerender(staging: Path, manifest: dict[str, Any]) -> None:
    context = {"m": manifest, "targets": manifest["targets"], "interface": manifest["interface"]}
    (staging / "run.py").write_text(render("run.py.j2", **context))
    (staging / "README.md").write_text(render("bundle_README.md.j2", **context))


def _write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
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
