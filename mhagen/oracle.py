"""The NumPy oracle: an independent float64 implementation of Keras 3's MultiHeadAttention.

It must not import JAX and shares no code with the tracer: where the tracer writes Keras' einsum
equations, the oracle moves axes with transposes and multiplies with `matmul` / `tensordot`.
It reads only the spec's layer arguments and the arrays themselves.

    out = reference(spec, weights, query, value)            # (B, T, E), float64
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import CallError
from .spec import Spec

__all__ = ["reference", "reference_step", "reference_cache"]


def _names(use_bias: bool, use_gate: bool) -> list[str]:
    groups = ["query", "key"] + (["gate"] if use_gate else []) + ["value", "attention_output"]
    return [f"{g}/{p}" for g in groups for p in (("kernel", "bias") if use_bias else ("kernel",))]


def _float64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _large_negative(compute_dtype: str) -> float:
    """Keras' `_large_negative_number`: the fill of masked scores before the softmax."""
    return -3e4 if compute_dtype == "float16" else -1e9


def _masked_softmax(scores: np.ndarray, allowed: np.ndarray, masking: str, compute: str) -> np.ndarray:
    """Keras' Softmax over the last axis with a boolean mask of the same shape."""
    # Keras' Softmax: masked scores are *replaced* by a large negative number (so a NaN score
    # there is gone), the row max is taken over what is left (a NaN anywhere unmasked makes
    # the whole row NaN), and masked probabilities are then *replaced* by 0 (a fully masked row,
    # uniform after the fill, becomes 0; a NaN row keeps 0 at its masked places).
    if masking == "keras2":
        # tf.keras 2.x: (1 - mask) * large_negative *added* (float16.min in float16), no zeroing,
        # so a fully masked row is softmax of nearly equal scores: about the mean of the values.
        # The sum is rounded in the compute dtype, as tf.keras computes it: in float32 the -1e9
        # swallows the score (its ulp is 64), so a fully masked row is uniform, not softmax(scores).
        if compute == "bfloat16":
            import ml_dtypes

            cdt = np.dtype(ml_dtypes.bfloat16)
        else:
            cdt = np.dtype(compute)
        fill = cdt.type(-65504.0 if compute == "float16" else -1e9)
        with np.errstate(over="ignore"):
            masked = (scores.astype(cdt) + fill).astype(np.float64)
        filled = np.where(allowed, scores, masked)
        with np.errstate(invalid="ignore", over="ignore"):
            e = np.exp(filled - filled.max(axis=-1, keepdims=True))
            probs = e / e.sum(axis=-1, keepdims=True)
    else:
        filled = np.where(allowed, scores, _large_negative(compute))
        with np.errstate(invalid="ignore", over="ignore"):
            e = np.exp(filled - filled.max(axis=-1, keepdims=True))
            probs = np.where(allowed, e / e.sum(axis=-1, keepdims=True), 0.0)

    return probs


