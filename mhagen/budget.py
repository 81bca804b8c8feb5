"""Budgets before work: the memory a build and a verify will hold, against this machine's memory.

Checked from the spec alone, before any weight is drawn or any program traced:

    check(spec, weights_mode="parameters", verify=True)    # raises SpecError with the figures

A build holds the weights (with inline weights, IREE's compiler holds them many times over as MLIR
constants). A verify also holds seeded inputs, the compiled module's outputs and the NumPy oracle's
float64 work, whose largest part is usually the scores (B, N, T, S). A build that cannot fit is
refused; a verify that cannot fit is refused with the way out: build with `--no-verify` (no input
is made then, so a bundle for a bigger deployment machine can still be built here) or verify the
spec at a smaller size. The trace budget (`trace.check_trace_budget`: buckets and unrolled steps)
is checked first, so that a spec too long to trace says so rather than asking for memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecError
from .spec import Spec
from .trace import WeightsMode

__all__ = ["Footprint", "footprint", "machine_memory", "check", "format_bytes"]

# Peak memory of a build per byte of weights, measured with `build_bundle(verify=False)` (RSS of
# mhagen and of iree-compile, JAX's and IREE's own ~230 MiB subtracted): weights in a parameter
# archive 2.0x (256 MiB of weights in four arrays: +510 MiB); inline weights 28x in iree-compile (16, 32 and 64 MiB
# of weights: 23x, 27x, 28x) while mhagen holds them and their MLIR text, 4x more.
PARAMETERS_FACTOR = 2
INLINE_FACTOR = 32
# JAX, IREE and NumPy themselves: 230-280 MiB measured for the smallest specs.
BASELINE_BYTES = 256 << 20
# The oracle's float64 work per element, measured with tracemalloc around `expected_outputs` and
# `check_outputs` (1-2 GB specs): 5.1-5.2 live copies of the scores (scores, the masked scores,
# their exponentials, the probabilities), 1x the inputs and 2x the outputs in float64, 1.2-1.4x the
# projections (q, k, v in float64 and moved to heads-first); the model below is 0-17 % above.
_ORACLE_SCORES, _ORACLE_INPUTS, _ORACLE_OUTPUTS, _ORACLE_PROJECTIONS = 5.5, 1.0, 2.0, 1.5
# Comparing one output: 5 float64 temporaries of its size (|err|, rel, the excess, ...), measured 5.0.
_COMPARE_COPIES = 6
# Keras' path in the compiled module holds its scores (in the compute dtype) a few times over.
_RUNTIME_SCORES_COPIES = 3
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4}


@dataclass(frozen=True)
class Footprint:
    """Bytes a build and a verify of one spec hold at their peak (estimates, see the constants)."""

    weights: int        # the weights in their variable dtype
    build: int          # peak of a build: weights, their float64 draw, IREE's copies
    inputs: int         # seeded inputs in the compute dtype (mask as int32)
    outputs: int        # the compiled module's outputs
    oracle: int         # the oracle's float64 work, scores included
    scores_shape: tuple[int, ...]
    verify: int         # peak of a verify: weights, inputs, outputs, the oracle's answer and work


def format_bytes(n: float) -> str:
    """1.5 GiB, 512.0 MiB, 3.2 TiB."""
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n / (1 << 20):.1f} MiB"


def machine_memory() -> int:
    """Bytes this machine can give a new process now: MemAvailable from /proc/meminfo, else all of
    its physical memory (os.sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 1 << 62  # unknown: refuse nothing


def footprint(spec: Spec, *, weights_mode: str | WeightsMode = "parameters") -> Footprint:
    """The memory `spec` needs to build with `weights_mode` and to verify, from its shapes alone.

    A dynamic spec's verify figures are those of its larger size: the declared shape or
    (max_batch, max_seq), whichever needs more (verify may check the largest bucket)."""
    mode = WeightsMode.parse(weights_mode)
    g, policy = spec.geometry, spec.call.dtype_policy
    weight_counts = [math.prod(s) for _, s in g.weight_shapes(use_bias=spec.layer.use_bias,
                                                               use_gate=spec.layer.use_gate)]
    weights = sum(weight_counts) * _ITEMSIZE[policy.variable]
    factor = INLINE_FACTOR if mode is WeightsMode.INLINE else PARAMETERS_FACTOR
    # Each weight is drawn in float64 and cast (16 bytes an element, one weight at a time), then the
    # weights are copied into the parameter archive or the program.
    build = BASELINE_BYTES + max(factor * weights, weights + 16 * max(weight_counts))
    sizes = [spec]
    if spec.call.dynamic:
        seq = spec.call.max_seq if "seq" in spec.call.dynamic else None
        sizes.append(spec.at_size(spec.call.max_batch if "batch" in spec.call.dynamic else None, seq, seq))
    inputs, outputs, oracle, verify, scores_shape = max(
        (_verify_bytes(s, weights, sum(weight_counts)) for s in sizes), key=lambda v: v[3])
    if spec.is_decoder:
        # The decode check holds the cache on the device and, in float64, the oracle's cache, its
        # copy and heads-first views, and compare()'s temporaries of the cache read back.
        cache = math.prod(spec.cache_shape)
        decode = BASELINE_BYTES + weights + cache * _ITEMSIZE[policy.compute] + 8 * cache * (4 + _COMPARE_COPIES)
        if decode > verify:
            oracle, verify = max(oracle, 8 * cache * 4), decode
    return Footprint(weights=weights, build=build, inputs=inputs, outputs=outputs, oracle=oracle,
                     scores_shape=scores_shape, verify=verify)


def _verify_bytes(spec: Spec, weights: int, weight_count: int) -> tuple[int, int, int, int, tuple[int, ...]]:
    """(inputs, outputs, oracle, verify, scores shape) of one static size of `spec`."""
    from .trace import input_signature, output_signature

    g = spec.geometry
    ins = [(math.prod(t.shape), _ITEMSIZE[t.dtype]) for t in input_signature(spec)]
    outs = [math.prod(t.shape) for t in output_signature(spec)]
    compute = _ITEMSIZE[spec.call.dtype_policy.compute]
    inputs = sum(n * size for n, size in ins)
    outputs = sum(outs) * compute
    scores = math.prod(g.scores_shape)
    projections = (math.prod(g.query_shape[:-1]) * g.num_heads * g.key_dim
                   + math.prod(g.value_shape[:-1]) * g.num_heads * (g.key_dim + g.value_dim))
    work = (_ORACLE_SCORES * scores + _ORACLE_INPUTS * sum(n for n, _ in ins) + _ORACLE_OUTPUTS * sum(outs)
            + _ORACLE_PROJECTIONS * projections + weight_count)
    if spec.has_dropout:  # JAX's uint32 bits, the boolean keep-mask, the dropped probabilities: ~13 B a score
        work += 1.6 * scores
    oracle = int(8 * work)
    runtime = inputs + outputs + (_RUNTIME_SCORES_COPIES * scores * compute if _keras_path(spec) else 0)
    compare = 8 * _COMPARE_COPIES * max(outs) + runtime
    verify = BASELINE_BYTES + weights + inputs + outputs + 8 * sum(outs) + max(oracle, compare)
    return inputs, outputs, oracle, verify, g.scores_shape


def _keras_path(spec: Spec) -> bool:
    from .blocked import AttentionPath, choose_path

    return choose_path(spec) is AttentionPath.KERAS


def check(spec: Spec, *, weights_mode: str | WeightsMode = "parameters", verify: bool = True,
          available: int | None = None) -> Footprint:
    """Refuse, before any work, what cannot be traced in reasonable time or does not fit in memory.

    `available` defaults to `machine_memory()`. With `verify=False` only the build must fit: inputs
    and the oracle are never made then.

        check(spec, verify=False)      # building for a bigger machine: only the weights must fit here
    """
    from .trace import check_trace_budget

    check_trace_budget(spec)
    mode = WeightsMode.parse(weights_mode)
    fp = footprint(spec, weights_mode=mode)
    have = machine_memory() if available is None else available
    if fp.build > have:
        inline = f", {INLINE_FACTOR}x that while IREE compiles them inline" if mode is WeightsMode.INLINE else ""
        way_out = "build on a machine with more memory"
        if mode is WeightsMode.INLINE and footprint(spec, weights_mode=WeightsMode.PARAMETERS).build <= have:
            way_out = "keep the weights out of the module (weights_mode='parameters'), or " + way_out
        raise SpecError(f"Building this spec needs about {format_bytes(fp.build)} of memory (weights "
                        f"{format_bytes(fp.weights)}{inline}), but this machine has "
                        f"{format_bytes(have)} available; {way_out}")
    if verify and fp.verify > have:
        raise SpecError(f"Verifying this spec needs about {format_bytes(fp.verify)} of memory (the "
                        f"oracle's float64 work {format_bytes(fp.oracle)}, scores {fp.scores_shape}; "
                        f"inputs {format_bytes(fp.inputs)}, outputs {format_bytes(fp.outputs)}"
                        f"{f', KV cache {spec.cache_shape}' if spec.is_decoder else ''}), but "
                        f"this machine has {format_bytes(have)} available; build without verifying "
                        "(`mhagen build --no-verify`) or verify the spec at a smaller batch or sequence")
    return fp
