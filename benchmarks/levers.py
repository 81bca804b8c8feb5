"""Levers behind the CPU defaults, measured as ratios of calls interleaved in one process (the
machines here are shared, so only ratios within one run count).

    python3 benchmarks/levers.py drivers [SPEC...]      # one module on local-task and local-sync
    taskset -c 0 python3 benchmarks/levers.py drivers   # the same on one core
    python3 benchmarks/levers.py bf16 [SPEC...]         # mixed_bfloat16 against OpenVINO bf16 and f32

`drivers` loads the same compiled module on IREE's `local-task` driver (a worker per core, the
task system between dispatches) and `local-sync` (dispatches inline on the calling thread).
`bf16` builds the spec under `mixed_bfloat16` (bfloat16 compute, float32 weights) and times it
against the float32 module and OpenVINO's plain graph at bf16 and f32; each output's error against
the float64 oracle is printed.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SPECS = ["bert_base_b1_t128", "bert_base_b1_t512", "bert_base_b8_t128", "cross_attention_t128_s1024",
                 "long_context_t4096_causal"]


def interleave(calls: dict[str, Callable[[], Any]], budget_s: float = 8.0, most: int = 40) -> dict[str, float]:
    """Median ms of each call, run in alternating order after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    first = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    n = int(max(5, min(most, budget_s / max(sum(first.values()), 1e-6))))
    order = list(calls)
    for i in range(n):
        for name in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _module_call(layer: Any, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
    fn, arrays, _ = layer.prepare(**inputs)
    args = [layer._device.to_device(np.ascontiguousarray(a)) for a in arrays]
    function = layer._table[fn["name"]]
    return lambda: function(*args)


def drivers(names: list[str]) -> None:
    import os

    from mhagen import Spec, build, init_weights
    from mhagen.runtime import CompiledLayer
    from mhagen.verify import random_inputs

    print(f"cores this process may use: {len(os.sched_getaffinity(0))}")
    print("| spec | GFLOP | local-task ms | local-sync ms | local-task / local-sync |")
    print("|---|---|---|---|---|")
    for name in names:
        spec = Spec.load(HERE / f"{name}.toml")
        layer = build(spec, target="cpu", weights=init_weights(spec), verify=False)
        target = {**layer.target.to_dict(), "driver": "local-sync"}
        sync = CompiledLayer(layer.interface, layer.vmfb, target, spec=spec)
        inputs = random_inputs(spec, 0)
        ms = interleave({"task": _module_call(layer, inputs), "sync": _module_call(sync, inputs)})
        print(f"| {name} | {spec.flops / 1e9:.2f} | {ms['task']:.1f} | {ms['sync']:.1f} | "
              f"{ms['task'] / ms['sync']:.2f} |", flush=True)


def bf16(names: list[str]) -> None:
    import os

    from mhagen import Spec, build, init_weights, reference
    from mhagen.peers import make_peer
    from mhagen.verify import random_inputs

    threads = len(os.sched_getaffinity(0))
    print(f"cores this process may use: {threads}")
    print("| spec | mhagen f32 ms | mhagen mixed_bfloat16 ms | OpenVINO f32 ms | OpenVINO bf16 ms "
          "| max err vs oracle: mhagen bf16, OpenVINO bf16 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        spec = Spec.load(HERE / f"{name}.toml")
        d = spec.to_dict()
        d["call"]["dtype"] = "mixed_bfloat16"
        spec16 = Spec.from_dict(d)
        weights = init_weights(spec)
        inputs = random_inputs(spec, 0)
        f32 = build(spec, target="cpu", weights=weights, verify=False)
        b16 = build(spec16, target="cpu", weights=weights, verify=False)
        ov32 = make_peer("openvino", spec, weights, inputs, threads=threads)
        ov16 = make_peer("openvino_bf16", spec, weights, inputs, threads=threads)
        calls = {"f32": _module_call(f32, inputs), "b16": _module_call(b16, inputs), "ov32": ov32.call,
                 "ov16": ov16.call}
        errors = ""
        if spec.geometry.query_shape[1] <= 1024:
            want = reference(spec, weights, **inputs)
            got16 = np.asarray(b16(**inputs), dtype=np.float64)
            errors = (f"{np.abs(got16 - want).max():.1e}, "
                      f"{np.abs(ov16.to_host(ov16.call()) - want).max():.1e}")
        ms = interleave(calls)
        print(f"| {name} | {ms['f32']:.1f} | {ms['b16']:.1f} | {ms['ov32']:.1f} | {ms['ov16']:.1f} | {errors} |",
              flush=True)


if __name__ == "__main__":
    what, specs = sys.argv[1], sys.argv[2:] or DEFAULT_SPECS
    {"drivers": drivers, "bf16": bf16}[what](specs)