def reference(
    spec: Spec,
    weights: Sequence[Any] | Mapping[str, Any],
    query: Any,
    value: Any,
    key: Any = None,
    attention_mask: Any = None,
    *,
    dropout_keep: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Keras MHA forward in float64. Returns the output, or (output, scores) when the spec asks.

    `dropout_keep` is the boolean keep-mask over the scores (B, N, T, S) used when the spec trains
    with dropout; without it, no dropout is applied.
    """
    layer, call = spec.layer, spec.call
    names = _names(layer.use_bias, layer.use_gate)
    if isinstance(weights, Mapping):
        w = {n: _float64(weights[n]) for n in names}
    else:
        w = dict(zip(names, (_float64(a) for a in weights)))
    q, v = _float64(query), _float64(value)
    k = v if key is None else _float64(key)
    r = q.ndim
    axes = list(range(1, r - 1)) if layer.attention_axes is None else [
        a if a >= 0 else r + a for a in layer.attention_axes]
    batch = [a for a in range(r - 1) if a not in axes]

    def project(x: np.ndarray, name: str) -> np.ndarray:  # (..., D) -> (..., N, H)
        out = np.tensordot(x, w[f"{name}/kernel"], axes=([-1], [0]))
        return out + w[f"{name}/bias"] if layer.use_bias else out

    # Projected layout (..., N, H) has heads at r-1 and features at r; bring it to
    # (*batch, N, *attended, H) and flatten the attended axes into one.
    perm = batch + [r - 1] + axes + [r]

    def heads_first(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        moved = x.transpose(perm)
        lead = moved.shape[: len(batch) + 1]
        attended = moved.shape[len(batch) + 1: -1]
        return moved.reshape(lead + (int(np.prod(attended)), moved.shape[-1])), attended

    qh, t_dims = heads_first(project(q, "query") / np.sqrt(layer.key_dim))
    kh, s_dims = heads_first(project(k, "key"))
    vh, _ = heads_first(project(v, "value"))
    scores = qh @ np.swapaxes(kh, -1, -2)                      # (*batch, N, Lq, Lk)
    lead = scores.shape[:-2]
    full = lead + t_dims + s_dims                              # Keras' scores layout

    allowed = np.ones(full, dtype=bool)
    if attention_mask is not None:
        m = np.asarray(attention_mask) != 0
        insert_at = -2 * len(axes) - 1
        while m.ndim < len(full):
            m = np.expand_dims(m, m.ndim + 1 + insert_at)
        try:
            allowed &= np.broadcast_to(m, full)
        except ValueError:
            raise CallError(f"attention_mask of shape {np.shape(attention_mask)} does not broadcast "
                            f"to the scores {full}") from None
    if call.use_causal_mask or layer.sliding_window is not None:
        # Single attention axis (the spec enforces it): rows index queries, columns keys.
        i = np.arange(full[-2])[:, None]
        j = np.arange(full[-1])[None, :]
        band = np.ones((full[-2], full[-1]), dtype=bool)
        if call.use_causal_mask:
            band &= i >= j
        if layer.sliding_window is not None:
            band &= np.abs(i - j) < layer.sliding_window
        allowed &= band
    allowed = allowed.reshape(scores.shape)

    probs = _masked_softmax(scores, allowed, layer.masking, call.dtype_policy.compute)

    used = probs
    if dropout_keep is not None and layer.dropout > 0:
        keep = np.asarray(dropout_keep, dtype=bool).reshape(probs.shape)
        used = np.where(keep, probs / (1.0 - layer.dropout), 0.0)

    context = used @ vh                                        # (*batch, N, Lq, Hv)
    context = context.reshape(lead + t_dims + (context.shape[-1],)).transpose(np.argsort(perm))
    if layer.use_gate:
        context = context * (1.0 / (1.0 + np.exp(-project(q, "gate"))))
    out = np.tensordot(context, w["attention_output/kernel"], axes=([-2, -1], [0, 1]))
    if layer.use_bias:
        out = out + w["attention_output/bias"]
    if call.return_attention_scores:
        return out, probs.reshape(full)
    return out


def _weights64(spec: Spec, weights: Sequence[Any] | Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = _names(spec.layer.use_bias, spec.layer.use_gate)
    return ({n: _float64(weights[n]) for n in names} if isinstance(weights, Mapping)
            else dict(zip(names, (_float64(a) for a in weights))))


def _project(spec: Spec, w: Mapping[str, np.ndarray], x: np.ndarray, name: str) -> np.ndarray:
    """(B, t, D) -> (B, t, N, H)."""
    out = np.tensordot(x, w[f"{name}/kernel"], axes=([-1], [0]))
    return out + w[f"{name}/bias"] if spec.layer.use_bias else out


def reference_cache(spec: Spec, weights: Sequence[Any] | Mapping[str, Any], value: Any, key: Any = None
                    ) -> np.ndarray:
    """A cross-attention cache in float64: the encoder output's projected keys, then values,
    `(B, 2, S, N, H)`, as keras_hub's TransformerDecoder caches them."""
    w = _weights64(spec, weights)
    v = _float64(value)
    k = v if key is None else _float64(key)
    return np.stack([_project(spec, w, k, "key"), _project(spec, w, v, "value")], axis=1)


def reference_step(
    spec: Spec,
    weights: Sequence[Any] | Mapping[str, Any],
    cache: Any,
    index: int | None,
    query: Any,
    value: Any = None,
    key: Any = None,
    attention_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One decoder step in float64, as keras_hub's CachedMultiHeadAttention computes it: the t new
    tokens' projected keys and values are written into `cache` (B, 2, S, N, H) at `index`, and
    token j attends to cache positions 0 .. index + j (and those its `(B, t, S)` mask allows).
    With `index=None` (a static cross-attention cache) nothing is written and every position the
    mask allows is attended to. Returns (output (B, t, E), the new cache); `cache` is not changed.
    """
    layer = spec.layer
    w = _weights64(spec, weights)
    q = _float64(query)
    cache = _float64(cache).copy()
    t, S = q.shape[1], cache.shape[2]
    if index is not None:
        v = _float64(value)
        k = v if key is None else _float64(key)
        if index < 0 or index + t > S:
            raise CallError(f"a step of {t} token(s) at index {index} does not fit the cache length {S}")
        cache[:, 0, index:index + t] = _project(spec, w, k, "key")
        cache[:, 1, index:index + t] = _project(spec, w, v, "value")
    qh = (_project(spec, w, q, "query") / np.sqrt(layer.key_dim)).transpose(0, 2, 1, 3)  # (B, N, t, H)
    kh = cache[:, 0].transpose(0, 2, 1, 3)                                        # (B, N, S, H)
    vh = cache[:, 1].transpose(0, 2, 1, 3)
    scores = qh @ np.swapaxes(kh, -1, -2)                                         # (B, N, t, S)
    allowed = np.ones(scores.shape, dtype=bool)
    seen = S
    if index is not None:
        position = index + np.arange(t)[:, None]
        col = np.arange(S)[None, :]
        band = col <= position
        if layer.sliding_window is not None:
            band &= np.abs(position - col) < layer.sliding_window
        allowed &= band
        # Keys past every query's position take no part: a zero (or any) value there is never read.
        seen = int(index + t)
    if attention_mask is not None:
        allowed &= (np.asarray(attention_mask) != 0)[:, None, :, :]
    probs = _masked_softmax(scores[..., :seen], allowed[..., :seen], layer.masking,
                            spec.call.dtype_policy.compute)
    context = (probs @ vh[:, :, :seen]).transpose(0, 2, 1, 3)                    # (B, t, N, H)
    if layer.use_gate:
        context = context * (1.0 / (1.0 + np.exp(-_project(spec, w, q, "gate"))))
    out = np.tensordot(context, w["attention_output/kernel"], axes=([-2, -1], [0, 1]))
    if layer.use_bias:
        out = out + w["attention_output/bias"]
    return out, cache
