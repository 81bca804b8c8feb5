"""The decoder's steps: a key/value cache extended on the device, one chunk of new tokens at a time.

A decoder build (`[call] cache_max_length = S`) adds entry points that take t new tokens, project
their keys and values, write them into the cache `(B, 2, S, N, H)` (keras_hub's layout: keys, then
values, after the dense projections and their biases) at positions `index .. index+t-1`, and attend
causally to positions `0 .. index+j` for the token j (with an optional `(B, t, S)` padding mask).

The cache argument is also the storage of the returned cache (IREE's `iree.abi.output`), so a step
writes t rows into the caller's device buffer in place and never copies the cache. A step reads
only the first L positions of the cache, L the smallest of a ladder of lengths that holds
`index + t` (one entry point per L), with the keys split into blocks whose partial softmaxes are
combined at the end (flash-decoding): memory O(L), and keys far past the index are not read.

Each step size t has its own entry: 1, and T (the spec's `query` length), which also takes fewer
tokens (`count`, the rows past it neither written nor used). Prefill is steps from index 0 over a
zeroed cache; any number of new tokens is a sequence of steps, which is exact since token j
attends only to positions up to its own.

    steps = step_sizes(spec)                 # [Step(t=1, length=16), ..., Step(t=8, length=64)]
    fn = step_function(spec, steps[0])       # JAX: (query, value, ..., index, cache, *weights)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .spec import Spec
from .trace import MASK_DTYPE, TensorSig, _projection_equation
from .weights import weight_names

__all__ = ["Step", "step_sizes", "step_inputs", "step_outputs", "step_function", "decoder_interface",
           "KEY_BLOCK", "MIN_LENGTH", "MAX_LENGTHS"]

# Keys per block of the split softmax. At S = 8192 a step reads 32 blocks in parallel and combines
# them; below 2 * KEY_BLOCK positions one block covers the cache.
KEY_BLOCK = 256
# The ladder of cache lengths a step may read: powers of two from max(MIN_LENGTH, S / 2**(MAX_LENGTHS-1))
# up to S. Each length is one entry point per step size to compile.
MIN_LENGTH = 16
MAX_LENGTHS = 6


@dataclass(frozen=True)
class Step:
    """One step entry point: `t` new tokens (a chunk of up to t when t > 1), reading `length` keys."""

    t: int
    length: int

    @property
    def name(self) -> str:
        return f"step_t{self.t}_l{self.length}"


def _lengths(S: int) -> list[int]:
    start = max(MIN_LENGTH, S >> (MAX_LENGTHS - 1))
    out, size = [], 1
    while size < start:
        size *= 2
    while size < S:
        out.append(size)
        size *= 2
    return out + [S]


def step_sizes(spec: Spec) -> list[Step]:
    """Every step entry point of a decoder spec, by step size then cache length read."""
    S, T = spec.call.cache_max_length, spec.geometry.query_shape[1]
    assert S is not None, "not a decoder spec"
    sizes = sorted({1, T})
    return [Step(t, length) for t in sizes for length in _lengths(S) if length >= t]


def step_inputs(spec: Spec, step: Step) -> list[TensorSig]:
    """A step's runtime inputs, in order: the new tokens, [mask], index, [count], cache."""
    g, dt = spec.geometry, spec.call.dtype_policy.compute
    B, t = g.query_shape[0], step.t
    sig = [TensorSig("query", (B, t, g.query_shape[-1]), dt), TensorSig("value", (B, t, g.value_shape[-1]), dt)]
    if spec.has_key:
        sig.append(TensorSig("key", (B, t, g.key_shape[-1]), dt))
    if spec.has_mask:
        sig.append(TensorSig("attention_mask", (B, t, spec.call.cache_max_length), MASK_DTYPE))  # type: ignore[arg-type]
    sig.append(TensorSig("index", (), "int32"))
    if step.t > 1:
        sig.append(TensorSig("count", (), "int32"))
    sig.append(TensorSig("cache", spec.cache_shape, dt))
    return sig


def step_outputs(spec: Spec, step: Step) -> list[TensorSig]:
    g, dt = spec.geometry, spec.call.dtype_policy.compute
    return [TensorSig("output", (g.query_shape[0], step.t) + g.output_dims, dt),
            TensorSig("cache", spec.cache_shape, dt)]


def decoder_interface(spec: Spec) -> dict[str, Any]:
    """What the runtime (and a bundle's manifest) needs to drive the steps: no JAX, no Spec."""
    steps = step_sizes(spec)
    return {
        "cache_shape": list(spec.cache_shape),
        "cache_layout": "(B, 2, S, N, H): keys then values, projected (keras_hub CachedMultiHeadAttention)",
        "dtype": spec.call.dtype_policy.compute,
        "chunk": spec.geometry.query_shape[1],
        "mask": spec.has_mask,
        "key": spec.has_key,
        "steps": [{"name": s.name, "t": s.t, "length": s.length,
                   "inputs": [x.to_dict() for x in step_inputs(spec, s)],
                   "outputs": [x.to_dict() for x in step_outputs(spec, s)]} for s in steps],
    }


