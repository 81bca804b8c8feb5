"""Bundle checking and loading: the manifest read and validated, every file it names checked by
path and SHA-256, the module checked against this machine, then loaded as a `CompiledLayer`.

A bundle cannot point outside itself: every path in its manifest is relative, free of `..`, and
opened without following symlinks (in any component), and only regular files are read, so a FIFO
or a device node is refused instead of blocking. Every file the manifest lists is hashed and
checked on load, the generated Python included. A target whose verify failed at build time loads
only with `allow_failed=True`.

    layer = load_bundle("out/encoder", target="cpu")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .devices import host_arch, host_cpu_features, parameter_index, runtime_version, subgroup_mismatch
from .errors import BundleError
from .layer import CompiledLayer

__all__ = ["MANIFEST_VERSION", "sha256_file", "read_manifest", "validate_manifest", "check_files",
           "check_machine", "read_bundle_file", "choose_target", "load_bundle"]

MANIFEST_VERSION = 1


# A manifest larger than this is not one mhagen wrote (a large bundle's manifest is a few KiB).
MAX_MANIFEST_BYTES = 16 << 20
INPUT_NAMES = ("query", "value", "key", "attention_mask", "dropout_key")
OUTPUT_NAMES = ("output", "scores")
STEP_INPUT_NAMES = ("query", "value", "key", "attention_mask", "index", "count", "cache")
STEP_OUTPUT_NAMES = ("output", "cache")
DTYPES = ("float32", "float16", "bfloat16", "int32", "int8", "uint8", "bool", "uint32")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Paths: relative, inside the bundle, regular files, no symlinks
# ---------------------------------------------------------------------------------------------
def check_relpath(rel: Any, where: str) -> str:
    """A manifest path must be relative, POSIX, and stay inside the bundle; returns it."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"manifest.json: {where} must be a relative path string; got {rel!r}")
    parts = rel.split("/")
    if (rel.startswith("/") or "\\" in rel or "\0" in rel or re.match(r"^[A-Za-z]:", rel)
            or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"manifest.json: {where} = {rel!r} points outside the bundle "
                          "(paths must be relative, without `..`, `.` or empty parts)")
    return rel


