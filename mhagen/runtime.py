"""Stage 5, the load: compiled modules in the IREE runtime, called with NumPy arrays.

`CompiledLayer` is the callable that `build()` and `load()` return. It checks inputs against the call
signature (shape and dtype before values), dispatches to the right shape bucket (padding keys under
the mask and slicing padded queries away), moves inputs to the device, runs the module and brings the
results back as NumPy arrays, on every driver, Vulkan on Mesa's lavapipe included.

This file needs only NumPy and iree-base-runtime: it is copied into every bundle as
`mhagen_runtime.py`, so a deployed bundle runs without JAX and without mhagen.

    layer = load_bundle("out/encoder", target="cpu")
    out = layer(query, value)              # np.ndarray (B, T, E)
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside the mhagen package
    from .errors import BundleError, CallError, MhagenRuntimeError
except ImportError:  # standalone copy inside a bundle
    class MhagenError(Exception):
        """Root of every error this runtime raises on purpose."""

    class CallError(MhagenError, ValueError):  # type: ignore[no-redef]
        """Inputs of the wrong shape, dtype or number."""

    class MhagenRuntimeError(MhagenError, RuntimeError):  # type: ignore[no-redef]
        """The IREE runtime could not load or run a module."""

    class BundleError(MhagenError):  # type: ignore[no-redef]
        """A bundle is missing, corrupt, tampered with, or for another machine."""

__all__ = ["CompiledLayer", "driver_status", "load_module", "load_bundle", "Device", "to_device",
           "to_host", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1
PARAMETER_SCOPE = "model"


# ---------------------------------------------------------------------------------------------
# Drivers and devices
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def driver_status(driver: str) -> tuple[bool, str]:
    """(True, "device name") when `driver` exists in this runtime and has a device, else (False, why)."""
    import iree.runtime as rt

    if driver not in rt.query_available_drivers():
        return False, f"this IREE runtime has no `{driver}` driver"
    if driver in ("local-task", "local-sync"):
        return True, "host CPU"
    try:
        devices = rt.get_driver(driver).query_available_devices()
    except Exception as exc:  # noqa: BLE001 - the driver refuses to start: no device
        message = _first_line(exc)
        library = re.search(r"library '?([\w./-]+\.so)", message) or re.search(r"([\w-]+\.so)", message)
        if library:
            return False, f"no `{driver}` device: {library.group(1)} is not installed"
        return False, f"no `{driver}` device ({message})"
    if not devices:
        return False, f"`{driver}` driver found no device"
    return True, str(devices[0].get("name", driver))


def _first_line(exc: BaseException) -> str:
    """The useful part of an IREE status message: no source path, no status code."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\S*iree/\S+:\d+:\s*", "", text)
    text = re.sub(r"^(Error creating driver:\s*)?[A-Z_]+;\s*", "", text)
    return text or type(exc).__name__


class Device:
    """One runtime device per driver, shared by every module loaded on it (creation is costly)."""

    _lock = threading.Lock()
    _cache: dict[str, "Device"] = {}

    def __init__(self, driver: str):
        import iree.runtime as rt

        ok, reason = driver_status(driver)
        if not ok:
            raise MhagenRuntimeError(f"Cannot run on driver `{driver}`: {reason}")
        self.driver = driver
        self.config = rt.Config(driver)
        self.hal = self.config.device

    @classmethod
    def get(cls, driver: str) -> "Device":
        with cls._lock:
            if driver not in cls._cache:
                cls._cache[driver] = cls(driver)
            return cls._cache[driver]

    def to_device(self, array: np.ndarray) -> Any:
        return to_device(self.hal, array)

    def to_host(self, result: Any) -> np.ndarray:
        return to_host(self.hal, result)


