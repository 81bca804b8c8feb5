"""Timing a loaded layer as `iree-benchmark-module` does: warm-up calls, then repeated calls of the
compiled function alone, with the inputs already on the device; p50, p90, p99, mean, min and max.

Needs only NumPy and iree-base-runtime, so a deployed bundle times itself:

    python run.py --target cpu --bench           # in a bundle (run.py is generated)
    mhagen bench out/encoder --target cpu        # the same, from mhagen

    timing = time_layer(load_bundle("out/encoder", "cpu"))
    timing.p50_ms, timing.summary()
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .devices import _first_line
from .errors import CallError, MhagenRuntimeError
from .layer import CompiledLayer, np_dtype

__all__ = ["Timing", "example_inputs", "time_layer", "DEFAULT_REPEATS", "DEFAULT_WARMUP", "DEFAULT_BUDGET_S"]

DEFAULT_REPEATS = 100
DEFAULT_WARMUP = 3
# Timed calls stop after this many seconds (never fewer than MIN_REPEATS), so a slow module on a
# slow device still answers in about this long.
DEFAULT_BUDGET_S = 10.0
MIN_REPEATS = 5


@dataclass(frozen=True)
class Timing:
    """Timed calls of one compiled function, in milliseconds."""

    target: str
    function: str
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]   # (name, shape, dtype) as sent to the device
    warmup: int
    times_ms: tuple[float, ...]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.times_ms))

    @property
    def min_ms(self) -> float:
        return float(np.min(self.times_ms))

    @property
    def max_ms(self) -> float:
        return float(np.max(self.times_ms))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "function": self.function,
                "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in self.inputs],
                "warmup": self.warmup, "calls": len(self.times_ms), "p50_ms": self.p50_ms,
                "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "mean_ms": self.mean_ms,
                "min_ms": self.min_ms, "max_ms": self.max_ms, "times_ms": list(self.times_ms)}

    def summary(self) -> str:
        """Three lines: what ran, on what inputs, and the figures."""
        shapes = ", ".join(f"{n} {tuple(s)} {d}" for n, s, d in self.inputs)
        return (f"{self.target}: function {self.function}, inputs on the device: {shapes}\n"
                f"{self.warmup} warm-up, {len(self.times_ms)} timed calls\n"
                f"p50 {self.p50_ms:.3f} ms  p90 {self.p90_ms:.3f} ms  p99 {self.p99_ms:.3f} ms  "
                f"mean {self.mean_ms:.3f} ms  min {self.min_ms:.3f} ms  max {self.max_ms:.3f} ms")


def example_inputs(layer: CompiledLayer, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the layer's declared shapes (the largest bucket of a dynamic build): unit
    normal values, a mask that attends everywhere."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for sig in layer.inputs:
        if sig.name == "attention_mask":
            out[sig.name] = np.ones(sig.shape, dtype=bool)
        elif sig.name == "dropout_key":
            out[sig.name] = np.array([0, seed], dtype=np.uint32)
        else:
            out[sig.name] = rng.standard_normal(sig.shape).astype(np_dtype(sig.dtype))
    return out


def time_layer(layer: CompiledLayer, inputs: Mapping[str, Any] | None = None, *,
               warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
               budget_s: float = DEFAULT_BUDGET_S) -> Timing:
    """Time `layer`'s compiled function on `inputs` (default: `example_inputs(layer)`).

    The inputs are checked and padded as a call would, copied to the device once, and the
    function is then called `warmup` times untimed and up to `repeats` times timed (fewer when
    they would take over `budget_s`, never fewer than 5). The argument checks and the host
    transfers of `layer(...)` are outside the timed calls, as with `iree-benchmark-module`.

        timing = time_layer(layer, repeats=200)
        print(timing.summary())
    """
    if repeats < 1 or warmup < 0:
        raise CallError(f"Received an invalid value for argument `repeats`/`warmup`, expected repeats >= 1 "
                        f"and warmup >= 0. Received: repeats={repeats}, warmup={warmup}")
    arrays_in = dict(example_inputs(layer) if inputs is None else inputs)
    declared = layer.inputs[0].shape[0]
    batch = np.shape(arrays_in.get("query"))[0] if np.ndim(arrays_in.get("query")) else declared
    if "batch" not in layer.interface.get("dynamic", []) and batch != declared:
        raise CallError(f"`query` has batch {batch}: timing runs one compiled call, and this build "
                        f"computes batch {declared} (other batches run in chunks of it); give batch {declared}")
    fn, arrays, _ = layer.prepare(**arrays_in)
    device = layer._device
    args = [device.to_device(np.ascontiguousarray(a)) for a in arrays]
    function = layer._table[fn["name"]]
    times: list[float] = []
    try:
        for _ in range(warmup):
            function(*args)
        deadline = time.perf_counter() + budget_s
        while len(times) < repeats and (len(times) < MIN_REPEATS or time.perf_counter() < deadline):
            start = time.perf_counter()
            function(*args)
            times.append((time.perf_counter() - start) * 1e3)
    except (RuntimeError, ValueError) as exc:
        raise MhagenRuntimeError(f"IREE runtime failed running on `{layer.target_name}`: "
                                 f"{_first_line(exc)}") from None
    shapes = tuple((s["name"], tuple(a.shape), s["dtype"]) for s, a in zip(fn["inputs"], arrays))
    return Timing(layer.target_name, fn["name"], shapes, warmup, tuple(times))
