"""Stage 5, the load: compiled modules in the IREE runtime, called with NumPy arrays.

`CompiledLayer` is the callable `build()` and `load()` return: it checks inputs against the call
signature (shape and dtype before values), moves them to the device, runs the module and brings the
results back as NumPy arrays, on every driver (Vulkan on Mesa's lavapipe included: see `_transfer`).

    layer = mhagen.build(spec, target="cpu")
    out = layer(query, value)              # np.ndarray (B, T, E)
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CallError, MhagenRuntimeError
from .spec import Spec
from .trace import TensorSig

__all__ = ["CompiledLayer", "driver_status", "load_module", "Device"]


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
        from ._transfer import to_device

        return to_device(self.hal, array)

    def to_host(self, result: Any) -> np.ndarray:
        from ._transfer import to_host

        return to_host(self.hal, result)


@dataclass
class _Loaded:
    context: Any
    function: Any


def load_module(vmfb: bytes, driver: str, *, parameters: Any = None) -> tuple[Device, _Loaded]:
    """Load a .vmfb on `driver`. `parameters` is an `iree.runtime.ParameterIndex` for modules whose
    weights live in a parameter archive."""
    import iree.runtime as rt

    device = Device.get(driver)
    try:
        modules = []
        if parameters is not None:
            provider = parameters.create_provider(scope="model")
            modules.append(rt.create_io_parameters_module(device.config.vm_instance, provider))
        module = rt.VmModule.copy_buffer(device.config.vm_instance, vmfb)
        context = rt.SystemContext(vm_modules=modules + [module], config=device.config)
        function = context.modules[module.name]["main"]
    except (RuntimeError, ValueError) as exc:
        raise MhagenRuntimeError(f"IREE runtime could not load the module on `{driver}`: "
                                 f"{_first_line(exc)}") from None
    return device, _Loaded(context, function)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class CompiledLayer:
    """A compiled, loaded attention layer. Call it like the Keras layer, with NumPy arrays.

    `layer(query, value, key=None, attention_mask=None, *, dropout_key=None)` returns the output
    `(B, T, E)`, or `(output, scores)` when the spec asks for scores. `attention_mask` may have any
    shape that broadcasts (Keras-style) to the declared one. When the spec trains with dropout, each
    call draws the key `[seed, counter]` as Keras' SeedGenerator does, unless `dropout_key` is given.
    """

    def __init__(self, spec: Spec, vmfb: bytes, target: Any, *, stablehlo: str = "",
                 inputs: Sequence[TensorSig], outputs: Sequence[TensorSig], parameters: Any = None,
                 compile_seconds: float = 0.0):
        self.spec = spec
        self.target = target
        self.stablehlo = stablehlo
        self.vmfb = vmfb
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.compile_seconds = compile_seconds
        self._device, self._loaded = load_module(vmfb, target.driver, parameters=parameters)
        self._counter = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        sig = ", ".join(f"{t.name}{t.shape}" for t in self.inputs)
        return f"<CompiledLayer target={self.target.name} ({sig})>"

    # -- argument checking ----------------------------------------------------------------------
    def _check_array(self, sig: TensorSig, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.shape != sig.shape:
            raise CallError(f"`{sig.name}` has shape {array.shape}, expected {sig.shape}")
        want = _np_dtype(sig.dtype)
        if array.dtype != want:
            floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
            if sig.dtype == "uint32" and np.issubdtype(array.dtype, np.integer):
                pass
            elif not floating:
                raise CallError(f"`{sig.name}` has dtype {array.dtype}, expected {sig.dtype} "
                                "(or another floating dtype, which is cast)")
            array = array.astype(want)
        return np.ascontiguousarray(array)

    def _mask(self, sig: TensorSig, value: Any) -> np.ndarray:
        g = self.spec.geometry
        mask = np.asarray(value)
        if mask.dtype == object or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
            raise CallError(f"`attention_mask` has dtype {mask.dtype}, expected bool or numbers")
        mask = mask != 0
        declared = g.expand_mask_shape(sig.shape)
        expanded = g.expand_mask_shape(mask.shape)
        try:
            full = np.broadcast_to(mask.reshape(expanded), declared)
        except ValueError:
            raise CallError(f"`attention_mask` has shape {mask.shape}, which does not broadcast to "
                            f"the declared mask {sig.shape}") from None
        return np.ascontiguousarray(full.reshape(sig.shape).astype(_np_dtype(sig.dtype)))

    def prepare(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                dropout_key: Any = None) -> list[np.ndarray]:
        """Check and convert call arguments into the module's input list (host arrays)."""
        given = {"query": query, "value": value, "key": key, "attention_mask": attention_mask}
        names = {t.name for t in self.inputs}
        if key is not None and "key" not in names:
            raise CallError("`key` was given, but the spec declares no key input (set [call] key)")
        if attention_mask is not None and "attention_mask" not in names:
            raise CallError("`attention_mask` was given, but the spec declares no mask "
                            "(set [call] attention_mask = true)")
        out = []
        for sig in self.inputs:
            if sig.name == "dropout_key":
                out.append(self._dropout_key(dropout_key))
                continue
            value_ = given[sig.name]
            if value_ is None:
                if sig.name == "key":
                    value_ = given["value"]
                elif sig.name == "attention_mask":
                    value_ = np.ones(sig.shape, dtype=bool)
                else:
                    raise CallError(f"`{sig.name}` is required")
            out.append(self._mask(sig, value_) if sig.name == "attention_mask"
                       else self._check_array(sig, value_))
        return out

    def _dropout_key(self, dropout_key: Any) -> np.ndarray:
        if dropout_key is not None:
            key = np.asarray(dropout_key)
            if key.shape == ():
                key = np.array([0, int(key)])      # an int seed, as jax.random.PRNGKey(seed)
            if key.shape != (2,):
                raise CallError(f"`dropout_key` has shape {key.shape}, expected (2,) or an int")
            return key.astype(np.uint32)
        with self._lock:
            counter = self._counter
            self._counter += 1
        return np.array([self.spec.layer.seed or 0, counter], dtype=np.uint32)

    # -- running --------------------------------------------------------------------------------
    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the module on prepared host arrays; returns host arrays."""
        device = self._device
        args = [device.to_device(a) for a in arrays]
        try:
            results = self._loaded.function(*args)
        except (RuntimeError, ValueError) as exc:
            raise MhagenRuntimeError(f"IREE runtime failed running on `{self.target.name}`: "
                                     f"{_first_line(exc)}") from None
        if not isinstance(results, (list, tuple)):
            results = [results]
        return [device.to_host(r) for r in results]

    def __call__(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                 dropout_key: Any = None) -> Any:
        outs = self.run(self.prepare(query, value, key, attention_mask, dropout_key=dropout_key))
        return tuple(outs) if len(outs) > 1 else outs[0]
