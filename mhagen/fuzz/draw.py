"""Drawing fuzz cases: random specs over the space `mhagen.Spec` accepts, and random inputs.

Everything comes from a seeded `numpy.random.Generator`, so a seed gives the same specs in the same
order. Sizes stay small (one case compiles in seconds); what varies is the structure: ranks 3-5,
attention axes, heads and dims, value_dim, output_shape, bias, gate, masks (declared or explicit
broadcasting shapes), causal, sliding window, keras2 masking, dtypes, dynamic buckets, returned
scores, training with dropout, initializers.

    rng = np.random.default_rng(7)
    spec = draw_spec(rng, dtypes=("float32", "float16"))
    inputs = draw_inputs(spec, seed=3, weights=init_weights(spec))   # masked rows, large magnitudes
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..spec import DType, Spec
from ..trace import input_signature

__all__ = ["draw_spec", "draw_inputs", "fuzz_dtypes", "LARGE_SCORES"]

# "Large magnitudes": the query is scaled so that the largest |score| reaches about this, past the
# point where exp overflows in the compute dtype (88.7 in float32, 11.1 in float16) so that an
# implementation that forgets to subtract the row max returns inf. bfloat16 has float32's range but
# 8 bits of mantissa: its scores stay where its tolerance (5e-2) still holds.
LARGE_SCORES = {"float32": 100.0, "float16": 16.0, "bfloat16": 8.0}
# Share of cases drawn with large query magnitudes, and of (flattened) query rows fully masked.
P_LARGE = 0.25
P_MASKED_ROW = 0.25


def fuzz_dtypes(targets: Sequence[Any]) -> tuple[str, ...]:
    """Every call dtype some of `targets` computes in (float32 first): a case in a dtype a target
    lacks is a documented refusal for that target, not a failure."""
    computes = {d for t in targets for d in t.dtypes}
    return tuple(d.value for d in DType if d.compute in computes)


def _pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, float) / sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _initializer(rng: np.random.Generator, kind: str) -> Any:
    """A kernel or bias initializer: mostly Keras' default; biases often non-zero so they matter."""
    if kind == "kernel":
        return _pick(rng, ["glorot_uniform", "he_normal", "lecun_uniform", "orthogonal",
                           {"class_name": "random_normal", "config": {"stddev": 0.3}}],
                     [6, 1, 1, 1, 1])
    return _pick(rng, ["zeros", {"class_name": "random_normal", "config": {"stddev": 0.5}},
                       {"class_name": "random_uniform", "config": {"minval": -1.0, "maxval": 1.0}}],
                 [2, 2, 1])


def draw_spec(rng: np.random.Generator, dtypes: Sequence[str] = ("float32",)) -> Spec:
    """One random valid spec (a `SpecError` here is a bug of this generator, never a case).

    Shapes: batch 1-3; rank 3 with sequences 1-12 (sometimes 24-128 keys, half of those a multiple
    of 32: softmax rows longer than a GPU subgroup); ranks 4 and 5 with inner axes of 1-4;
    features 1-16; 1-4 heads of 1-8.
    """
    rank = _pick(rng, [3, 4, 5], [5, 2, 1])
    batch = int(rng.integers(1, 4))
    inner = rank - 2
    if rank == 3 and _chance(rng, 0.15):
        # Rows longer than a GPU subgroup: IREE's reductions change tiling at multiples of 32
        # (a 64-key softmax on 8-lane subgroups summed a quarter of each row; 33 and 40 keys did not).
        q_inner = [int(rng.integers(1, 33))]
        v_inner = [int(_pick(rng, [32, 64, 96, 128])) if _chance(rng, 0.5) else int(rng.integers(24, 129))]
    elif rank == 3:
        q_inner = [int(rng.integers(1, 13))]
        v_inner = [int(rng.integers(1, 13))]
    else:
        q_inner = [int(rng.integers(1, 5)) for _ in range(inner)]
        v_inner = [int(rng.integers(1, 5)) for _ in range(inner)]
    # Attention axes: Keras' default (every inner axis), or a subset, sometimes spelled negatively.
    axes: tuple[int, ...] | None = None
    if rank > 3 and _chance(rng, 0.7):
        count = int(rng.integers(1, inner + 1))
        chosen = sorted(int(a) for a in rng.choice(np.arange(1, rank - 1), size=count, replace=False))
        axes = tuple(a - rank if _chance(rng, 0.3) else a for a in chosen)   # -(rank-1)..-2 = 1..rank-2
    elif rank == 3 and _chance(rng, 0.15):
        axes = (_pick(rng, [1, -2]),)
    attended = tuple(range(1, rank - 1)) if axes is None else tuple(a % rank for a in axes)
    for a in range(1, rank - 1):          # axes not attended over are batch-like: value follows query
        if a not in attended:
            v_inner[a - 1] = q_inner[a - 1]
    eq, ev = int(rng.integers(1, 17)), int(rng.integers(1, 17))
    query = [batch, *q_inner, eq]
    value = [batch, *v_inner, ev]
    key = [batch, *v_inner, int(rng.integers(1, 17))] if _chance(rng, 0.3) else None

    layer: dict[str, Any] = {"num_heads": int(rng.integers(1, 5)), "key_dim": int(rng.integers(1, 9)),
                             "seed": int(rng.integers(0, 1000))}
    if _chance(rng, 0.3):
        layer["value_dim"] = int(rng.integers(1, 9))
    if _chance(rng, 0.25):
        layer["output_shape"] = (int(rng.integers(1, 9)) if _chance(rng, 0.5)
                                 else [int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 3)))])
    if axes is not None:
        layer["attention_axes"] = list(axes)
    layer["use_bias"] = _chance(rng, 0.8)
    layer["use_gate"] = _chance(rng, 0.3)
    layer["kernel_initializer"] = _initializer(rng, "kernel")
    layer["bias_initializer"] = _initializer(rng, "bias")
    along_axis_1 = attended == (1,)
    call: dict[str, Any] = {"query": query, "value": value, "key": key}
    if along_axis_1 and _chance(rng, 0.25):
        layer["sliding_window"] = int(rng.integers(1, q_inner[0] + 2))
    if along_axis_1 and _chance(rng, 0.3):
        call["use_causal_mask"] = True
    call["dtype"] = _pick(rng, list(dtypes), [6 if d == "float32" else 1 for d in dtypes])
    call["return_attention_scores"] = _chance(rng, 0.25)

    dynamic: list[str] = []
    if _chance(rng, 0.2):
        dynamic.append("batch")
        call["max_batch"] = batch + int(rng.integers(0, 3))
    if along_axis_1 and _chance(rng, 0.15):
        dynamic.append("seq")
        call["max_seq"] = max(q_inner[0], v_inner[0]) + int(rng.integers(0, 6))
    call["dynamic"] = dynamic
    if not dynamic and _chance(rng, 0.1):
        layer["dropout"] = _pick(rng, [0.1, 0.5])
        call["training"] = True

    probe = Spec.from_dict({"layer": layer, "call": {k: v for k, v in call.items() if v is not None}})
    call["attention_mask"] = _draw_mask(rng, probe) if _chance(rng, 0.5) else False
    if _chance(rng, 0.1) and not ("seq" in dynamic and call["attention_mask"] is not False):
        layer["masking"] = "keras2"       # tf.keras 2.x: a fully masked row averages the values
    return Spec.from_dict({"layer": layer, "call": {k: v for k, v in call.items() if v is not None}})