def _open_inside(bundle: Path, rel: str) -> int:
    """Open `bundle/rel` for reading without following a symlink in any component; a regular file only."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    dir_flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_DIRECTORY", 0)
    parts = rel.split("/")
    fd = os.open(bundle, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, flags if last else dir_flags, dir_fd=fd)
            except FileNotFoundError:
                raise BundleError(f"{bundle}: {rel} is missing") from None
            except OSError as exc:
                if os.path.islink(os.path.join(bundle, *parts[: i + 1])):
                    raise BundleError(f"{bundle}: {'/'.join(parts[: i + 1])} is a symlink; a bundle's "
                                      "files must be inside it, not links") from None
                raise BundleError(f"{bundle}: cannot open {rel}: {exc.strerror or exc}") from None
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BundleError(f"{bundle}: {rel} is not a regular file")
        os.set_blocking(fd, True)
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def read_bundle_file(bundle: Path, rel: str, *, limit: int | None = None) -> bytes:
    """The bytes of a file inside the bundle (see `_open_inside`), at most `limit` bytes."""
    fd = _open_inside(bundle, rel)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise BundleError(f"{bundle}: {rel} is {size} bytes, more than the {limit} expected")
        return f.read()


def _hash_inside(bundle: Path, rel: str) -> tuple[str, int]:
    fd = _open_inside(bundle, rel)
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# ---------------------------------------------------------------------------------------------
# The manifest's schema
#
# Checked by hand: the runtime must need only NumPy and iree-base-runtime, and the schema is small.
# ---------------------------------------------------------------------------------------------
class _Problems(list):
    def need(self, ok: bool, where: str, expected: str, value: Any) -> bool:
        if not ok:
            shown = repr(value)
            self.append(f"{where} must be {expected}; got {shown[:60] + '...' if len(shown) > 60 else shown}")
        return ok


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 16 and all(_is_int(d) and 0 <= d < 2**40 for d in v)


def _sigs(p: _Problems, value: Any, where: str, names: tuple[str, ...]) -> None:
    if not p.need(isinstance(value, list) and bool(value), where, "a non-empty list", value):
        return
    for i, s in enumerate(value):
        w = f"{where}[{i}]"
        if not p.need(isinstance(s, dict), w, "an object", s):
            continue
        p.need(s.get("name") in names, f"{w}.name", f"one of {', '.join(names)}", s.get("name"))
        p.need(_shape_ok(s.get("shape")), f"{w}.shape", "a list of non-negative integers", s.get("shape"))
        p.need(s.get("dtype") in DTYPES, f"{w}.dtype", f"one of {', '.join(DTYPES)}", s.get("dtype"))


def _optional_dict(p: _Problems, m: dict, key: str, where: str) -> dict | None:
    value = m.get(key)
    if value is None:
        return None
    return value if p.need(isinstance(value, dict), where, "an object or null", value) else None


def validate_manifest(manifest: Any) -> list[str]:
    """Every problem with a manifest's structure, one line each (empty when it is well formed)."""
    p = _Problems()
    if not p.need(isinstance(manifest, dict), "the manifest", "a JSON object", type(manifest).__name__):
        return p
    m = manifest
    files = m.get("files")
    if p.need(isinstance(files, dict) and bool(files), "files", "a non-empty object", files):
        for rel, entry in files.items():
            try:
                check_relpath(rel, "a key of files")
            except BundleError as exc:
                p.append(str(exc).removeprefix("manifest.json: "))
            if p.need(isinstance(entry, dict), f"files[{rel!r}]", "an object", entry):
                p.need(isinstance(entry.get("sha256"), str) and bool(_HEX64.match(entry.get("sha256", ""))),
                       f"files[{rel!r}].sha256", "64 lowercase hex digits", entry.get("sha256"))
                p.need(_is_int(entry.get("size")) and entry["size"] >= 0, f"files[{rel!r}].size",
                       "a non-negative integer", entry.get("size"))
    listed = set(files) if isinstance(files, dict) else set()

    def path_field(value: Any, where: str) -> None:
        try:
            check_relpath(value, where)
        except BundleError as exc:
            p.append(str(exc).removeprefix("manifest.json: "))
            return
        p.need(value in listed, where, "a file listed (with its hash) in files", value)

    path_field(m.get("program"), "program")
    weights = _optional_dict(p, m, "weights", "weights")
    if weights is not None:
        path_field(weights.get("file"), "weights.file")
        p.need(isinstance(weights.get("scope"), str) and bool(weights.get("scope")), "weights.scope",
               "a non-empty string", weights.get("scope"))
    p.need(m.get("weights_mode") in ("parameters", "inline"), "weights_mode", "'parameters' or 'inline'",
           m.get("weights_mode"))
    iree = m.get("iree")
    if p.need(isinstance(iree, dict), "iree", "an object", iree):
        p.need(isinstance(iree.get("compiler_version"), str), "iree.compiler_version", "a string",
               iree.get("compiler_version"))

    targets = m.get("targets")
    if p.need(isinstance(targets, list) and bool(targets), "targets", "a non-empty list", targets):
        seen = set()
        for i, t in enumerate(targets):
            w = f"targets[{i}]"
            if not p.need(isinstance(t, dict), w, "an object", t):
                continue
            name = t.get("name")
            if p.need(isinstance(name, str) and bool(_NAME.match(name)), f"{w}.name", "a target name", name):
                p.need(name not in seen, f"{w}.name", "unique", name)
                seen.add(name)
            path_field(t.get("module"), f"{w}.module")
            p.need(isinstance(t.get("driver"), str) and bool(t.get("driver")), f"{w}.driver",
                   "a runtime driver name", t.get("driver"))
            p.need(isinstance(t.get("arch", "any"), str), f"{w}.arch", "a string", t.get("arch"))
            features = t.get("cpu_features", [])
            p.need(isinstance(features, list) and all(isinstance(f, str) for f in features),
                   f"{w}.cpu_features", "a list of strings", features)
            lanes = t.get("subgroup_sizes", [])
            p.need(isinstance(lanes, list) and all(_is_int(n) and n > 0 for n in lanes),
                   f"{w}.subgroup_sizes", "a list of positive integers", lanes)
            p.need(isinstance(t.get("verify", {}), dict), f"{w}.verify", "an object", t.get("verify"))
            p.need(isinstance(t.get("runnable", True), bool), f"{w}.runnable", "true or false", t.get("runnable"))
            built_on = t.get("built_on", {})
            p.need(isinstance(built_on, dict) and isinstance(built_on.get("arch", ""), str),
                   f"{w}.built_on", "an object with a string arch", built_on)

    iface = m.get("interface")
    if p.need(isinstance(iface, dict), "interface", "an object", iface):
        _sigs(p, iface.get("inputs"), "interface.inputs", INPUT_NAMES)
        _sigs(p, iface.get("outputs"), "interface.outputs", OUTPUT_NAMES)
        dynamic = iface.get("dynamic", [])
        p.need(isinstance(dynamic, list) and set(dynamic) <= {"batch", "seq"}, "interface.dynamic",
               "a list of 'batch' and 'seq'", dynamic)
        for key, dim in (("max_batch", "batch"), ("max_seq", "seq")):
            value = iface.get(key)
            if isinstance(dynamic, list) and dim in dynamic:
                p.need(_is_int(value) and value >= 1, f"interface.{key}", "a positive integer", value)
            else:
                p.need(value is None or _is_int(value), f"interface.{key}", "an integer or null", value)
        functions = iface.get("functions")
        if p.need(isinstance(functions, list) and bool(functions), "interface.functions", "a non-empty list",
                  functions):
            for i, fn in enumerate(functions):
                w = f"interface.functions[{i}]"
                if not p.need(isinstance(fn, dict), w, "an object", fn):
                    continue
                p.need(isinstance(fn.get("name"), str) and bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$",
                                                                         fn.get("name", ""))),
                       f"{w}.name", "a function name", fn.get("name"))
                for key in ("batch", "seq"):
                    p.need(fn.get(key) is None or (_is_int(fn[key]) and fn[key] >= 1), f"{w}.{key}",
                           "a positive integer or null", fn.get(key))
                _sigs(p, fn.get("inputs"), f"{w}.inputs", INPUT_NAMES)
                _sigs(p, fn.get("outputs"), f"{w}.outputs", OUTPUT_NAMES)
        mask = _optional_dict(p, iface, "mask", "interface.mask")
        if mask is not None:
            p.need(_shape_ok(mask.get("shape")), "interface.mask.shape", "a list of non-negative integers",
                   mask.get("shape"))
            for key in ("scores_rank", "num_axes"):
                p.need(_is_int(mask.get(key)) and 1 <= mask[key] <= 16, f"interface.mask.{key}",
                       "an integer from 1 to 16", mask.get(key))
        dropout = _optional_dict(p, iface, "dropout", "interface.dropout")
        if dropout is not None:
            p.need(_is_int(dropout.get("seed")) and 0 <= dropout["seed"] < 2**32, "interface.dropout.seed",
                   "an unsigned 32-bit integer", dropout.get("seed"))
        p.need(iface.get("compute_dtype") in DTYPES, "interface.compute_dtype", f"one of {', '.join(DTYPES)}",
               iface.get("compute_dtype"))
        decoder = _optional_dict(p, iface, "decoder", "interface.decoder")
        if decoder is not None:
            _validate_decoder(p, decoder)
    return p


