"""The decode benchmark: per-token latency of one decode step, against keras_hub under `jax.jit`.

For a decoder spec (`[call] cache_max_length = S`), in one process, on the same weights and the
same cache (filled with seeded values, as after a prompt of S - 1 tokens), it times one step of one
new token per batch row at position S - 1, so that the step reads the whole cache:

- **mhagen**: the step entry point compiled for a target, the cache held on the device and written
  in place (`layer.decode(token, token, cache=cache, index=S - 1)`, transfers included);
- **jax.jit**: keras_hub's `CachedMultiHeadAttention` as its generation loop calls it (a causal mask
  over the cache, `cache_update_index`), its `stateless_call` jitted by XLA with the cache donated,
  so XLA too may update it in place.

Both outputs are checked against the oracle's `reference_step` before timing. Calls are warmed up
and interleaved; medians are reported. Peak memory is measured in a fresh process per runtime: the
most resident memory that loading the layer, putting the cache in place and 32 steps add to a
process that has imported its libraries (Linux `VmHWM`), against the cache plus the weights.

    result = bench_decode(Spec.load("benchmarks/gpt2_decode_b1_s2048.toml"))
    result["speedup"], result["mhagen"]["per_token_ms"]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import MhagenError
from .spec import Spec

__all__ = ["bench_decode", "decode_table", "measure_decode_peak", "MEMORY_STEPS", "DECODE_NOTE"]

MEMORY_STEPS = 32
DECODE_NOTE = ("\nper token: median of interleaved steps of one new token per batch row at position S - 1 (the "
               "step reads the whole cache), divided by B; jax.jit: keras_hub's CachedMultiHeadAttention with "
               "the cache donated; both checked against the oracle first. Peak MB: what loading the bundle, a "
               "zeroed cache and 32 steps add to a fresh process (no JAX), against the cache plus the weights.\n")


def _filled_cache(spec: Spec, seed: int) -> np.ndarray:
    """A cache as after a prompt of S - 1 tokens: seeded unit-scale keys and values, zero at S - 1."""
    cache = np.random.default_rng(seed).standard_normal(spec.cache_shape).astype(np.float32)
    cache[:, :, -1] = 0
    return cache.astype(spec.call.dtype_policy.compute)


def _token(spec: Spec, seed: int) -> np.ndarray:
    g = spec.geometry
    x = np.random.default_rng(seed + 1).standard_normal((g.query_shape[0], 1, g.query_shape[-1]))
    return x.astype(np.float32).astype(spec.call.dtype_policy.compute)


def _mhagen_step(spec: Spec, weights: list[np.ndarray], cache: np.ndarray, token: np.ndarray, target: str,
                 *, layer: Any = None) -> tuple[Callable[[], np.ndarray], Any]:
    from .pipeline import build

    layer = layer or build(spec, target, weights, verify=False)
    device_cache = layer.decode(token, token, cache=cache, index=cache.shape[2] - 1)[1]
    index = cache.shape[2] - 1
    return (lambda: layer.decode(token, token, cache=device_cache, index=index)[0]), layer


def _keras_hub_step(spec: Spec, weights: list[np.ndarray], cache: np.ndarray, token: np.ndarray
                    ) -> Callable[[], np.ndarray]:
    """keras_hub's layer under jax.jit with the cache donated; raises MhagenError without keras_hub."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras_hub
    except ImportError:
        raise MhagenError("the decode benchmark's jax.jit peer is keras_hub's CachedMultiHeadAttention: "
                          "pip install keras-hub") from None
    import jax
    import jax.numpy as jnp

    layer_spec, g = spec.layer, spec.geometry
    layer = keras_hub.layers.CachedMultiHeadAttention(
        num_heads=layer_spec.num_heads, key_dim=layer_spec.key_dim, use_bias=layer_spec.use_bias,
        dtype=spec.call.dtype)
    layer.build(tuple(token.shape), tuple(token.shape))
    layer.set_weights(weights)
    S = spec.call.cache_max_length
    index = S - 1  # type: ignore[operator]
    mask = jnp.asarray(np.broadcast_to(np.arange(S)[None, None, :] <= index, (g.query_shape[0], 1, S)))
    variables = [v.value for v in layer.trainable_variables]

    def step(variables: Any, x: Any, cache: Any) -> Any:
        (y, new_cache), _ = layer.stateless_call(variables, [], x, x, attention_mask=mask, cache=cache,
                                                 cache_update_index=index)
        return y, new_cache

    jitted = jax.jit(step, donate_argnums=(2,))
    x = jnp.asarray(token)
    state = {"cache": jnp.asarray(cache)}

    def call() -> np.ndarray:
        y, state["cache"] = jitted(variables, x, state["cache"])
        return np.asarray(y)

    return call


