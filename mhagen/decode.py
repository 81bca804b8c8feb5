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

__all__ = ["Step", "step_sizes", "step_inputs", "step_outputs", "output_args", "step_function", "decoder_interface",
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
    """One step entry point: `t` new tokens (a chunk of up to t when t > 1), reading `length` keys;
    `kind` "self" (the tokens' keys and values are written into the cache first) or "cross" (the
    cache holds an encoder's projected keys and values and is only read), or "fill" (the cross
    cache made from the encoder's output)."""

    t: int
    length: int
    kind: str = "self"

    @property
    def name(self) -> str:
        if self.kind == "fill":
            return "cross_cache"
        return f"{'step' if self.kind == 'self' else 'cross'}_t{self.t}_l{self.length}"


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
    if spec.decoder_kind == "cross":
        return [Step(S, S, "fill")] + [Step(t, S, "cross") for t in sizes]
    return [Step(t, length) for t in sizes for length in _lengths(S) if length >= t]


def step_inputs(spec: Spec, step: Step) -> list[TensorSig]:
    """A step's runtime inputs, in order: the new tokens, [mask], index, [count], cache."""
    g, dt = spec.geometry, spec.call.dtype_policy.compute
    B, t = g.query_shape[0], step.t
    if step.kind == "fill":         # the encoder's output, (B, S, D)
        sig = [TensorSig("value", g.value_shape, dt)]
        return sig + ([TensorSig("key", g.key_shape, dt)] if spec.has_key else [])
    if step.kind == "cross":
        sig = [TensorSig("query", (B, t, g.query_shape[-1]), dt)]
        if spec.has_mask:
            sig.append(TensorSig("attention_mask", (B, t, spec.call.cache_max_length), MASK_DTYPE))  # type: ignore[arg-type]
        return sig + [TensorSig("cache", spec.cache_shape, dt)]
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
    if step.kind == "fill":
        return [TensorSig("cache", spec.cache_shape, dt)]
    out = [TensorSig("output", (g.query_shape[0], step.t) + g.output_dims, dt)]
    return out if step.kind == "cross" else out + [TensorSig("cache", spec.cache_shape, dt)]


def output_args(spec: Spec, step: Step) -> tuple[tuple[int, int], ...]:
    """(argument, result) pairs whose argument is the result's storage: a self step's cache."""
    return ((len(step_inputs(spec, step)) - 1, 1),) if step.kind == "self" else ()


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
        "kind": spec.decoder_kind,
        "steps": [{"name": s.name, "t": s.t, "length": s.length, "kind": s.kind,
                   "inputs": [x.to_dict() for x in step_inputs(spec, s)],
                   "outputs": [x.to_dict() for x in step_outputs(spec, s)]} for s in steps],
    }