def _validate_decoder(p: _Problems, d: dict) -> None:
    """A decoder build's cache and step entry points (`mhagen.decode.decoder_interface`): each step's
    name says its kind, size and the cache length it reads, its signature holds the cache it
    declares, and the steps cover every position (a step named for one length reading another
    would attend to the wrong keys)."""
    shape = d.get("cache_shape")
    shape_ok = p.need(_shape_ok(shape) and len(shape) == 5 and all(n >= 1 for n in shape) and shape[1] == 2
                      and math.prod(shape) <= 1 << 40, "interface.decoder.cache_shape",
                      "(B, 2, S, N, H) as positive integers, at most 2**40 elements", shape)
    p.need(d.get("dtype") in DTYPES, "interface.decoder.dtype", f"one of {', '.join(DTYPES)}", d.get("dtype"))
    chunk = d.get("chunk")
    p.need(_is_int(chunk) and chunk >= 1, "interface.decoder.chunk", "a positive integer", chunk)
    for key in ("mask", "key"):
        p.need(isinstance(d.get(key), bool), f"interface.decoder.{key}", "true or false", d.get(key))
    kind = d.get("kind", "self")
    p.need(kind in ("self", "cross"), "interface.decoder.kind", "'self' or 'cross'", kind)
    steps = d.get("steps")
    if not p.need(isinstance(steps, list) and bool(steps), "interface.decoder.steps", "a non-empty list", steps):
        return
    kinds = ("self",) if kind == "self" else ("cross", "fill")
    seen: set[tuple[str, int, int]] = set()
    for i, step in enumerate(steps):
        w = f"interface.decoder.steps[{i}]"
        if not p.need(isinstance(step, dict), w, "an object", step):
            continue
        for key in ("t", "length"):
            p.need(_is_int(step.get(key)) and step[key] >= 1, f"{w}.{key}", "a positive integer", step.get(key))
        step_kind = step.get("kind", "self")
        if not p.need(step_kind in kinds, f"{w}.kind", f"one of {', '.join(kinds)} (a {kind} decoder)", step_kind):
            continue
        t, length = step.get("t"), step.get("length")
        expected = "cross_cache" if step_kind == "fill" else f"{'step' if step_kind == 'self' else 'cross'}_t{t}_l{length}"
        p.need(step.get("name") == expected, f"{w}.name", f"{expected!r} (its kind, t and length)", step.get("name"))
        _sigs(p, step.get("inputs"), f"{w}.inputs", STEP_INPUT_NAMES)
        _sigs(p, step.get("outputs"), f"{w}.outputs", STEP_OUTPUT_NAMES)
        if shape_ok:
            p.need(_is_int(length) and length <= shape[2], f"{w}.length", f"at most the cache length {shape[2]}", length)
            for sig in [*(step.get("inputs") or []), *(step.get("outputs") or [])]:
                if isinstance(sig, dict) and sig.get("name") == "cache":
                    p.need(sig.get("shape") == shape and sig.get("dtype") == d.get("dtype"), f"{w} cache",
                           f"the cache_shape {shape} and dtype {d.get('dtype')}", [sig.get("shape"), sig.get("dtype")])
                if isinstance(sig, dict) and sig.get("name") == "query":
                    p.need(isinstance(sig.get("shape"), list) and sig["shape"][:2] == [shape[0], t],
                           f"{w} query", f"(B, t) = ({shape[0]}, {t}) leading", sig.get("shape"))
            names = {sig.get("name") for sig in step.get("inputs") or [] if isinstance(sig, dict)}
            if step_kind != "fill":
                p.need(("attention_mask" in names) == bool(d.get("mask")), f"{w}.inputs",
                       f"a mask input exactly when interface.decoder.mask is {d.get('mask')}", sorted(names))
            if step_kind != "cross":
                p.need(("key" in names) == bool(d.get("key")), f"{w}.inputs",
                       f"a key input exactly when interface.decoder.key is {d.get('key')}", sorted(names))
        seen.add((step_kind, t, length))
    if shape_ok and _is_int(chunk):
        S = shape[2]
        need = ([("self", 1, S)] + ([("self", chunk, S)] if chunk > 1 else []) if kind == "self"
                else [("fill", S, S), ("cross", 1, S)] + ([("cross", chunk, S)] if chunk > 1 else []))
        missing = [n for n in need if n not in seen]
        p.need(not missing, "interface.decoder.steps", "steps covering every position (kind, t, length): "
               f"{need}", f"missing {missing}")


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """The bundle's manifest, read safely and validated; `BundleError` naming the first problem."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"Bundle directory not found: {bundle}")
    path = bundle / "manifest.json"
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{bundle} is not a bundle: manifest.json is missing")
    raw = read_bundle_file(bundle, "manifest.json", limit=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path} is corrupt: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "mhagen-bundle":
        raise BundleError(f"{path} is not an mhagen bundle manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise BundleError(f"{path} has manifest version {manifest.get('version')!r}, this runtime reads "
                          f"version {MANIFEST_VERSION}")
    problems = validate_manifest(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise BundleError(f"{path} is malformed: {problems[0]}{more}")
    return manifest


def check_files(bundle: Path, manifest: Mapping[str, Any], names: Sequence[str] | None = None) -> None:
    """Refuse a missing, truncated, tampered or linked file: its SHA-256 must match the manifest's.

    `names` (default: every file the manifest lists) must each be listed."""
    files = manifest["files"]
    for name in files if names is None else names:
        if name not in files:
            raise BundleError(f"{bundle}: manifest lists no hash for {name}")
        digest, size = _hash_inside(bundle, check_relpath(name, "file"))
        if size != files[name]["size"] or digest != files[name]["sha256"]:
            raise BundleError(f"{bundle}: {name} does not match its SHA-256 in manifest.json "
                              "(truncated or modified); rebuild the bundle")


# Files Python would import or execute from a bundle folder (run.py puts none of its folder on the
# import path and reads no bytecode, but a user's `sys.path.insert(0, bundle)` would).
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth")


def check_no_code_added(bundle: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a bundle holding Python code or native libraries its manifest does not list."""
    listed = set(manifest["files"])
    for dirpath, dirnames, filenames in os.walk(bundle):
        rel_dir = Path(dirpath).relative_to(bundle)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.endswith(_CODE_SUFFIXES) and rel not in listed:
                raise BundleError(f"{bundle}: {rel} is code the manifest does not list; "
                                  "remove it (a bundle runs only the code it was built with)")


