"""Stage 3, the trace: spec + weights -> a JAX function written as Keras writes the layer -> StableHLO.

The traced function's inputs come in a fixed order (see `input_signature`): query, value, [key],
[attention_mask], [dropout_key], then the weights when they are arguments rather than constants.

    program = trace(spec, weights)              # Program with .text (StableHLO) and .inputs
"""

from __future__ import annotations

import enum
import math
import string
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import SpecError, invalid
from .spec import Spec
from .weights import normalize_weights, weight_names

__all__ = ["Program", "TensorSig", "WeightsMode", "input_signature", "output_signature", "trace",
           "check_trace_budget", "MAX_BUCKETS"]

# The most shape buckets one dynamic program holds. Each costs IREE about 4 s to compile on 2 cores
# (max_batch 64 x max_seq 512: 49 buckets traced in 4.3 s, compiled in 189 s).
MAX_BUCKETS = 64


class WeightsMode(enum.Enum):
    """Where the weights live in the compiled program."""

    INLINE = "inline"          # constants in the program (fastest; recompile for new weights)
    PARAMETERS = "parameters"  # util.globals loaded from a parameter archive at run time

    @classmethod
    def parse(cls, value: object) -> "WeightsMode":
        for member in cls:
            if value == member.value or value is member:
                return member
        raise SpecError(f"Received an invalid value for argument `weights`, expected one of "
                        f"{[m.value for m in cls]}. Received: weights={value!r}")


@dataclass(frozen=True)
class TensorSig:
    """One tensor of the call signature: name, shape (B, T, E) and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Program:
    """A traced program: MLIR text (StableHLO plus generated glue) and its call interface."""

    text: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    weights: tuple[TensorSig, ...]
    weights_mode: WeightsMode
    interface: dict[str, Any]


# The mask travels as int32 (nonzero = attend). 8-bit inputs (i1, i8, u8) broadcast wrongly on the
# baseline Vulkan target under lavapipe when the mask's size is a multiple of 4: a (2, 8, 8) mask
# broadcast over heads gave |err| 3.9, the same mask as int32 gives 0.
MASK_DTYPE = "int32"


def input_signature(spec: Spec) -> list[TensorSig]:
    """The runtime inputs of the compiled function, in order (weights excluded)."""
    g, dt = spec.geometry, spec.call.dtype_policy.compute
    sig = [TensorSig("query", g.query_shape, dt), TensorSig("value", g.value_shape, dt)]
    if spec.has_key:
        sig.append(TensorSig("key", g.key_shape, dt))
    if g.mask_shape is not None:
        sig.append(TensorSig("attention_mask", g.mask_shape, MASK_DTYPE))
    if spec.has_dropout:
        sig.append(TensorSig("dropout_key", (2,), "uint32"))
    return sig


def output_signature(spec: Spec) -> list[TensorSig]:
    g, dt = spec.geometry, spec.call.dtype_policy.compute
    out = [TensorSig("output", g.output_shape, dt)]
    if spec.call.return_attention_scores:
        out.append(TensorSig("scores", g.scores_shape, dt))
    return out


def _letters(n: int, offset: int = 0) -> str:
    return string.ascii_lowercase[offset: offset + n]


def _projection_equation(free: int, bound: int, out: int) -> str:
    """Keras' `_build_proj_equation`: input `free+bound`, kernel `bound+out`, output `free+out`."""
    f, b, o = _letters(free), _letters(bound, free), _letters(out, free + bound)
    return f"{f}{b},{b}{o}->{f}{o}"


def _attention_equations(proj_rank: int, axes: tuple[int, ...]) -> tuple[str, str]:
    """Keras' `_build_attention_equation` over the projected rank: (dot product, combine)."""
    target = _letters(proj_rank)
    batch = [i for i in range(proj_rank) if i not in axes and i != proj_rank - 1]
    source, offset = "", proj_rank
    for i in range(proj_rank):
        if i in batch or i == proj_rank - 1:
            source += target[i]
        else:
            source += _letters(1, offset)
            offset += 1
    product = "".join(target[i] for i in batch) + "".join(target[i] for i in axes) + "".join(
        source[i] for i in axes)
    return f"{source},{target}->{product}", f"{product},{source}->{target}"