def step_function(spec: Spec, step: Step) -> Callable[..., Any]:
    """One step as a JAX function `f(*inputs, *weights) -> outputs` (see `step_inputs`/`step_outputs`)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    layer, g = spec.layer, spec.geometry
    compute = jnp.dtype(spec.call.dtype_policy.compute)
    qkv_eq = _projection_equation(2, 1, 2)
    out_eq = _projection_equation(2, 2, len(g.output_dims))
    names = weight_names(spec)
    n_inputs = len(step_inputs(spec, step))
    B, N, H = g.query_shape[0], g.num_heads, g.key_dim
    t, L = step.t, step.length
    window = layer.sliding_window

    def fn(*args: Any) -> Any:
        inputs, ws = args[:n_inputs], args[n_inputs:]
        w = {n: a.astype(compute) for n, a in zip(names, ws)}
        it = iter(inputs)

        def dense(x: Any, name: str, eq: str) -> Any:
            y = jnp.einsum(eq, x, w[f"{name}/kernel"])
            return y + w[f"{name}/bias"] if layer.use_bias else y

        if step.kind == "fill":
            value = next(it)
            key = next(it) if spec.has_key else value
            return jnp.stack([dense(key, "key", qkv_eq), dense(value, "value", qkv_eq)], axis=1)
        query = next(it)
        if step.kind == "self":
            value = next(it)
            key = next(it) if spec.has_key else value
        mask = next(it) if spec.has_mask else None
        if step.kind == "self":
            index = next(it)
            count = next(it) if t > 1 else None
        cache = next(it)

        q = dense(query, "query", qkv_eq) * jnp.asarray(1.0 / math.sqrt(float(H)), compute)
        allowed = jnp.ones((B, t, L), bool)
        if step.kind == "self":
            zero = jnp.zeros((), jnp.int32)
            new = jnp.stack([dense(key, "key", qkv_eq), dense(value, "value", qkv_eq)], axis=1)  # (B, 2, t, N, H)
            start = (zero, zero, index, zero, zero)
            if count is not None:          # rows past `count` keep what the cache holds there
                old = lax.dynamic_slice(cache, start, (B, 2, t, N, H))
                keep = (jnp.arange(t, dtype=jnp.int32) < count)[None, None, :, None, None]
                new = jnp.where(keep, new, old)
            cache = lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)
            position = index + jnp.arange(t, dtype=jnp.int32)                   # (t,)
            col = jnp.arange(L, dtype=jnp.int32)
            band = col[None, :] <= position[:, None]                             # (t, L)
            if window is not None:
                band = band & (col[None, :] > position[:, None] - window)
            allowed = allowed & band
        if mask is not None:
            allowed = allowed & (mask[:, :, :L] != 0)
        values = cache[:, 1, :L]
        if step.kind == "self":
            # Positions past the last token written are never read, as the oracle reads them: a
            # NaN there (a cache from elsewhere, or a chunk's padded rows) must not become 0 * NaN.
            seen = index + (t if count is None else count)
            live = jnp.arange(L, dtype=jnp.int32) < seen
            values = jnp.where(live[None, :, None, None], values, jnp.zeros((), values.dtype))
        context = _attend(q, cache[:, 0, :L], values, allowed, compute)
        if layer.use_gate:
            # As in `trace.forward`: keep the gate out of the dispatch that sums the denominators
            # (IREE 3.13's SPIR-V code reads them there across invocations without a barrier:
            # reports/iree-spirv-reduction-transpose-race; a 3-token gated step was off by 1.3).
            context = lax.optimization_barrier(context)
            context = context * jax.nn.sigmoid(dense(query, "gate", qkv_eq))
        out = dense(context, "attention_output", out_eq)
        return out if step.kind == "cross" else (out, cache)

    return fn


def _attend(q: Any, keys: Any, values: Any, allowed: Any, compute: Any) -> Any:
    """Attention of q (B, t, N, H) over keys and values (B, L, N, H) where `allowed` (B, t, L): the
    context (B, t, N, H). Each block of KEY_BLOCK keys takes its softmax on its own (max,
    unnormalised context, denominator), then the blocks are combined (flash-decoding): Keras'
    masked softmax up to rounding (masked scores replaced, masked probabilities zero, a row with
    every key masked gets a zero context)."""
    import jax.numpy as jnp

    B, t, N, H = q.shape
    L = keys.shape[1]
    bk = L if L < 2 * KEY_BLOCK else KEY_BLOCK
    nb = L // bk if L % bk == 0 else 1
    bk = L // nb
    keys = keys.reshape(B, nb, bk, N, H)
    values = values.reshape(B, nb, bk, N, H)
    fill = jnp.asarray(-3e4 if compute == jnp.float16 else -1e9, compute)
    zero = jnp.zeros((), compute)
    if t == 1:
        # One token: products summed over H, reading the cache in its own layout. As einsums,
        # IREE moved every key and value block to heads-first (two copies of the L positions
        # read) before its matmuls: GPT-2's layer (12 x 64) at S = 2048 took 3.70 ms a step that
        # way and 2.11 ms this way (B = 8: 90.9 against 50.2 ms; S = 8192: 18.9 against 11.4 ms;
        # interleaved in one process, 2-core AVX-512 host, cpu target).
        ok = allowed.reshape(B, nb, bk, 1)
        scores = jnp.where(ok, jnp.sum(q[:, 0][:, None, None] * keys, axis=-1), fill)  # (B, nb, bk, N)
        block_max = jnp.max(scores, axis=2)                                       # (B, nb, N)
        p = jnp.where(ok, jnp.exp(scores - block_max[:, :, None]), zero)
        block_sum = jnp.sum(p, axis=2)
        block_ctx = jnp.sum(p[..., None] * values, axis=2)                        # (B, nb, N, H)
        scale = jnp.exp(block_max - jnp.max(block_max, axis=1, keepdims=True))
        denom = jnp.sum(scale * block_sum, axis=1)[:, None, :, None]              # (B, 1, N, 1)
        ctx = jnp.sum(scale[..., None] * block_ctx, axis=1)[:, None]              # (B, 1, N, H)
        return _normalized(ctx, denom, zero)
    ok = allowed.reshape(B, 1, t, nb, bk)
    scores = jnp.where(ok, jnp.einsum("btnh,bcsnh->bntcs", q, keys), fill)   # (B, N, t, nb, bk)
    block_max = jnp.max(scores, axis=-1)                                      # (B, N, t, nb)
    p = jnp.where(ok, jnp.exp(scores - block_max[..., None]), zero)
    block_sum = jnp.sum(p, axis=-1)
    block_ctx = jnp.einsum("bntcs,bcsnh->bntch", p, values)                   # (B, N, t, nb, H)
    scale = jnp.exp(block_max - jnp.max(block_max, axis=-1, keepdims=True))
    denom = jnp.sum(scale * block_sum, axis=-1)[..., None]                    # (B, N, t, 1)
    ctx = jnp.sum(scale[..., None] * block_ctx, axis=-2)                      # (B, N, t, H)
    # Normalised before the transpose: dividing by the denominators read transposed is the
    # pattern IREE 3.13's SPIR-V code races on (reports/iree-spirv-reduction-transpose-race;
    # a 4-token step was off by 2.4 on lavapipe that way).
    return jnp.transpose(_normalized(ctx, denom, zero), (0, 2, 1, 3))     # (B, t, N, H)


def _normalized(ctx: Any, denom: Any, zero: Any) -> Any:
    """ctx / denom, with a zero context where every key was masked (denominator 0). `== 0`, not
    `> 0`: a NaN denominator must reach the output, not become a zero context."""
    import jax.numpy as jnp

    empty = denom == 0
    return jnp.where(empty, zero, ctx / jnp.where(empty, 1, denom))