def check_machine(target: Mapping[str, Any]) -> None:
    """Refuse a module built for another CPU, or GPU code built for subgroups this device lacks."""
    arch = target.get("arch", "any")
    host = host_arch()
    if arch == "host":
        arch = target.get("built_on", {}).get("arch", host)
    if arch not in ("any", host):
        raise BundleError(f"target `{target['name']}` was compiled for {arch} CPUs; this machine is {host}")
    needed = set(target.get("cpu_features", []))
    missing = sorted(needed - host_cpu_features()) if needed else []
    if missing:
        raise BundleError(f"target `{target['name']}` was compiled for a CPU with "
                          f"{', '.join(missing[:6])}{'...' if len(missing) > 6 else ''}, which this CPU lacks; "
                          "use a portable target such as cpu-x86_64")
    mismatch = subgroup_mismatch(target.get("subgroup_sizes", []), str(target.get("driver", "")))
    if mismatch:
        raise BundleError(f"target `{target['name']}` cannot run here: {mismatch}")


def verify_failed(target: Mapping[str, Any]) -> bool:
    """True when the build's verify of this target failed (or the build marked it not runnable)."""
    return target.get("runnable") is False or target.get("verify", {}).get("passed") is False


# `target="auto"` picks the first target of the bundle that runs here, by driver in this order
# (GPUs first, then the CPU, IREE's reference VM last), as ONNX Runtime walks its provider list.
AUTO_DRIVER_ORDER = ("cuda", "hip", "metal", "vulkan", "local-task", "local-sync")


