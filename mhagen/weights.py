"""Stage 2, the weights: seeded Keras-style initialization, and checking weights a user brings.

Weights are a list of arrays in Keras' `layer.get_weights()` order (see `Geometry.weight_shapes`),
or a dict keyed by Keras weight path (`query/kernel`, `query/bias`, ...). Whatever their source,
the weights that reach the tracer are finite and stay finite in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import SpecError, WeightsError, invalid
from .runtime import np_dtype
from .spec import Spec
from .weights_io import WeightsFile

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
        argument = "kernel_initializer" if name.endswith("/kernel") else "bias_initializer"
        init = getattr(spec.layer, argument)
        try:
            with np.errstate(all="ignore"):
                raw = np.asarray(_draw(init, name, shape, rng))
                drawn = raw.astype(dtype)
        except (TypeError, ValueError, ArithmeticError, KeyError, np.linalg.LinAlgError) as exc:
            problem: str | None = f"{type(exc).__name__}: {exc}"
        else:
            problem = _value_problem(spec, raw, drawn)
        if problem:   # never let a NaN or an overflow drawn from the spec reach the compiler
            raise invalid(argument, f"an initializer that draws finite {spec.call.dtype_policy.compute} "
                          f"values (for `{name}` it drew {problem})", init, cls=SpecError)
        out.append(drawn)
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
        keys = _match_keys(weights, names)
        if isinstance(weights, WeightsFile):
            # Declared shapes and dtypes first: nothing is read (or inflated) that does not fit.
            for name, shape in shapes:
                entry = weights.entries[keys[name]]
                _check_array_type(_label(name, keys[name]), entry.shape, entry.dtype, shape)
        labels = [_label(n, keys[n]) for n in names]
        values: Sequence[Any] = [weights[keys[n]] for n in names]
    elif isinstance(weights, (list, tuple)):
        if len(weights) != len(names):
            raise WeightsError(f"Received {len(weights)} weight arrays, expected {len(names)}: {names}")
        labels, values = [f"`{n}`" for n in names], list(weights)
    else:
        raise WeightsError("Received weights of type "
                           f"{type(weights).__name__}, expected a list in get_weights() order or a "
                           "dict keyed by weight path")
    dtype = np_dtype(spec.call.dtype_policy.variable)
    out = []
    for (name, shape), label, value in zip(shapes, labels, values):
        array = np.asarray(value)
        _check_array_type(label, array.shape, array.dtype, shape)
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(array.astype(dtype))
        problem = _value_problem(spec, array, stored)
        if problem:
            raise WeightsError(f"Weight {label} holds {problem}; expected finite values that "
                               f"{spec.call.dtype_policy.compute} can hold")
        out.append(stored)
    return out


def _label(name: str, key: str) -> str:
    """How an error names a weight: `query/kernel`, or `query/kernel` (key `mha/query/kernel:0`)."""
    return f"`{name}`" if key == name else f"`{name}` (key `{key}`)"


def _check_array_type(label: str, got: tuple[int, ...], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if tuple(got) != shape:
        raise WeightsError(f"Weight {label} has shape {tuple(got)}, expected {shape}")
    if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
        raise WeightsError(f"Weight {label} has dtype {dtype}, expected a floating dtype")


def _value_problem(spec: Spec, given: np.ndarray, stored: np.ndarray | None = None) -> str | None:
    """What is wrong with a weight's values, or None: a NaN or an infinity ("nan at [0, 1, 2] (3
    non-finite value(s))"), or a value that overflows the variable or the compute dtype when cast
    ("1e+06 at [0, 0, 0], which overflows float16 (largest 65504)"). `stored`: `given` already
    cast to the variable dtype."""
    bad = ~np.isfinite(given)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        return f"{float(given[at])} at {list(at)} ({int(bad.sum())} non-finite value(s))"
    policy = spec.call.dtype_policy
    for dtype_name, cast in ((policy.variable, stored), (policy.compute, None)):
        dtype = np_dtype(dtype_name)
        with np.errstate(over="ignore"):
            cast = given.astype(dtype) if cast is None else cast
        over = ~np.isfinite(cast)
        if over.any():
            at = tuple(int(i) for i in np.argwhere(over)[0])
            return (f"{float(given[at]):g} at {list(at)}, which overflows {dtype_name} "
                    f"(largest {float(_finfo(dtype).max):g})")
    return None


def _finfo(dtype: np.dtype) -> Any:
    if dtype.name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def _match_keys(weights: Mapping[Any, Any], names: list[str]) -> dict[str, Any]:
    """{weight path: the key that holds it}; refuses keys that are missing, extra or ambiguous."""
    holders: dict[str, list[Any]] = {}
    for key in weights:
        if not isinstance(key, str):
            raise WeightsError(f"Received a weights key {key!r} of type {type(key).__name__}, expected a "
                               f"weight path such as 'query/kernel'")
        holders.setdefault(_strip_path(key), []).append(key)
    for name, keys in holders.items():
        if len(keys) > 1:
            listed = ", ".join(f"`{k}`" for k in sorted(keys))
            raise WeightsError(f"Weights keys {listed} all name the weight `{name}`; expected one key "
                               f"per weight")
    missing = [n for n in names if n not in holders]
    extra = sorted(keys[0] for s, keys in holders.items() if s not in names)
    if missing or extra:
        raise WeightsError(f"Weights do not match the spec: missing {missing}, unexpected {extra}; "
                           f"expected exactly {names}")
    return {n: holders[n][0] for n in names}


def _strip_path(key: str) -> str:
    """`mha/query/kernel:0` and `multi_head_attention/query/kernel` both mean `query/kernel`."""
    key = key.split(":")[0]
    parts = key.split("/")
    return "/".join(parts[-2:])