def forward(
    spec: Spec,
    *,
    attention: str = "auto",
    block: tuple[int, int] | None = None,
) -> Callable[..., Any]:
    """The layer as a JAX function `f(*inputs, *weights)` in Keras' own formulation.

    `attention` picks the attention core (`mhagen.blocked.AttentionPath`): `keras` materialises the
    (T, S) scores as Keras does; `blocked` walks (query, key) blocks of sizes `block` with an online
    softmax and never holds the scores; `auto` (the default) takes `blocked` wherever it computes the
    same result (3-D inputs, no scores returned, no dropout), which is faster on CPU.
    """
    import jax
    import jax.numpy as jnp

    from .blocked import AttentionPath, ProjectedRows, choose_path

    layer, g = spec.layer, spec.geometry
    policy = spec.call.dtype_policy
    compute = jnp.dtype(policy.compute)
    r = g.rank
    proj_rank = r + 1
    qkv_eq = _projection_equation(r - 1, 1, 2)
    out_eq = _projection_equation(r - 1, 2, len(g.output_dims))
    dot_eq, combine_eq = _attention_equations(proj_rank, g.attention_axes)
    names = weight_names(spec)
    n_inputs = len(input_signature(spec))
    k = len(g.attention_axes)
    large_negative = -3e4 if compute == jnp.float16 else -1e9
    blocked = choose_path(spec, attention) is AttentionPath.BLOCKED

    def fn(*args: Any) -> Any:
        inputs, ws = args[:n_inputs], args[n_inputs:]
        w = {n: a.astype(compute) for n, a in zip(names, ws)}
        it = iter(inputs)
        query, value = next(it), next(it)
        key = next(it) if spec.has_key else value
        mask = next(it) if g.mask_shape is not None else None
        dropout_key = next(it) if spec.has_dropout else None

        def dense(x: Any, name: str, eq: str) -> Any:
            y = jnp.einsum(eq, x, w[f"{name}/kernel"])
            return y + w[f"{name}/bias"] if layer.use_bias else y

        def project_query(rows: Any) -> Any:
            return dense(rows, "query", qkv_eq) * jnp.asarray(1.0 / math.sqrt(float(layer.key_dim)),
                                                              compute)

        probs = None
        if blocked:
            # Queries, keys and values are projected block by block where first used: the call
            # never holds all of Q, and K and V are not sliced into copies (at T = 8192, causal,
            # IREE's transient memory 98 -> 66 MiB).
            queries = ProjectedRows(query, project_query)
            keys = ProjectedRows(key, lambda rows: dense(rows, "key", qkv_eq))
            values = ProjectedRows(value, lambda rows: dense(rows, "value", qkv_eq))
            context = _blocked_context(spec, queries, keys, values, mask, large_negative, block)
        else:
            q = project_query(query)
            kk = dense(key, "key", qkv_eq)
            v = dense(value, "value", qkv_eq)
            scores = jnp.einsum(dot_eq, kk, q)
            allowed = None
            if mask is not None:
                m = mask != 0
                while m.ndim < scores.ndim:
                    m = jnp.expand_dims(m, -2 * k - 1)
                allowed = m
            if spec.call.use_causal_mask or layer.sliding_window is not None:
                t, s = g.query_shape[1], g.value_shape[1]
                rows = jnp.cumsum(jnp.ones((t, s), jnp.int32), axis=0)
                cols = jnp.cumsum(jnp.ones((t, s), jnp.int32), axis=1)
                band = jnp.ones((t, s), bool)
                if spec.call.use_causal_mask:
                    band = band & (rows >= cols)
                if layer.sliding_window is not None:
                    band = band & (jnp.abs(rows - cols) < layer.sliding_window)
                allowed = band if allowed is None else jnp.logical_and(allowed, band)
            softmax_axes = tuple(range(-k, 0))
            if allowed is not None and layer.masking == "keras2":
                # tf.keras 2.x adds (1 - mask) * large_negative (float16.min) and never zeroes.
                fill = jnp.asarray(-65504.0 if compute == jnp.float16 else -1e9, compute)
                scores = scores + jnp.where(allowed, jnp.zeros((), compute), fill)
                probs = jax.nn.softmax(scores, axis=softmax_axes)
            elif allowed is not None:
                # Keras' Softmax replaces masked scores (a NaN there is dropped, not added to) and
                # then replaces masked probabilities by 0 (not `* mask`: 0 * NaN is NaN).
                zero = jnp.zeros((), compute)
                scores = jnp.where(allowed, scores, jnp.asarray(large_negative, compute))
                probs = jnp.where(allowed, jax.nn.softmax(scores, axis=softmax_axes), zero)
            else:
                probs = jax.nn.softmax(scores, axis=softmax_axes)
            used = probs
            if dropout_key is not None:
                keep = jax.random.bernoulli(dropout_key, 1.0 - layer.dropout, probs.shape)
                used = jax.lax.select(keep, probs / jnp.asarray(1.0 - layer.dropout, compute),
                                      jnp.zeros_like(probs))
            context = jnp.einsum(combine_eq, used, v)
        if layer.use_gate:
            # Keep the gate out of the dispatch that sums the softmax denominators (blocked path)
            # or the context (Keras' path): IREE 3.13's SPIR-V code reads them there, transposed,
            # across invocations without a barrier (reports/iree-spirv-reduction-transpose-race; on
            # Keras' path `mhagen fuzz --seed 7` found it with 5-D inputs and three attention axes,
            # |err| 1.2 on lavapipe).
            context = jax.lax.optimization_barrier(context)
            context = context * jax.nn.sigmoid(dense(query, "gate", qkv_eq))
        out = dense(context, "attention_output", out_eq)
        if spec.call.return_attention_scores:
            return out, probs
        return out

    return fn