def parameter_index(weights: Mapping[str, np.ndarray] | None = None, *, irpa: str | Path | None = None) -> Any:
    """An `iree.runtime.ParameterIndex` from in-memory arrays or an .irpa archive."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    if irpa is not None:
        index.load(str(irpa))
    for name, array in (weights or {}).items():
        index.add_buffer(name, np.ascontiguousarray(array).tobytes())
    return index


def load_module(vmfb: bytes, driver: str, *, parameters: Any = None) -> tuple[Device, Any]:
    """Load a .vmfb on `driver`: returns the device and the module's function table.

    `parameters` is an `iree.runtime.ParameterIndex` for modules whose weights live in a
    parameter archive (scope "model")."""
    import iree.runtime as rt

    device = Device.get(driver)
    try:
        modules = []
        if parameters is not None:
            provider = parameters.create_provider(scope=PARAMETER_SCOPE)
            modules.append(rt.create_io_parameters_module(device.config.vm_instance, provider))
        module = rt.VmModule.copy_buffer(device.config.vm_instance, vmfb)
        context = rt.SystemContext(vm_modules=modules + [module], config=device.config)
        functions = context.modules[module.name]
    except (RuntimeError, ValueError) as exc:
        raise MhagenRuntimeError(f"IREE runtime could not load the module on `{driver}`: "
                                 f"{_first_line(exc)}") from None
    return device, (context, functions)


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def expand_mask_shape(shape: Sequence[int], scores_rank: int, num_axes: int) -> tuple[int, ...]:
    """Keras' mask expansion: unit axes inserted at -(2k+1) until the mask has the scores' rank."""
    out = list(shape)
    pos = -2 * num_axes - 1
    while len(out) < scores_rank:
        index = len(out) + 1 + pos
        if index < 0:
            break
        out.insert(index, 1)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The callable layer
# ---------------------------------------------------------------------------------------------
class CompiledLayer:
    """A compiled, loaded attention layer. Call it like the Keras layer, with NumPy arrays.

    `layer(query, value, key=None, attention_mask=None, *, dropout_key=None)` returns the output
    `(B, T, E)`, or `(output, scores)` when the spec asks for scores. `attention_mask` may have any
    shape that broadcasts (Keras-style) to the declared one. When the spec trains with dropout, each
    call draws the key `[seed, counter]` as Keras' SeedGenerator does, unless `dropout_key` is given.

    `interface` is the call description a bundle's manifest holds (see `mhagen.trace.interface`).
    """

    def __init__(self, interface: Mapping[str, Any], vmfb: bytes, target: Any, *, stablehlo: str = "",
                 parameters: Any = None, spec: Any = None, compile_seconds: float = 0.0):
        self.interface = dict(interface)
        self.spec = spec
        self.target = target
        self.stablehlo = stablehlo
        self.vmfb = vmfb
        self.compile_seconds = compile_seconds
        self.inputs = tuple(_Sig(**s) for s in interface["inputs"])
        self.outputs = tuple(_Sig(**s) for s in interface["outputs"])
        self._functions = sorted(interface["functions"], key=lambda f: (f.get("batch") or 0, f.get("seq") or 0))
        driver = target["driver"] if isinstance(target, Mapping) else target.driver
        self._device, (self._context, self._table) = load_module(vmfb, driver, parameters=parameters)
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def target_name(self) -> str:
        return self.target["name"] if isinstance(self.target, Mapping) else self.target.name

    def __repr__(self) -> str:
        sig = ", ".join(f"{t.name}{t.shape}" for t in self.inputs)
        return f"<CompiledLayer target={self.target_name} ({sig})>"

    # -- argument checking ----------------------------------------------------------------------
    def _array(self, name: str, value: Any, dtype: str) -> np.ndarray:
        array = np.asarray(value)
        want = np_dtype(dtype)
        if array.dtype != want:
            floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
            if not floating:
                raise CallError(f"`{name}` has dtype {array.dtype}, expected {dtype} "
                                "(or another floating dtype, which is cast)")
            array = array.astype(want)
        return array

    def _shapes(self, arrays: dict[str, np.ndarray]) -> tuple[int, int | None]:
        """Check shapes against the signature; returns the actual (batch, seq)."""
        dynamic = self.interface.get("dynamic", [])
        by_name = {s.name: s for s in self.inputs}
        batch = None
        for name, array in arrays.items():
            sig = by_name[name]
            if not dynamic:
                if array.shape != sig.shape:
                    raise CallError(f"`{name}` has shape {array.shape}, expected {sig.shape}")
                continue
            if array.ndim != len(sig.shape):
                raise CallError(f"`{name}` has rank {array.ndim} (shape {array.shape}), expected rank "
                                f"{len(sig.shape)} like {sig.shape}")
            free = {0} if "batch" in dynamic else set()
            if "seq" in dynamic:
                free.add(1)
            fixed = [i for i in range(array.ndim) if i not in free]
            if any(array.shape[i] != sig.shape[i] for i in fixed):
                pattern = ", ".join("*" if i in free else str(d) for i, d in enumerate(sig.shape))
                raise CallError(f"`{name}` has shape {array.shape}, expected ({pattern}) (* = any size)")
            batch = array.shape[0] if batch is None else batch
            if array.shape[0] != batch:
                raise CallError(f"`{name}` has batch {array.shape[0]}, but `query` has batch {batch}")
        q = arrays["query"]
        b = q.shape[0]
        s = max(q.shape[1], arrays["value"].shape[1]) if "seq" in dynamic else None
        if "batch" in dynamic and b > self.interface["max_batch"]:
            raise CallError(f"batch {b} is larger than this build's max_batch {self.interface['max_batch']}")
        if "seq" in dynamic and s is not None and s > self.interface["max_seq"]:
            raise CallError(f"sequence length {s} is larger than this build's max_seq "
                            f"{self.interface['max_seq']}")
        return b, s

    def _function_for(self, batch: int, seq: int | None) -> dict[str, Any]:
        if not self.interface.get("dynamic"):
            return self._functions[0]
        for fn in self._functions:
            if (fn.get("batch") is None or fn["batch"] >= batch) and (seq is None or fn["seq"] >= seq):
                return fn
        raise CallError(f"no compiled bucket holds batch {batch}, seq {seq}")  # guarded by _shapes

    def _mask(self, value: Any, declared: tuple[int, ...]) -> np.ndarray:
        info = self.interface["mask"]
        mask = np.asarray(value)
        if mask.dtype == object or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
            raise CallError(f"`attention_mask` has dtype {mask.dtype}, expected bool or numbers")
        rank, k = info["scores_rank"], info["num_axes"]
        target = expand_mask_shape(declared, rank, k)
        try:
            full = np.broadcast_to((mask != 0).reshape(expand_mask_shape(mask.shape, rank, k)), target)
        except ValueError:
            raise CallError(f"`attention_mask` has shape {mask.shape}, which does not broadcast to "
                            f"the declared mask {tuple(declared)}") from None
        return full.reshape(declared)

    def _dropout_key(self, dropout_key: Any) -> np.ndarray:
        if dropout_key is not None:
            key = np.asarray(dropout_key)
            if key.shape == ():
                key = np.array([0, int(key)])      # an int seed, as jax.random.PRNGKey(seed)
            if key.shape != (2,) or not np.issubdtype(key.dtype, np.integer):
                raise CallError(f"`dropout_key` has shape {key.shape} and dtype {key.dtype}, "
                                "expected 2 unsigned integers or an int")
            return key.astype(np.uint32)
        with self._lock:
            counter = self._counter
            self._counter += 1
        return np.array([self.interface["dropout"]["seed"], counter], dtype=np.uint32)

    def prepare(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                dropout_key: Any = None) -> tuple[dict[str, Any], list[np.ndarray], tuple[int, int | None]]:
        """Check the call's arguments; returns (function, host input arrays, actual (batch, seq))."""
        names = {t.name for t in self.inputs}
        if key is not None and "key" not in names:
            raise CallError("`key` was given, but the spec declares no key input (set [call] key)")
        if attention_mask is not None and "attention_mask" not in names:
            raise CallError("`attention_mask` was given, but the spec declares no mask "
                            "(set [call] attention_mask = true)")
        if query is None or value is None:
            raise CallError("`query` and `value` are required")
        dt = self.interface["compute_dtype"]
        arrays = {"query": self._array("query", query, dt), "value": self._array("value", value, dt)}
        if "key" in names:
            arrays["key"] = self._array("key", value if key is None else key, dt)
        batch, seq = self._shapes(arrays)
        fn = self._function_for(batch, seq)
        q, v = arrays["query"], arrays["value"]
        t_len, s_len = q.shape[1], v.shape[1]
        out: list[np.ndarray] = []
        for sig in fn["inputs"]:
            name, shape, dtype = sig["name"], tuple(sig["shape"]), sig["dtype"]
            if name in arrays:
                out.append(_pad(arrays[name], shape))
            elif name == "attention_mask":
                declared = self._actual_mask_shape(shape, batch, t_len, s_len)
                mask = (np.ones(declared, bool) if attention_mask is None
                        else self._mask(attention_mask, declared))
                out.append(_pad(mask, shape).astype(np_dtype(dtype)))   # padded keys stay masked
            elif name == "dropout_key":
                out.append(self._dropout_key(dropout_key))
            else:
                raise CallError(f"module input `{name}` has no source")  # a corrupt interface
        return fn, out, (batch, seq)

    def _actual_mask_shape(self, bucket_shape: tuple[int, ...], batch: int, t_len: int,
                           s_len: int) -> tuple[int, ...]:
        declared = tuple(self.interface["mask"]["shape"])
        dynamic = self.interface.get("dynamic", [])
        if not dynamic:
            return declared
        shape = list(declared)
        if "batch" in dynamic:
            shape[0] = batch
        if "seq" in dynamic:
            shape[-2], shape[-1] = t_len, s_len
        return tuple(shape)

    # -- running --------------------------------------------------------------------------------
    def run(self, fn: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one compiled function on prepared host arrays; returns host arrays (unsliced)."""
        device = self._device
        args = [device.to_device(np.ascontiguousarray(a)) for a in arrays]
        try:
            results = self._table[fn["name"]](*args)
        except (RuntimeError, ValueError) as exc:
            raise MhagenRuntimeError(f"IREE runtime failed running on `{self.target_name}`: "
                                     f"{_first_line(exc)}") from None
        if not isinstance(results, (list, tuple)):
            results = [results]
        return [device.to_host(r) for r in results]

    def __call__(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                 dropout_key: Any = None) -> Any:
        fn, arrays, (batch, seq) = self.prepare(query, value, key, attention_mask, dropout_key=dropout_key)
        outs = self.run(fn, arrays)
        if self.interface.get("dynamic"):
            t_len, s_len = np.shape(query)[1], np.shape(value)[1]
            outs = [_slice(o, batch, t_len if seq else None, s_len if seq else None, i == 1)
                    for i, o in enumerate(outs)]
        return tuple(outs) if len(outs) > 1 else outs[0]


class _Sig:
    def __init__(self, name: str, shape: Sequence[int], dtype: str):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    def __repr__(self) -> str:
        return f"{self.name}{self.shape}:{self.dtype}"


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == shape:
        return array
    pad = [(0, s - a) for a, s in zip(array.shape, shape)]
    return np.pad(array, pad)


def _slice(array: np.ndarray, batch: int, t_len: int | None, s_len: int | None, scores: bool) -> np.ndarray:
    """Drop padding: batch on axis 0; queries on axis 1 (outputs) or -2 (scores); keys on -1 (scores)."""
    index: list[Any] = [slice(None)] * array.ndim
    index[0] = slice(0, batch)
    if t_len is not None:
        if scores:
            index[-2] = slice(0, t_len)
            index[-1] = slice(0, s_len)
        else:
            index[1] = slice(0, t_len)
    return np.ascontiguousarray(array[tuple(index)])


# ---------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def runtime_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("iree-base-runtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def host_arch() -> str:
    """This machine's CPU architecture, in the spelling target files use (x86_64, aarch64, ...)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / "manifest.json"
    if not Path(bundle).is_dir():
        raise BundleError(f"Bundle directory not found: {bundle}")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a bundle: manifest.json is missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "mhagen-bundle":
        raise BundleError(f"{path} is not an mhagen bundle manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise BundleError(f"{path} has manifest version {manifest.get('version')}, this runtime reads "
                          f"version {MANIFEST_VERSION}")
    return manifest


def check_files(bundle: Path, manifest: Mapping[str, Any], names: Sequence[str]) -> None:
    """Refuse a missing, truncated or tampered file: its SHA-256 must match the manifest's."""
    files = manifest.get("files", {})
    for name in names:
        if name not in files:
            raise BundleError(f"{bundle}: manifest lists no hash for {name}")
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{bundle}: {name} is missing")
        if path.stat().st_size != files[name]["size"] or sha256_file(path) != files[name]["sha256"]:
            raise BundleError(f"{bundle}: {name} does not match its SHA-256 in manifest.json "
                              "(truncated or modified); rebuild the bundle")


def check_machine(target: Mapping[str, Any]) -> None:
    """Refuse a module built for another CPU, or a runtime of another IREE version."""
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


def load_bundle(bundle: str | Path, target: str = "cpu", *, verify_hashes: bool = True) -> CompiledLayer:
    """Load one target of a bundle directory: the same callable `mhagen.build` returns.

    Checks the manifest's SHA-256 of every file it loads, the IREE runtime version, and that the
    module was compiled for this machine's CPU.

        layer = load_bundle("out/encoder", target="cpu")
        out = layer(query, value)
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    targets = {t["name"]: t for t in manifest.get("targets", [])}
    if target not in targets:
        raise BundleError(f"{bundle} has no target `{target}`; it holds: {', '.join(sorted(targets)) or 'none'}")
    tgt = targets[target]
    built = manifest.get("iree", {}).get("compiler_version", "unknown")
    have = runtime_version()
    if built.split(".")[:2] != have.split(".")[:2]:
        raise BundleError(f"{bundle} was compiled by IREE {built}; this runtime is iree-base-runtime {have} "
                          f"(install iree-base-runtime=={'.'.join(built.split('.')[:2])}.*)")
    check_machine(tgt)
    names = [tgt["module"]] + ([manifest["weights"]["file"]] if manifest.get("weights") else [])
    if verify_hashes:
        check_files(bundle, manifest, names)
    vmfb = (bundle / tgt["module"]).read_bytes()
    parameters = None
    if manifest.get("weights"):
        parameters = parameter_index(irpa=bundle / manifest["weights"]["file"])
    stablehlo_path = bundle / manifest.get("program", "program.mlir")
    stablehlo = stablehlo_path.read_text() if stablehlo_path.is_file() else ""
    return CompiledLayer(manifest["interface"], vmfb, tgt, stablehlo=stablehlo, parameters=parameters)


def run_main(argv: Sequence[str] | None = None, *, bundle: str | Path | None = None,
             prog: str = "run.py") -> int:
    """`run.py` / `mhagen run`: load a bundle target, feed .npy inputs, write .npy outputs.

    run.py --target cpu --input query=q.npy --input value=v.npy --output OUTDIR
    Errors print one line and exit 2.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description="Run an mhagen bundle on .npy inputs.")
    if bundle is None:
        parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--target", default="cpu", help="target directory in the bundle (default cpu)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input: query, value, key, attention_mask or dropout_key")
    parser.add_argument("--output", required=True, help="directory for output.npy (and scores.npy)")
    args = parser.parse_args(argv)
    try:
        layer = load_bundle(bundle if bundle is not None else args.bundle, args.target)
        inputs: dict[str, Any] = {}
        for item in args.input:
            name, sep, file = item.partition("=")
            if not sep or name not in ("query", "value", "key", "attention_mask", "dropout_key"):
                raise CallError(f"Received an invalid value for argument `--input`, expected NAME=FILE.npy "
                                f"with NAME one of query, value, key, attention_mask, dropout_key. "
                                f"Received: --input={item!r}")
            try:
                inputs[name] = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CallError(f"Cannot read `{name}` from {file}: {exc}") from None
        for name in ("query", "value"):
            if name not in inputs:
                raise CallError(f"Missing --input {name}=FILE.npy")
        result = layer(**inputs)
        outs = list(result) if isinstance(result, tuple) else [result]
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, array in zip(("output", "scores"), outs):
            np.save(out_dir / f"{name}.npy", array)
            print(f"{name}: {array.shape} {array.dtype} -> {out_dir / (name + '.npy')}")
    except (CallError, MhagenRuntimeError, BundleError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Host <-> device transfers
#
# `DeviceArray.to_host()` imports a fresh host allocation, which Mesa's lavapipe refuses ("host
# allocation import pointer does not satisfy Vulkan minImportedHostPointerAlignment 4096"). So
# results are read by mapping their buffer when it is host-visible and mappable (the CPU drivers),
# else by a `queue_copy` into a mappable staging buffer. Inputs are written into freshly allocated
# device buffers through `map()`, or through a staging copy where device memory is not mappable
# (discrete GPUs). bool tensors travel as one byte per element, as IREE stores i1.
# ---------------------------------------------------------------------------------------------
import iree.runtime as rt  # noqa: E402  (kept beside the code that needs it)
from iree.runtime.dtypes import map_dtype_to_hal_element_type  # noqa: E402

_MT = rt.MemoryType
_BU = rt.BufferUsage
_BC = rt.BufferCompatibility

_DEVICE_MT = int(_MT.DEVICE_LOCAL)
_STAGING_MT = int(_MT.HOST_LOCAL | _MT.DEVICE_VISIBLE)
_MAPPABLE_DEVICE_USAGE = int(_BU.DEFAULT | _BU.MAPPING)
_PLAIN_DEVICE_USAGE = int(_BU.DEFAULT)
_UPLOAD_STAGING_USAGE = int(_BU.TRANSFER_SOURCE | _BU.MAPPING)
_DOWNLOAD_STAGING_USAGE = int(_BU.TRANSFER_TARGET | _BU.MAPPING)

_direct_ok_cache: dict[int, bool] = {}


def _device_of(device):
    return device.device if isinstance(device, rt.Config) else device


def _alloc_size(nbytes: int) -> int:
    # zero-size buffers are awkward for some drivers; round to 4 bytes
    # (Vulkan fill/copy granularity).
    return max(4, (nbytes + 3) & ~3)


def _direct_mappable_ok(device: rt.HalDevice) -> bool:
    key = id(device)
    if key not in _direct_ok_cache:
        compat = device.allocator.query_buffer_compatibility(
            memory_type=_DEVICE_MT,
            allowed_usage=_MAPPABLE_DEVICE_USAGE,
            intended_usage=_MAPPABLE_DEVICE_USAGE,
            allocation_size=4096,
        )
        ok = bool(compat & int(_BC.ALLOCATABLE)) and bool(compat & int(_BC.QUEUE_DISPATCH))
        if ok:
            # Double-check the buffer really comes back host visible + mappable.
            try:
                b = device.allocator.allocate_buffer(
                    memory_type=_DEVICE_MT,
                    allowed_usage=_MAPPABLE_DEVICE_USAGE,
                    allocation_size=16,
                )
                ok = _is_mappable(b)
            except Exception:
                ok = False
        _direct_ok_cache[key] = ok
    return _direct_ok_cache[key]


def _is_mappable(buf: rt.HalBuffer) -> bool:
    hv = int(_MT.HOST_VISIBLE)
    ms = int(_BU.MAPPING_SCOPED)
    return (buf.memory_type() & hv) == hv and (buf.allowed_usage() & ms) == ms


def _write_mapped(buf: rt.HalBuffer, host: np.ndarray) -> None:
    mapped = buf.map()
    view = mapped.asarray([host.nbytes], np.dtype(np.uint8))
    view[...] = host.reshape(-1).view(np.uint8)
    del view, mapped  # unmap (flushes if non-coherent)


def _queue_copy_wait(device: rt.HalDevice, src: rt.HalBuffer, dst: rt.HalBuffer) -> None:
    sem = device.create_semaphore(0)
    device.queue_copy(
        src,
        dst,
        wait_semaphores=rt.HalFence.create_at(sem, 0),
        signal_semaphores=rt.HalFence.create_at(sem, 1),
    )
    rt.HalFence.create_at(sem, 1).wait()


def to_device(device, array) -> rt.DeviceArray:
    """Copy a NumPy array into a new device buffer (no host-pointer import)."""
    device = _device_of(device)
    host = np.asarray(array, order="C")  # keeps 0-d shape (ascontiguousarray would make it 1-d)
    if host.dtype == np.bool_:
        storage = host.view(np.uint8)  # i1 is stored as i8
    else:
        storage = host
    et = map_dtype_to_hal_element_type(host.dtype)
    if et is None:
        raise TypeError(f"dtype {host.dtype} has no IREE HAL element type")
    nbytes = storage.nbytes
    size = _alloc_size(nbytes)
    alloc = device.allocator

    if _direct_mappable_ok(device):
        buf = alloc.allocate_buffer(
            memory_type=_DEVICE_MT, allowed_usage=_MAPPABLE_DEVICE_USAGE, allocation_size=size
        )
        if nbytes:
            _write_mapped(buf, storage)
    else:
        buf = alloc.allocate_buffer(
            memory_type=_DEVICE_MT, allowed_usage=_PLAIN_DEVICE_USAGE, allocation_size=size
        )
        staging = alloc.allocate_buffer(
            memory_type=_STAGING_MT, allowed_usage=_UPLOAD_STAGING_USAGE, allocation_size=size
        )
        if nbytes:
            _write_mapped(staging, storage)
        _queue_copy_wait(device, staging, buf)

    bv = rt.HalBufferView(buf, list(host.shape), et)
    return rt.DeviceArray(device, bv, implicit_host_transfer=False, override_dtype=host.dtype)


def to_host(device, result) -> np.ndarray:
    """Read a DeviceArray / HalBufferView (e.g. a function result) into a fresh ndarray."""
    device = _device_of(device)
    if isinstance(result, np.ndarray):
        return np.array(result, copy=True)
    override = None
    if isinstance(result, rt.DeviceArray):
        bv = result._buffer_view
        override = result._override_dtype
    elif isinstance(result, rt.HalBufferView):
        bv = result
    else:
        raise TypeError(f"to_host: unsupported result type {type(result)}")

    shape = tuple(bv.shape)
    raw_dtype = np.dtype(rt.HalElementType.map_to_dtype(bv.element_type))
    want = np.dtype(override) if override is not None else raw_dtype
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * raw_dtype.itemsize
    src = bv.get_buffer()  # may be larger than nbytes (padding); data starts at 0
    # No extra sync needed: default (sync-ABI) IREE functions wait for their own
    # completion before returning. For async-ABI ("coarse-fences") functions,
    # wait on the signal fence you passed before calling to_host.

    if _is_mappable(src):
        mapped = src.map()
        flat = np.array(mapped.asarray([nbytes], np.dtype(np.uint8)), copy=True)
        del mapped
    else:
        staging = device.allocator.allocate_buffer(
            memory_type=_STAGING_MT,
            allowed_usage=_DOWNLOAD_STAGING_USAGE,
            allocation_size=_alloc_size(src.byte_length()),
        )
        _queue_copy_wait(device, src, staging)
        mapped = staging.map()
        flat = np.array(mapped.asarray([nbytes], np.dtype(np.uint8)), copy=True)
        del mapped

    out = flat.view(raw_dtype).reshape(shape)
    if want == np.bool_ and raw_dtype != np.bool_:
        out = out != 0
    elif want == np.bool_:
        out = out.view(np.uint8) != 0  # normalise any nonzero byte to True
    elif want != raw_dtype:
        out = out.astype(want)
    return out