def step_function(spec: Spec, step: Step) -> Callable[..., Any]:
    """One step as a JAX function `f(*inputs, *weights) -> (output, cache)` (see `step_inputs`)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    layer, g = spec.layer, spec.geometry
    compute = jnp.dtype(spec.call.dtype_policy.compute)
    qkv_eq = _projection_equation(2, 1, 2)
    out_eq = _projection_equation(2, 2, len(g.output_dims))
    names = weight_names(spec)
    n_inputs = len(step_inputs(spec, step))
    large_negative = -3e4 if compute == jnp.float16 else -1e9
    B, N, H = g.query_shape[0], g.num_heads, g.key_dim
    t, L = step.t, step.length
    window = layer.sliding_window
    bk = L if L < 2 * KEY_BLOCK else KEY_BLOCK
    nb = L // bk if L % bk == 0 else 1
    bk = L // nb

    def fn(*args: Any) -> Any:
        inputs, ws = args[:n_inputs], args[n_inputs:]
        w = {n: a.astype(compute) for n, a in zip(names, ws)}
        it = iter(inputs)
        query, value = next(it), next(it)
        key = next(it) if spec.has_key else value
        mask = next(it) if spec.has_mask else None
        index = next(it)
        count = next(it) if t > 1 else None
        cache = next(it)

        def dense(x: Any, name: str, eq: str) -> Any:
            y = jnp.einsum(eq, x, w[f"{name}/kernel"])
            return y + w[f"{name}/bias"] if layer.use_bias else y

        zero = jnp.zeros((), jnp.int32)
        q = dense(query, "query", qkv_eq) * jnp.asarray(1.0 / math.sqrt(float(H)), compute)
        new = jnp.stack([dense(key, "key", qkv_eq), dense(value, "value", qkv_eq)], axis=1)  # (B, 2, t, N, H)
        start = (zero, zero, index, zero, zero)
        if count is not None:          # rows past `count` keep what the cache holds there
            old = lax.dynamic_slice(cache, start, (B, 2, t, N, H))
            keep = (jnp.arange(t, dtype=jnp.int32) < count)[None, None, :, None, None]
            new = jnp.where(keep, new, old)
        cache = lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)

        keys = cache[:, 0, :L].reshape(B, nb, bk, N, H)
        values = cache[:, 1, :L].reshape(B, nb, bk, N, H)
        position = index + jnp.arange(t, dtype=jnp.int32)                       # (t,)
        col = jnp.arange(L, dtype=jnp.int32)
        allowed = col[None, :] <= position[:, None]                              # (t, L)
        if window is not None:
            allowed = allowed & (col[None, :] > position[:, None] - window)
        allowed = jnp.broadcast_to(allowed, (B, t, L))
        if mask is not None:
            allowed = allowed & (mask[:, :, :L] != 0)
        allowed = allowed.reshape(B, 1, t, nb, bk)

        # Each key block's softmax on its own (max, unnormalised context, denominator), then the
        # blocks combined: Keras' masked softmax up to rounding (masked scores replaced, masked
        # probabilities zero, a row with every key masked gets a zero context).
        fill = jnp.asarray(large_negative, compute)
        if t == 1:
            # One token: products summed over H, reading the cache in its own layout. As einsums,
            # IREE moved every key and value block to heads-first (two copies of the L positions
            # read) before its matmuls: GPT-2's layer (12 x 64) at S = 2048 took 3.70 ms a step that
            # way and 2.11 ms this way (B = 8: 90.9 against 50.2 ms; S = 8192: 18.9 against 11.4 ms;
            # interleaved in one process, 2-core AVX-512 host, cpu target).
            ok = allowed.reshape(B, nb, bk, 1)
            scores = jnp.sum(q[:, 0][:, None, None] * keys, axis=-1)             # (B, nb, bk, N)
            scores = jnp.where(ok, scores, fill)
            block_max = jnp.max(scores, axis=2)                                   # (B, nb, N)
            p = jnp.where(ok, jnp.exp(scores - block_max[:, :, None]), jnp.zeros((), compute))
            block_sum = jnp.sum(p, axis=2)
            block_ctx = jnp.sum(p[..., None] * values, axis=2)                    # (B, nb, N, H)
            row_max = jnp.max(block_max, axis=1, keepdims=True)
            scale = jnp.exp(block_max - row_max)
            denom = jnp.sum(scale * block_sum, axis=1)[:, None, :, None]          # (B, 1, N, 1)
            ctx = jnp.sum(scale[..., None] * block_ctx, axis=1)[:, None]          # (B, 1, N, H)
            empty = denom == 0
            context = jnp.where(empty, jnp.zeros((), compute), ctx / jnp.where(empty, 1, denom))
        else:
            scores = jnp.einsum("btnh,bcsnh->bntcs", q, keys)                    # (B, N, t, nb, bk)
            scores = jnp.where(allowed, scores, fill)
            block_max = jnp.max(scores, axis=-1)                                 # (B, N, t, nb)
            p = jnp.where(allowed, jnp.exp(scores - block_max[..., None]), jnp.zeros((), compute))
            block_sum = jnp.sum(p, axis=-1)
            block_ctx = jnp.einsum("bntcs,bcsnh->bntch", p, values)              # (B, N, t, nb, H)
            row_max = jnp.max(block_max, axis=-1, keepdims=True)
            scale = jnp.exp(block_max - row_max)
            denom = jnp.sum(scale * block_sum, axis=-1)                          # (B, N, t)
            ctx = jnp.sum(scale[..., None] * block_ctx, axis=-2)                 # (B, N, t, H)
            # `== 0`, not `> 0`: a NaN denominator must reach the output, not become a zero context.
            empty = (denom == 0)[..., None]
            ctx = jnp.where(empty, jnp.zeros((), compute), ctx / jnp.where(empty, 1, denom[..., None]))
            context = jnp.transpose(ctx, (0, 2, 1, 3))                           # (B, t, N, H)
        if layer.use_gate:
            # As in `trace.forward`: keep the gate out of the dispatch that sums the denominators
            # (IREE 3.13's SPIR-V code reads them there across invocations without a barrier:
            # reports/iree-spirv-reduction-transpose-race; a 3-token gated step was off by 1.3).
            context = lax.optimization_barrier(context)
            context = context * jax.nn.sigmoid(dense(query, "gate", qkv_eq))
        return dense(context, "attention_output", out_eq), cache

    return fn