def _blocked_context(spec: Spec, q: Any, kk: Any, v: Any, mask: Any, large_negative: float,
                     block: tuple[int, int] | None) -> Any:
    """The blocked core (`mhagen.blocked`) on 3-D inputs: context (B, T, N, Hv), no (T, S) scores."""
    import jax.numpy as jnp

    from .blocked import attention

    allowed = None
    if mask is not None:
        allowed = mask != 0
        while allowed.ndim < 4:                 # Keras' expansion: (B, T, S) -> (B, 1, T, S)
            allowed = jnp.expand_dims(allowed, -3)
    return attention(q, kk, v, mask=allowed, causal=spec.call.use_causal_mask,
                     sliding_window=spec.layer.sliding_window, large_negative=large_negative,
                     block=block)


def _jax_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return jnp.dtype(name)


def _ladder(top: int, start: int) -> list[int]:
    """Bucket sizes: powers of two from `start` below `top`, then `top` itself."""
    out, size = [], start
    while size < top:
        out.append(size)
        size *= 2
    return out + [top]


def buckets(spec: Spec) -> list[tuple[int | None, int | None]]:
    """(batch, seq) sizes compiled for a dynamic spec; [(None, None)] for a static one."""
    dyn = spec.call.dynamic
    if not dyn:
        return [(None, None)]
    batches = _ladder(spec.call.max_batch, 1) if "batch" in dyn else [None]  # type: ignore[arg-type]
    seqs = _ladder(spec.call.max_seq, min(8, spec.call.max_seq)) if "seq" in dyn else [None]  # type: ignore[arg-type]
    return [(b, s) for b in batches for s in seqs]


def check_trace_budget(spec: Spec) -> None:
    """Refuse, before any tracing, a program too large to trace and compile in reasonable time: more
    than MAX_BUCKETS shape buckets, or more than `blocked.STEP_BUDGET` unrolled blocked steps in all."""
    from .blocked import STEP_BUDGET, AttentionPath, choose_path, static_steps

    sizes = buckets(spec)
    if len(sizes) > MAX_BUCKETS:
        arg = "max_seq" if "seq" in spec.call.dynamic else "max_batch"
        raise invalid(arg, f"maxima that need at most {MAX_BUCKETS} shape buckets (one per power of two "
                      f"of each dynamic dim; this spec needs {len(sizes)})", getattr(spec.call, arg))
    itemsize = 4 if spec.call.dtype_policy.compute == "float32" else 2
    total, exact = 0, True
    for batch, seq in sizes:
        bspec = bucket_spec(spec, batch, seq)
        if choose_path(bspec) is not AttentionPath.BLOCKED:
            continue
        g = bspec.geometry
        steps, counted = static_steps(g.query_shape[0], g.query_shape[1], g.value_shape[1], g.num_heads,
                                      itemsize, causal=spec.call.use_causal_mask,
                                      window=spec.layer.sliding_window, limit=STEP_BUDGET)
        total, exact = total + steps, exact and counted
    if total > STEP_BUDGET:
        arg, value = ("max_seq", spec.call.max_seq) if "seq" in spec.call.dynamic else (
            "query", list(spec.call.query))
        raise invalid(arg, f"sizes the blocked attention path unrolls in at most {STEP_BUDGET} static "
                      f"steps (tracing and compiling take many minutes past that); this spec needs "
                      f"{'' if exact else 'at least '}{total}", value)


def bucket_spec(spec: Spec, batch: int | None, seq: int | None) -> Spec:
    """The static spec one bucket compiles: batch and/or seq set, keys maskable when seq is padded."""
    if batch is None and seq is None:
        return spec
    return spec.at_size(batch, seq, seq, attention_mask=spec.has_mask or seq is not None)


