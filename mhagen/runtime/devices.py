"""Drivers and devices: which IREE drivers have a device here, one shared device per driver, and
loading a compiled module (with its parameter archive) onto it."""

from __future__ import annotations

import functools
import platform
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MhagenRuntimeError
from .transfer import to_device, to_host, zeros

__all__ = ["driver_status", "Device", "parameter_index", "load_module", "host_arch", "host_cpu_features",
           "runtime_version", "subgroup_sizes", "subgroup_mismatch", "PARAMETER_SCOPE"]

PARAMETER_SCOPE = "model"


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


@functools.lru_cache(maxsize=None)
def subgroup_sizes(driver: str) -> tuple[int, ...] | None:
    """The subgroup sizes (lanes) the first device of a GPU driver may run compute shaders with, as
    IREE's device dump reports them: Vulkan's `subgroupSize`, and every power of two from
    `minSubgroupSize` to `maxSubgroupSize`. None where the dump does not say (CPU drivers, no device).
    Mesa's lavapipe on a 256-bit CPU: (8,)."""
    if driver in ("local-task", "local-sync") or not driver_status(driver)[0]:
        return None
    import iree.runtime as rt

    try:
        hal_driver = rt.get_driver(driver)
        info = hal_driver.dump_device_info(hal_driver.query_available_devices()[0]["device_id"])
    except Exception:  # noqa: BLE001 - no dump, no answer
        return None
    line = re.search(r"^subgroup: size=(\d+)(.*)$", str(info), re.M)
    if not line:
        return None
    size = int(line.group(1))
    low = re.search(r"minSubgroupSize=(\d+)", line.group(2))
    high = re.search(r"maxSubgroupSize=(\d+)", line.group(2))
    sizes, lanes = {size}, int(low.group(1)) if low else size
    while lanes <= (int(high.group(1)) if high else size):
        sizes.add(lanes)
        lanes *= 2
    return tuple(sorted(sizes))


def subgroup_mismatch(required: Sequence[int], driver: str) -> str | None:
    """Why code compiled for subgroups of `required` lanes cannot run on `driver`'s device, or None.

    IREE's SPIR-V for a GPU profile (Vulkan `ampere`: 32 lanes) reduces across one subgroup of the
    profile's size without asking the driver for that size; on a device with smaller subgroups the
    reduction covers only part of the row (lavapipe's 8 lanes: a softmax over 32 keys summed 8;
    reports/iree-vulkan-subgroup-size)."""
    have = subgroup_sizes(driver)
    if not required or have is None or set(have) <= set(required):
        return None
    return (f"its code needs {_lanes(required)} subgroups; this `{driver}` device has {_lanes(have)} ones: "
            f"{driver_status(driver)[1]}")


def _lanes(sizes: Sequence[int]) -> str:
    """(32, 64) -> '32- or 64-lane'."""
    return "- or ".join(map(str, sizes)) + "-lane"


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

    def zeros(self, shape: Sequence[int], dtype: Any) -> Any:
        return zeros(self.hal, shape, dtype)


def parameter_index(weights: Mapping[str, np.ndarray] | None = None, *, irpa: str | Path | None = None) -> Any:
    """An `iree.runtime.ParameterIndex` from in-memory arrays or an .irpa archive."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    if irpa is not None:
        index.load(str(irpa))
    for name, array in (weights or {}).items():
        index.add_buffer(name, np.ascontiguousarray(array).tobytes())
    return index


# IREE reads a module in place from 64-byte aligned memory (`VmModule.wrap_buffer`).
MODULE_ALIGNMENT = 64


def aligned_buffer(data: Any) -> memoryview:
    """A copy of `data` (bytes-like) in 64-byte aligned memory."""
    src = np.frombuffer(data, dtype=np.uint8)
    raw = np.empty(src.nbytes + MODULE_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % MODULE_ALIGNMENT
    out = raw[start:start + src.nbytes]
    out[...] = src
    return memoryview(out)


def _module_from_buffer(instance: Any, vmfb: Any) -> tuple[Any, Any]:
    """The module read in place from `vmfb` where it is aligned, else from one aligned copy: its
    weights (inline constants) are then held once, not once more by a copy inside IREE."""
    import iree.runtime as rt

    if np.frombuffer(vmfb, dtype=np.uint8).ctypes.data % MODULE_ALIGNMENT:
        vmfb = aligned_buffer(vmfb)
    return rt.VmModule.wrap_buffer(instance, vmfb), vmfb


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
        module, held = _module_from_buffer(device.config.vm_instance, vmfb)
        context = rt.SystemContext(vm_modules=modules + [module], config=device.config)
        context._mhagen_module_buffer = held        # the module reads from it while the context lives
        functions = context.modules[module.name]
    except (RuntimeError, ValueError) as exc:
        raise MhagenRuntimeError(f"IREE runtime could not load the module on `{driver}`: "
                                 f"{_first_line(exc)}") from None
    return device, (context, functions)



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