def choose_target(bundle: Path, manifest: Mapping[str, Any], *, allow_failed: bool = False) -> str:
    """The target `auto` means: the first that runs on this machine, by `AUTO_DRIVER_ORDER`."""
    from .devices import driver_status

    def rank(t: Mapping[str, Any]) -> int:
        driver = t["driver"]
        return AUTO_DRIVER_ORDER.index(driver) if driver in AUTO_DRIVER_ORDER else len(AUTO_DRIVER_ORDER)

    skipped = []
    for t in sorted(manifest["targets"], key=rank):
        if verify_failed(t) and not allow_failed:
            skipped.append(f"{t['name']}: failed its verify")
            continue
        ok, why = driver_status(t["driver"])
        if not ok:
            skipped.append(f"{t['name']}: {why}")
            continue
        try:
            check_machine(t)
        except BundleError as exc:
            skipped.append(f"{t['name']}: {str(exc).split(';')[0]}")
            continue
        return t["name"]
    raise BundleError(f"{bundle}: no target of this bundle runs on this machine ({'; '.join(skipped)})")


def load_bundle(bundle: str | Path, target: str = "cpu", *, verify_hashes: bool = True,
                allow_failed: bool = False) -> CompiledLayer:
    """Load one target of a bundle directory: the same callable `mhagen.build` returns.

    Validates the manifest, checks the SHA-256 of every file it lists (`verify_hashes`), the IREE
    runtime version, and that the module was compiled for this machine's CPU. A target whose verify
    failed when the bundle was built is refused unless `allow_failed=True`. `target="auto"` takes
    the first target that runs here, GPUs first (`AUTO_DRIVER_ORDER`); `layer.target_name` says
    which.

        layer = load_bundle("out/encoder", target="cpu")
        out = layer(query, value)
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if target == "auto":
        target = choose_target(bundle, manifest, allow_failed=allow_failed)
    targets = {t["name"]: t for t in manifest["targets"]}
    if target not in targets:
        raise BundleError(f"{bundle} has no target `{target}`; it holds: {', '.join(sorted(targets))}")
    tgt = targets[target]
    if verify_failed(tgt) and not allow_failed:
        why = tgt.get("verify", {}).get("message") or tgt.get("verify", {}).get("status", "failed")
        raise BundleError(f"{bundle}: target `{target}` failed its verify when built ({' '.join(str(why).split())[:160]}); "
                          "it is not runnable (load with allow_failed=True / --allow-failed to run it anyway)")
    built = manifest["iree"]["compiler_version"]
    have = runtime_version()
    if built.split(".")[:2] != have.split(".")[:2]:
        raise BundleError(f"{bundle} was compiled by IREE {built}; this runtime is iree-base-runtime {have} "
                          f"(install iree-base-runtime=={'.'.join(built.split('.')[:2])}.*)")
    check_machine(tgt)
    if verify_hashes:   # every listed file but the module, which is checked below as read
        check_files(bundle, manifest, [n for n in manifest["files"] if n != tgt["module"]])
        check_no_code_added(bundle, manifest)
    # The module is read once and checked in memory, so what runs is what was hashed.
    vmfb = read_bundle_file(bundle, tgt["module"])
    entry = manifest["files"][tgt["module"]]
    if verify_hashes and (len(vmfb) != entry["size"] or hashlib.sha256(vmfb).hexdigest() != entry["sha256"]):
        raise BundleError(f"{bundle}: {tgt['module']} does not match its SHA-256 in manifest.json "
                          "(truncated or modified); rebuild the bundle")
    parameters = None
    if manifest.get("weights"):
        rel = manifest["weights"]["file"]
        os.close(_open_inside(bundle, rel))      # a regular file inside the bundle, not a link
        parameters = parameter_index(irpa=bundle / rel)
    stablehlo = read_bundle_file(bundle, manifest["program"]).decode(errors="replace")
    return CompiledLayer(manifest["interface"], vmfb, tgt, stablehlo=stablehlo, parameters=parameters)