def interface(spec: Spec, functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The call description the runtime (and a bundle's manifest) works from: no JAX, no Spec."""
    g = spec.geometry
    mask_fn = any(s["name"] == "attention_mask" for f in functions for s in f["inputs"])
    return {
        "inputs": [t.to_dict() for t in input_signature(spec)],
        "outputs": [t.to_dict() for t in output_signature(spec)],
        "functions": functions,
        "dynamic": list(spec.call.dynamic),
        "max_batch": spec.call.max_batch,
        "max_seq": spec.call.max_seq,
        "mask": {"shape": list(g.mask_shape if g.mask_shape is not None else g.full_mask_shape),
                 "scores_rank": len(g.scores_shape), "num_axes": len(g.attention_axes)} if mask_fn else None,
        "dropout": {"seed": spec.layer.seed or 0, "rate": spec.layer.dropout} if spec.has_dropout else None,
        "compute_dtype": spec.call.dtype_policy.compute,
    }


def _export(fn: Callable[..., Any], avals: list[Any]) -> str:
    import jax
    from jax import export

    from .program import strip_locations

    # keep_unused: every entry takes every weight (a cross step reads none of the key and value ones)
    exported = export.export(jax.jit(fn, keep_unused=True), platforms=["cpu"])(*avals)
    return strip_locations(exported.mlir_module())


def trace(
    spec: Spec,
    weights: Any = None,
    *,
    weights_mode: WeightsMode | str = WeightsMode.INLINE,
) -> Program:
    """Trace `spec` with JAX into the program IREE compiles.

    `weights` as for `normalize_weights` (None: `init_weights(spec)`). A static spec with `inline`
    weights is one JAX export with the weights as constants. Otherwise each shape bucket is exported
    with the weights as arguments and `mhagen.program.assemble` adds entry points that read them from
    globals: parameter-archive entries (`parameters`) or dense constants (`inline`).
    """
    import jax

    from .program import Entry, assemble, mlir_type

    mode = WeightsMode.parse(weights_mode)
    check_trace_budget(spec)
    ws = normalize_weights(spec, weights)
    names = weight_names(spec)
    weight_sigs = tuple(TensorSig(n, tuple(a.shape), str(a.dtype)) for n, a in zip(names, ws))
    functions: list[dict[str, Any]] = []
    entries = []
    for batch, seq in buckets(spec):
        bspec = bucket_spec(spec, batch, seq)
        fn = forward(bspec)
        inputs = input_signature(bspec)
        outputs = output_signature(bspec)
        avals = [jax.ShapeDtypeStruct(t.shape, _jax_dtype(t.dtype)) for t in inputs]
        name = "main" if batch is None and seq is None else f"main_b{batch or 'x'}_s{seq or 'x'}"
        functions.append({"name": name, "batch": batch, "seq": seq,
                          "inputs": [t.to_dict() for t in inputs],
                          "outputs": [t.to_dict() for t in outputs]})
        if mode is WeightsMode.INLINE and not spec.call.dynamic and not spec.is_decoder:
            consts = [np.asarray(a) for a in ws]
            text = _export(lambda *xs: fn(*xs, *consts), avals)
            return Program(text=text, inputs=tuple(input_signature(spec)),
                           outputs=tuple(output_signature(spec)), weights=weight_sigs,
                           weights_mode=mode, interface=interface(spec, functions))
        avals += [jax.ShapeDtypeStruct(t.shape, _jax_dtype(t.dtype)) for t in weight_sigs]
        entries.append(Entry(name, _export(fn, avals),
                             tuple(mlir_type(t.shape, t.dtype) for t in inputs),
                             tuple(mlir_type(t.shape, t.dtype) for t in outputs)))
    iface = interface(spec, functions)
    if spec.is_decoder:
        from .decode import decoder_interface, output_args, step_function, step_inputs, step_outputs, step_sizes

        for step in step_sizes(spec):
            inputs, outputs = step_inputs(spec, step), step_outputs(spec, step)
            avals = [jax.ShapeDtypeStruct(t.shape, _jax_dtype(t.dtype)) for t in (*inputs, *weight_sigs)]
            entries.append(Entry(step.name, _export(step_function(spec, step), avals),
                                 tuple(mlir_type(t.shape, t.dtype) for t in inputs),
                                 tuple(mlir_type(t.shape, t.dtype) for t in outputs),
                                 output_args=output_args(spec, step)))
        iface["decoder"] = decoder_interface(spec)
    text = assemble(entries, list(zip(names, ws)), parameters=mode is WeightsMode.PARAMETERS,
                    description=f"{len(entries)} entry point(s), weights {mode.value}")
    return Program(text=text, inputs=tuple(input_signature(spec)), outputs=tuple(output_signature(spec)),
                   weights=weight_sigs, weights_mode=mode, interface=iface)
