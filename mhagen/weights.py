"""Stage 2, the weights: seeded Keras-style initialization, and checking weights a user brings.

Weights are a list of arrays in Keras' `layer.get_weights()` order (see `Geometry.weight_shapes`),
or a dict keyed by Keras weight path (`query/kernel`, `query/bias`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import WeightsError
from .runtime import np_dtype
from .spec import Spec

__all__ = ["init_weights", "normalize_weights", "weight_names"]


def weight_names(spec: Spec) -> list[str]:
    """Keras weight paths in `get_weights()` order, e.g. ["query/kernel", "query/bias", ...]."""
    return [name for name, _ in _shapes(spec)]


def _shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    return spec.geometry.weight_shapes(use_bias=spec.layer.use_bias, use_gate=spec.layer.use_gate)


def _fans(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    # EinsumDense fans follow the einsum axes: the output kernel contracts (heads, value_dim).
    if name.startswith("attention_output/"):
        return shape[0] * shape[1], math.prod(shape[2:])
    return shape[0], math.prod(shape[1:])


def _draw(init: Any, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind, cfg = (init, {}) if isinstance(init, str) else (init["class_name"], dict(init.get("config", {})))
    fan_in, fan_out = _fans(name, shape) if len(shape) >= 2 else (shape[0], shape[0])
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "ones":
        return np.ones(shape)
    if kind == "constant":
        return np.full(shape, float(cfg.get("value", 0.0)))
    if kind == "random_uniform":
        return rng.uniform(cfg.get("minval", -0.05), cfg.get("maxval", 0.05), shape)
    if kind == "random_normal":
        return rng.normal(cfg.get("mean", 0.0), cfg.get("stddev", 0.05), shape)
    if kind == "truncated_normal":
        return _truncated(rng, shape, cfg.get("stddev", 0.05)) + cfg.get("mean", 0.0)
    if kind == "orthogonal":
        flat = rng.normal(size=(shape[0], math.prod(shape[1:])) if len(shape) > 1 else (shape[0], 1))
        rows, cols = flat.shape
        q, r = np.linalg.qr(flat if rows >= cols else flat.T)
        q = q * np.sign(np.diag(r))
        q = q if rows >= cols else q.T
        return cfg.get("gain", 1.0) * q.reshape(shape)
    # Variance-scaling family: scale / fan with Keras' fan modes.
    scale, mode = {
        "glorot_uniform": (1.0, "avg"), "glorot_normal": (1.0, "avg"),
        "he_uniform": (2.0, "in"), "he_normal": (2.0, "in"),
        "lecun_uniform": (1.0, "in"), "lecun_normal": (1.0, "in"),
    }[kind]
    fan = {"in": fan_in, "avg": (fan_in + fan_out) / 2.0}[mode]
    variance = scale / max(1.0, fan)
    if kind.endswith("uniform"):
        limit = math.sqrt(3.0 * variance)
        return rng.uniform(-limit, limit, shape)
    # Keras' truncated normal at +-2 stddev, corrected for the truncation.
    return _truncated(rng, shape, math.sqrt(variance) / 0.87962566103423978)


def _truncated(rng: np.random.Generator, shape: tuple[int, ...], stddev: float) -> np.ndarray:
    out = rng.normal(0.0, 1.0, shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * stddev


def init_weights(spec: Spec) -> list[np.ndarray]:
    """Fresh weights for `spec`, in `layer.get_weights()` order, reproducible from `layer.seed`.

    Kernels use `kernel_initializer`, biases `bias_initializer`; arrays come in the policy's variable
    dtype (float32 under a mixed policy).

        weights = init_weights(spec)      # [query/kernel (Dq, N, H), query/bias (N, H), ...]
    """
    seed = spec.layer.seed if spec.layer.seed is not None else 0
    dtype = np_dtype(spec.call.dtype_policy.variable)
    out = []
    for index, (name, shape) in enumerate(_shapes(spec)):
        rng = np.random.default_rng([seed, index])
        init = spec.layer.kernel_initializer if name.endswith("/kernel") else spec.layer.bias_initializer
        out.append(np.asarray(_draw(init, name, shape, rng), dtype=dtype))
    return out


def normalize_weights(spec: Spec, weights: Sequence[Any] | Mapping[str, Any] | None) -> list[np.ndarray]:
    """Check weights against the spec and return them as a list in `get_weights()` order.

    Accepts a list (Keras order) or a dict keyed by weight path; `None` means `init_weights(spec)`.
    Raises `WeightsError` naming the weight, the expected shape and the received one.
    """
    if weights is None:
        return init_weights(spec)
    shapes = _shapes(spec)
    names = [n for n, _ in shapes]
    if isinstance(weights, Mapping):
        keys = {_strip_path(k): k for k in weights}
        missing = [n for n in names if n not in keys]
        extra = sorted(k for s, k in keys.items() if s not in names)
        if missing or extra:
            raise WeightsError(f"Weights do not match the spec: missing {missing}, unexpected {extra}; "
                               f"expected exactly {names}")
        items = [weights[keys[n]] for n in names]
    elif isinstance(weights, (list, tuple)):
        if len(weights) != len(names):
            raise WeightsError(f"Received {len(weights)} weight arrays, expected {len(names)}: {names}")
        items = list(weights)
    else:
        raise WeightsError("Received weights of type "
                           f"{type(weights).__name__}, expected a list in get_weights() order or a "
                           "dict keyed by weight path")
    dtype = np_dtype(spec.call.dtype_policy.variable)
    out = []
    for (name, shape), value in zip(shapes, items):
        array = np.asarray(value)
        if array.shape != shape:
            raise WeightsError(f"Weight `{name}` has shape {array.shape}, expected {shape}")
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            raise WeightsError(f"Weight `{name}` has dtype {array.dtype}, expected a floating dtype")
        out.append(np.ascontiguousarray(array.astype(dtype)))
    return out


def _strip_path(key: str) -> str:
    """`mha/query/kernel:0` and `multi_head_attention/query/kernel` both mean `query/kernel`."""
    key = key.split(":")[0]
    parts = key.split("/")
    return "/".join(parts[-2:])