def _check(name: str, spec: Spec, got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    from .verify import compare, tolerance

    result = compare(got, want, tol=tolerance(spec), name=f"{name} step")
    return {"max_abs": result.max_abs, "matches": result.passed,
            "message": "" if result.passed else result.message}


def bench_decode(spec: Spec, *, target: str = "cpu", repeats: int = 30, seed: int = 0,
                 memory: bool = True, jax_peer: bool = True) -> dict[str, Any]:
    """Time one decode step of mhagen and of keras_hub under jax.jit, interleaved; see the module doc."""
    from .oracle import reference_step
    from .weights import init_weights

    if not spec.is_decoder:
        raise MhagenError("the decode benchmark needs a decoder spec ([call] cache_max_length = S)")
    weights = init_weights(spec)
    cache = _filled_cache(spec, seed)
    token = _token(spec, seed)
    S = spec.call.cache_max_length
    want, _ = reference_step(spec, weights, cache, S - 1, token, token)  # type: ignore[operator]
    started = time.perf_counter()
    mh_call, layer = _mhagen_step(spec, weights, cache, token, target)
    build_s = time.perf_counter() - started
    calls: dict[str, Callable[[], np.ndarray]] = {"mhagen": mh_call}
    result: dict[str, Any] = {"spec": spec.to_dict(), "target": target, "cache_mb": _mb(cache.nbytes),
                              "weights_mb": _mb(sum(w.nbytes for w in weights)), "build_seconds": build_s,
                              "mhagen": _check("mhagen", spec, mh_call(), want)}
    if jax_peer:
        try:
            calls["jax"] = _keras_hub_step(spec, weights, cache, token)
            result["jax"] = _check("jax", spec, calls["jax"](), want)
        except MhagenError as exc:
            result["jax"] = {"skipped": str(exc)}
    for call in calls.values():          # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
    for name, ts in times.items():
        result[name].update(per_token_ms=statistics.median(ts) / spec.geometry.query_shape[0],
                            step_ms=statistics.median(ts), p90_ms=float(np.percentile(ts, 90)))
    if "step_ms" in result.get("jax", {}):
        result["speedup"] = result["jax"]["step_ms"] / result["mhagen"]["step_ms"]
    if memory:
        for name in calls:
            peak, note = measure_decode_peak(name, spec, target=target, seed=seed)
            result[name].update(peak_mb=peak, peak_note=note)
        peak = result["mhagen"].get("peak_mb")
        if peak is not None:
            result["mhagen"]["peak_over_cache_and_weights"] = peak / (result["cache_mb"] + result["weights_mb"])
    return result


def _mb(nbytes: int) -> float:
    return nbytes / 2**20


# ---- peak memory in a fresh process ------------------------------------------------------------
def _memory_child(impl: str, path: str, target: str, seed: int) -> dict[str, float]:
    """Runs in a fresh process with its libraries imported: the measured part loads the layer (for
    mhagen, the bundle at `path`, weights and module read from its files; for jax, keras_hub's layer
    from the spec at `path`), puts the cache in place and runs MEMORY_STEPS steps. Returns MiB."""
    import gc

    from .bench import _reset_peak, _status_mb

    if impl == "mhagen":
        from .runtime import load_bundle

        gc.collect()
        before = _status_mb("VmRSS")
        _reset_peak()
        layer = load_bundle(path, target)
        info = layer.interface["decoder"]
        B, _, S, _, _ = info["cache_shape"]
        d = layer.inputs[0].shape[-1]
        token = np.random.default_rng(seed).standard_normal((B, 1, d)).astype(np.float32)
        cache = layer.new_cache()
        for _ in range(MEMORY_STEPS):
            layer.decode(token, token, cache=cache, index=S - 1)
        device_peak = layer._device.hal.allocator.statistics.get("device_bytes_peak")
    else:
        import jax  # noqa: F401 - imported before the measured part
        import keras_hub  # noqa: F401

        from .weights import init_weights

        spec = Spec.load(path)
        weights = init_weights(spec)
        cache = _filled_cache(spec, seed)
        token = _token(spec, seed)
        gc.collect()
        before = _status_mb("VmRSS")
        _reset_peak()
        call = _keras_hub_step(spec, weights, cache, token)
        del cache
        for _ in range(MEMORY_STEPS):
            call()
        device_peak = None
    peak = _status_mb("VmHWM")
    return {"rss_before_mb": before, "hwm_mb": peak, "peak_mb": max(0.0, peak - before),
            "device_peak_mb": None if device_peak is None else device_peak / 2**20}


def measure_decode_peak(impl: str, spec: Spec, *, target: str = "cpu", seed: int = 0,
                        timeout: float = 900.0) -> tuple[float | None, str]:
    """(peak MiB that loading `impl`, its cache and MEMORY_STEPS steps add, note), measured in a fresh
    subprocess; mhagen's layer is loaded from a bundle (weights in its parameter archive)."""
    from .bundle import build_bundle
    from .targets import get_target

    with tempfile.TemporaryDirectory(prefix="mhagen-bench-") as tmp:
        path = Path(tmp) / "spec.toml"
        path.write_text(spec.to_toml())
        if impl == "mhagen":
            path = Path(tmp) / "bundle"
            build_bundle(spec, [get_target(target)], path, verify=False)
        cmd = [sys.executable, "-m", "mhagen.bench_decode", "--memory-child", impl, str(path), target, str(seed)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed: {tail[:200]}"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    note = "" if data.get("device_peak_mb") is None else f"IREE device allocations peak {data['device_peak_mb']:.1f} MiB"
    return data["peak_mb"], note


def decode_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per decoder spec."""
    lines = ["| spec | B | S | mhagen ms/token | jax.jit (keras_hub) ms/token | speedup | mhagen peak MB | "
             "cache + weights MB |", "|---|---|---|---|---|---|---|---|"]
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in results:
        spec = Spec.from_dict(r["spec"])
        lines.append(
            f"| {r.get('name', '')} | {spec.geometry.query_shape[0]} | {spec.call.cache_max_length} | "
            f"{fmt(r['mhagen'].get('per_token_ms'), '.3f')} | {fmt(r.get('jax', {}).get('per_token_ms'), '.3f')} | "
            f"{fmt(r.get('speedup'), '.2f')}x | {fmt(r['mhagen'].get('peak_mb'), '.0f')} | "
            f"{r['cache_mb'] + r['weights_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        raise SystemExit("usage: python -m mhagen.bench_decode --memory-child IMPL SPEC TARGET SEED")