def _draw_mask(rng: np.random.Generator, spec: Spec) -> bool | list[int]:
    """`true` (the full (B, *T, *S) mask), or an explicit shape that broadcasts to the scores:
    the mask without heads or the scores' own shape (B, N, *T, *S), some axes set to 1."""
    g = spec.geometry
    if spec.call.dynamic or _chance(rng, 0.5):
        return True
    shape = list(g.full_mask_shape if _chance(rng, 0.6) else g.scores_shape)
    for i in range(len(shape)):
        if _chance(rng, 0.3):
            shape[i] = 1
    return shape


def draw_inputs(spec: Spec, seed: int, weights: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs for one call of `spec` (its declared shapes), from `seed`.

    query/value/key are normal(0, 1); in a quarter of the cases the query is scaled so that the
    largest |score| reaches `LARGE_SCORES[compute dtype]`. The mask (int32-castable bool) attends
    at a random density (50-100 %) and fully masks about a quarter of the query rows. The dropout
    key is `[layer seed, seed]`, as `verify.random_inputs` makes it.
    """
    rng = np.random.default_rng(seed)
    large = _chance(rng, P_LARGE)
    density = float(_pick(rng, [0.5, 0.8, 1.0]))
    compute = spec.call.dtype_policy.compute
    out: dict[str, np.ndarray] = {}
    for sig in input_signature(spec):
        if sig.name == "attention_mask":
            out[sig.name] = _mask(rng, spec, sig.shape, density)
        elif sig.name == "dropout_key":
            out[sig.name] = np.array([spec.layer.seed or 0, seed % (1 << 32)], dtype=np.uint32)
        else:
            out[sig.name] = rng.standard_normal(sig.shape).astype(np.float32)
    if large:
        scale = _large_scale(spec, weights, out, LARGE_SCORES[compute])
        out["query"] = (out["query"] * scale).astype(np.float32)
    if compute != "float32":
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16) if compute == "bfloat16" else np.dtype(compute)
        for name in ("query", "value", "key"):
            if name in out:
                out[name] = out[name].astype(dt)
    return out


def _mask(rng: np.random.Generator, spec: Spec, shape: tuple[int, ...], density: float) -> np.ndarray:
    """A boolean mask of `shape` with some query rows fully masked (every key of the row False)."""
    mask = rng.random(shape) < density
    keys = math.prod(shape[-len(spec.geometry.attention_axes):])     # the trailing key axes
    rows = mask.reshape(-1, keys)
    rows[rng.random(rows.shape[0]) < P_MASKED_ROW] = False
    return rows.reshape(shape)


def _large_scale(spec: Spec, weights: Sequence[np.ndarray], inputs: dict[str, np.ndarray],
                 target: float) -> float:
    """The factor on the query that brings the scores' largest magnitude to about `target`
    (measured on these inputs over every pair of positions, the query's kernel alone: its bias does
    not scale with the query)."""
    from ..weights import weight_names

    w = dict(zip(weight_names(spec), (np.asarray(a, np.float64) for a in weights)))
    n, h = spec.layer.num_heads, spec.layer.key_dim
    q = np.tensordot(np.asarray(inputs["query"], np.float64), w["query/kernel"], axes=([-1], [0]))
    k = np.tensordot(np.asarray(inputs.get("key", inputs["value"]), np.float64), w["key/kernel"],
                     axes=([-1], [0]))
    if spec.layer.use_bias:
        k = k + w["key/bias"]
    scores = np.einsum("inh,jnh->nij", q.reshape(-1, n, h), k.reshape(-1, n, h)) / math.sqrt(h)
    largest = float(np.abs(scores).max())
    # Capped: a layer whose scores are all near 0 (zero kernels) would need inputs past float16.
    return min(target / largest, 1000.0) if largest > 0 else 1.0
