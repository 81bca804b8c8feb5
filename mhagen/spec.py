"""Stage 1, the spec: what layer to build (Keras constructor arguments) and how it is called.

A `Spec` is a frozen pair of `LayerSpec` (every `keras.layers.MultiHeadAttention` constructor argument)
and `CallSpec` (input shapes, dtype, masks, causal, scores, training). It is validated when built,
round-trips through `to_dict()` / `from_dict()` and through its TOML file form.

    spec = Spec.load("examples/encoder.toml")
    spec.geometry.scores_shape        # (B, N, T, S) for 3-D inputs
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import SpecError, invalid

__all__ = ["Spec", "LayerSpec", "CallSpec", "Geometry", "DType", "KNOWN_INITIALIZERS"]


class DType(enum.Enum):
    """Call dtypes; values are the spellings used in specs (and Keras policy names)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    MIXED_FLOAT16 = "mixed_float16"
    MIXED_BFLOAT16 = "mixed_bfloat16"

    @classmethod
    def parse(cls, value: object) -> "DType":
        for member in cls:
            if value == member.value:
                return member
        options = ", ".join(repr(m.value) for m in cls)
        raise invalid("dtype", f"one of {options}", value)

    @property
    def compute(self) -> str:
        """The dtype the math runs in (and inputs and outputs come in)."""
        return {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(self.value, self.value)

    @property
    def variable(self) -> str:
        """The dtype weights are stored in: float32 under a mixed policy, as Keras does."""
        return "float32" if self.value.startswith("mixed_") else self.value


KNOWN_INITIALIZERS = (
    "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
    "zeros", "ones", "random_uniform", "random_normal", "truncated_normal", "orthogonal", "constant",
)
# Keras class names as `get_config()` serializes them, mapped to the snake-case names above.
_INITIALIZER_CLASSES = {
    "GlorotUniform": "glorot_uniform", "GlorotNormal": "glorot_normal", "HeUniform": "he_uniform",
    "HeNormal": "he_normal", "LecunUniform": "lecun_uniform", "LecunNormal": "lecun_normal",
    "Zeros": "zeros", "Ones": "ones", "RandomUniform": "random_uniform", "RandomNormal": "random_normal",
    "TruncatedNormal": "truncated_normal", "Orthogonal": "orthogonal", "Constant": "constant",
}

_LAYER_KEYS = (
    "num_heads", "key_dim", "value_dim", "dropout", "use_bias", "output_shape", "attention_axes",
    "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
    "activity_regularizer", "kernel_constraint", "bias_constraint", "seed", "use_gate", "sliding_window",
    "masking",
)
_CALL_KEYS = (
    "query", "value", "key", "dtype", "attention_mask", "use_causal_mask", "return_attention_scores",
    "training", "dynamic", "max_batch", "max_seq", "cache_max_length",
)
DYNAMIC_DIMS = ("batch", "seq")

# Every tensor's element count must fit int64: JAX, NumPy and IREE index with it.
INT64_MAX = (1 << 63) - 1
# Keras names the axes of its einsum equations with the letters a-z (`_CHR_IDX`), as the tracer does.
EINSUM_LETTERS = 26
# A dynamic bundle holds one program per power of two up to `max_batch` / `max_seq` (17 at most).
MAX_DYNAMIC_SIZE = 1 << 16
# Seeds key the dropout as `[seed, counter]` in uint32, as the bundle's interface records them.
SEED_LIMIT = 1 << 32
# Specs are a few hundred bytes; tables nested this deep are a mistake or an attack (tomllib, the
# manifest's JSON and `to_toml` would each hit Python's recursion limit a few hundred levels down).
MAX_NESTING = 32
MAX_SPEC_BYTES = 1 << 20

# The largest finite value of each weights dtype (numpy.finfo; ml_dtypes for bfloat16).
_DTYPE_MAX = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}

# The arguments each initializer takes (Keras 3 `get_config()` keys; None values are dropped).
_VARIANCE_SCALING = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
                     "lecun_normal")
_INITIALIZER_ARGS: dict[str, tuple[str, ...]] = {
    "zeros": (), "ones": (), "constant": ("value",),
    "random_uniform": ("minval", "maxval", "seed"), "random_normal": ("mean", "stddev", "seed"),
    "truncated_normal": ("mean", "stddev", "seed"), "orthogonal": ("gain", "seed"),
    **{name: ("seed",) for name in _VARIANCE_SCALING},
}
# Keras' defaults for the arguments mhagen draws with (as `weights._draw` reads them).
_INITIALIZER_DEFAULTS = {"value": 0.0, "minval": -0.05, "maxval": 0.05, "mean": 0.0, "stddev": 0.05,
                         "gain": 1.0}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise invalid(name, "a positive integer", value)
    return int(value)  # type: ignore[arg-type]


def _number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise invalid(name, "true or false", value)
    return value


def _shape(name: str, value: object, *, min_rank: int = 1) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise invalid(name, f"a shape: a list of at least {min_rank} positive integers", value)
    if len(value) < min_rank or not all(_is_int(d) and d > 0 for d in value):
        raise invalid(name, f"a shape: a list of at least {min_rank} positive integers", value)
    return tuple(int(d) for d in value)


def _table(obj: Any, keys: Sequence[str]) -> dict[str, Any]:
    """A dataclass's TOML table: None and empty tuples left out (absent means the default)."""
    out: dict[str, Any] = {}
    for name in keys:
        value = getattr(obj, name)
        if value is None or value == ():
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _strip_none(value: Any, *, where: str = "spec", depth: int = 0) -> Any:
    """Drop None entries recursively: TOML has no null, and absent means None in a spec.

    Values must be what TOML and the bundle's JSON manifest both hold (no dates), nested at most
    MAX_NESTING deep."""
    if depth > MAX_NESTING:
        raise invalid(where, f"tables and lists nested at most {MAX_NESTING} deep", "<nested deeper>")
    if isinstance(value, Mapping):
        return {k: _strip_none(v, where=where, depth=depth + 1) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_strip_none(v, where=where, depth=depth + 1) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        raise invalid(where, "strings, numbers, booleans, lists and tables (no dates or times)", value)
    return value


def _initializer(name: str, value: object) -> str | dict[str, Any]:
    """Normalize an initializer: a snake-case name, or {"class_name": ..., "config": {...}}.

    The config holds exactly the arguments Keras' initializer takes, each finite and in its range
    (a positive `stddev`, `minval <= maxval`), so that drawing weights can neither fail nor give NaN."""
    if isinstance(value, str):
        key = _INITIALIZER_CLASSES.get(value, value)
        if key not in KNOWN_INITIALIZERS:
            raise invalid(name, f"one of {', '.join(KNOWN_INITIALIZERS)}", value)
        return key
    if isinstance(value, Mapping) and "class_name" in value:
        # `module` and `registered_name` come with Keras' serialization; they name the same class.
        if set(value) - {"class_name", "config", "module", "registered_name"}:
            raise invalid(name, "a table of `class_name` and `config` (as Keras serializes it)", dict(value))
        cls_name = value["class_name"]
        key = _INITIALIZER_CLASSES.get(cls_name, cls_name) if isinstance(cls_name, str) else None
        if key not in KNOWN_INITIALIZERS:
            raise invalid(name, f"one of {', '.join(KNOWN_INITIALIZERS)}", cls_name)
        raw = value.get("config")
        if raw is not None and not isinstance(raw, Mapping):
            raise invalid(f"{name}.config", f"a table of the arguments of {key}", raw)
        config = _strip_none(dict(raw or {}), where=f"{name}.config")
        _check_initializer_args(name, key, config)  # type: ignore[arg-type]
        return {"class_name": key, "config": config} if config else key  # type: ignore[return-value]
    raise invalid(name, "an initializer name or a {class_name, config} table", value)


def _check_initializer_args(name: str, kind: str, config: Mapping[str, Any]) -> None:
    allowed = _INITIALIZER_ARGS[kind]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(f'`{a}`' for a in allowed)}" if allowed else "takes no arguments"
        raise invalid(f"{name}.config", f"the arguments {kind} takes ({takes})", dict(config))
    for arg, value in config.items():
        if arg == "seed":
            if not _is_int(value) or not 0 <= value < SEED_LIMIT:
                raise invalid(f"{name}.seed", "a non-negative integer below 2**32", value)
        elif not _number(value):
            raise invalid(f"{name}.{arg}", "a finite number", value)
    if "stddev" in config and not config["stddev"] > 0:
        raise invalid(f"{name}.stddev", "a number greater than 0", config["stddev"])
    if kind == "random_uniform":
        lo, hi = (config.get(a, _INITIALIZER_DEFAULTS[a]) for a in ("minval", "maxval"))
        if lo > hi:
            raise invalid(f"{name}.maxval", f"a number at least minval ({lo!r})", hi)


def _initializer_limit(init: str | Mapping[str, Any]) -> tuple[str, float] | None:
    """(argument, the largest magnitude it may draw), for initializers whose draws scale with an argument.

    A normal draw past 10 standard deviations has odds below 1e-23 per weight."""
    if isinstance(init, str):
        return None
    kind, cfg = init["class_name"], {**_INITIALIZER_DEFAULTS, **init.get("config", {})}
    if kind == "constant":
        return "value", abs(cfg["value"])
    if kind == "random_uniform":
        return "minval" if abs(cfg["minval"]) > abs(cfg["maxval"]) else "maxval", max(
            abs(cfg["minval"]), abs(cfg["maxval"]))
    if kind in ("random_normal", "truncated_normal"):
        sigmas = 10.0 if kind == "random_normal" else 2.0
        return "stddev", abs(cfg["mean"]) + sigmas * cfg["stddev"]
    if kind == "orthogonal":
        return "gain", abs(cfg["gain"])
    return None


def _passthrough(name: str, value: object) -> Any:
    """Regularizers and constraints: kept and reported, never applied (they do not change inference)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return _strip_none(dict(value), where=name)
    raise invalid(name, "None, a name, or a {class_name, config} table", value)


@dataclass(frozen=True)
class LayerSpec:
    """Every argument of `keras.layers.MultiHeadAttention`, validated by Keras' rules."""

    num_heads: int
    key_dim: int
    value_dim: int | None = None
    dropout: float = 0.0
    use_bias: bool = True
    output_shape: tuple[int, ...] | None = None
    attention_axes: tuple[int, ...] | None = None
    kernel_initializer: Any = "glorot_uniform"
    bias_initializer: Any = "zeros"
    kernel_regularizer: Any = None
    bias_regularizer: Any = None
    activity_regularizer: Any = None
    kernel_constraint: Any = None
    bias_constraint: Any = None
    seed: int | None = None
    use_gate: bool = False
    sliding_window: int | None = None
    # Whose masked softmax: None / "keras3" (masked scores replaced, masked probabilities zeroed:
    # a fully masked query row gets a zero context) or "keras2" (tf.keras 2.x adds
    # (1 - mask) * large_negative and never zeroes: such a row gets the mean of the values).
    masking: str | None = None

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("num_heads", _positive_int("num_heads", self.num_heads))
        put("key_dim", _positive_int("key_dim", self.key_dim))
        if self.value_dim is not None:
            put("value_dim", _positive_int("value_dim", self.value_dim))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= float(self.dropout) < 1.0
        ):
            raise invalid("dropout", "a number in [0, 1)", self.dropout)
        put("dropout", float(self.dropout))
        put("use_bias", _boolean("use_bias", self.use_bias))
        put("use_gate", _boolean("use_gate", self.use_gate))
        put("output_shape", self._parse_output_shape(self.output_shape))
        put("attention_axes", self._parse_attention_axes(self.attention_axes))
        put("kernel_initializer", _initializer("kernel_initializer", self.kernel_initializer))
        put("bias_initializer", _initializer("bias_initializer", self.bias_initializer))
        for name in ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                     "kernel_constraint", "bias_constraint"):
            put(name, _passthrough(name, getattr(self, name)))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise invalid("seed", "None or a non-negative integer below 2**32", self.seed)
        if self.sliding_window is not None:
            put("sliding_window", _positive_int("sliding_window", self.sliding_window))
            # The traced masks compare int32 row and key indices with the window.
            if self.sliding_window >= 1 << 31:
                raise invalid("sliding_window", "a positive integer below 2**31", self.sliding_window)
        if self.masking not in (None, "keras3", "keras2"):
            raise invalid("masking", '"keras3" (Keras 3, the default) or "keras2" (tf.keras 2.x)', self.masking)
        put("masking", None if self.masking == "keras3" else self.masking)

    @staticmethod
    def _parse_output_shape(value: object) -> tuple[int, ...] | None:
        if value is None or value == 0 or (isinstance(value, (list, tuple)) and len(value) == 0):
            return None
        if _is_int(value) and value > 0:  # type: ignore[operator]
            return (int(value),)  # type: ignore[arg-type]
        if isinstance(value, (list, tuple)) and all(_is_int(d) and d > 0 for d in value):
            return tuple(int(d) for d in value)
        raise invalid("output_shape", "None, a positive integer, or a list of positive integers "
                      "(Invalid `output_shape`)", value)

    @staticmethod
    def _parse_attention_axes(value: object) -> tuple[int, ...] | None:
        if value is None:
            return None
        if _is_int(value):
            return (int(value),)  # type: ignore[arg-type]
        if isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(a) for a in value):
            return tuple(int(a) for a in value)
        raise invalid("attention_axes", "an int, or a non-empty list of ints", value)

    @property
    def effective_value_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else self.key_dim

    def to_dict(self) -> dict[str, Any]:
        return _table(self, _LAYER_KEYS)


@dataclass(frozen=True)
class CallSpec:
    """How the layer is called: full input shapes (batch included), dtype, masks and modes.

    `attention_mask` is False (no mask input), True (a boolean input shaped like the scores without
    the heads axis, (B, T, S) for 3-D inputs) or an explicit shape such as (B, N, T, S).
    `dynamic` names the dims a bundle serves at any size up to `max_batch` / `max_seq`.
    `cache_max_length = S` asks for a decoder build of a self-attention layer: besides the whole
    call, entry points that extend a key/value cache `(B, 2, S, N, H)` held on the device (see
    `mhagen.decode`); `query` `(B, T, E)` then names the batch and the longest chunk of new tokens
    one call takes.
    """

    query: tuple[int, ...]
    value: tuple[int, ...]
    key: tuple[int, ...] | None = None
    dtype: str = "float32"
    attention_mask: bool | tuple[int, ...] = False
    use_causal_mask: bool = False
    return_attention_scores: bool = False
    training: bool = False
    dynamic: tuple[str, ...] = ()
    max_batch: int | None = None
    max_seq: int | None = None
    cache_max_length: int | None = None

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        if self.cache_max_length is not None:
            put("cache_max_length", _positive_int("cache_max_length", self.cache_max_length))
        put("query", _shape("query", self.query, min_rank=3))
        put("value", _shape("value", self.value, min_rank=3))
        if self.key is not None:
            put("key", _shape("key", self.key, min_rank=3))
        put("dtype", DType.parse(self.dtype).value)
        if isinstance(self.attention_mask, bool):
            pass
        else:
            put("attention_mask", _shape("attention_mask", self.attention_mask, min_rank=2))
        for name in ("use_causal_mask", "return_attention_scores", "training"):
            put(name, _boolean(name, getattr(self, name)))
        dyn = self.dynamic
        if isinstance(dyn, str):
            dyn = (dyn,)
        if not isinstance(dyn, (list, tuple)) or any(d not in DYNAMIC_DIMS for d in dyn):
            raise invalid("dynamic", f"a list drawn from {list(DYNAMIC_DIMS)}", self.dynamic)
        put("dynamic", tuple(d for d in DYNAMIC_DIMS if d in dyn))
        for name, dim in (("max_batch", "batch"), ("max_seq", "seq")):
            value = getattr(self, name)
            if value is None:
                continue
            put(name, _positive_int(name, value))
            if value > MAX_DYNAMIC_SIZE:
                raise invalid(name, f"a positive integer of at most {MAX_DYNAMIC_SIZE} (a dynamic bundle "
                              "compiles one program per power of two up to it)", value)
            if dim not in self.dynamic:
                raise invalid(name, f"no value unless `dynamic` includes {dim!r} (it is the largest "
                              f"{dim} a dynamic bundle serves)", value)

    @property
    def dtype_policy(self) -> DType:
        return DType.parse(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return _table(self, _CALL_KEYS)


@dataclass(frozen=True)
class Geometry:
    """Shapes and axes derived from a spec, in Keras' conventions.

    Input axes: query `(B, *T, Dq)`, value `(B, *S, Dv)`, key `(B, *S, Dk)`. The projected rank is
    `R = rank + 1`: `(B, *T, N, H)`. `attention_axes` are input axes, sorted as the user gave them.
    """

    rank: int
    attention_axes: tuple[int, ...]
    batch_axes: tuple[int, ...]
    num_heads: int
    key_dim: int
    value_dim: int
    query_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    output_dims: tuple[int, ...]
    mask_shape: tuple[int, ...] | None

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.query_shape[:-1] + self.output_dims

    @property
    def scores_shape(self) -> tuple[int, ...]:
        """Keras' product order: batch-like axes, heads, query attention axes, key attention axes."""
        q, v = self.query_shape, self.value_shape
        return (
            tuple(q[a] for a in self.batch_axes)
            + (self.num_heads,)
            + tuple(q[a] for a in self.attention_axes)
            + tuple(v[a] for a in self.attention_axes)
        )

    @property
    def full_mask_shape(self) -> tuple[int, ...]:
        """The scores shape without its heads axis: what `attention_mask = true` declares."""
        s = self.scores_shape
        n = len(self.batch_axes)
        return s[:n] + s[n + 1:]

    @property
    def heads_axis(self) -> int:
        return len(self.batch_axes)

    def expand_mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Keras' mask expansion: insert unit axes at -(2k+1) until the mask has the scores' rank."""
        from .runtime import expand_mask_shape

        return expand_mask_shape(shape, len(self.scores_shape), len(self.attention_axes))

    def weight_shapes(self, *, use_bias: bool, use_gate: bool) -> list[tuple[str, tuple[int, ...]]]:
        """Weight names and shapes in Keras' `layer.get_weights()` order."""
        n, h, hv = self.num_heads, self.key_dim, self.value_dim
        out: list[tuple[str, tuple[int, ...]]] = []

        def dense(name: str, kernel: tuple[int, ...], bias: tuple[int, ...]) -> None:
            out.append((f"{name}/kernel", kernel))
            if use_bias:
                out.append((f"{name}/bias", bias))

        dense("query", (self.query_shape[-1], n, h), (n, h))
        dense("key", (self.key_shape[-1], n, h), (n, h))
        if use_gate:
            dense("gate", (self.query_shape[-1], n, hv), (n, hv))
        dense("value", (self.value_shape[-1], n, hv), (n, hv))
        dense("attention_output", (n, hv) + self.output_dims, self.output_dims)
        return out


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) != len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(shape, target))


@dataclass(frozen=True)
class Spec:
    """A layer plus a call: everything mhagen needs to trace, compile and verify one attention layer.

    `keras` holds Keras config keys that do not change inference (name, trainable, flash_attention,
    the dtype policy as written): kept and reported, never silently dropped.

        spec = Spec.load("examples/encoder.toml")
        spec.to_dict()   # {"layer": {...}, "call": {...}}
    """

    layer: LayerSpec
    call: CallSpec
    keras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keras", _strip_none(dict(self.keras), where="keras"))
        _ = self.geometry  # validates the combination of layer and call
        _check_initializer_ranges(self.layer, self.call)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        if not isinstance(data, Mapping):
            raise invalid("spec", "a table with [layer] and [call]", type(data).__name__)
        unknown = set(data) - {"layer", "call", "keras"}
        if unknown:
            raise SpecError(f"Unknown table(s) {sorted(unknown)} in spec; expected [layer], [call] "
                            "and optionally [keras]")
        for table in ("layer", "call"):
            if table not in data or not isinstance(data[table], Mapping):
                raise SpecError(f"Missing table [{table}] in spec; expected [layer] and [call]")
        layer = _from_table(LayerSpec, "layer", data["layer"], _LAYER_KEYS)
        call = _from_table(CallSpec, "call", data["call"], _CALL_KEYS)
        keras = data.get("keras", {})
        if not isinstance(keras, Mapping):
            raise invalid("keras", "a table", keras)
        return cls(layer=layer, call=call, keras=keras)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> "Spec":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{source}: malformed TOML: {exc}") from None
        except RecursionError:
            raise SpecError(f"{source}: malformed TOML: arrays or tables nested too deeply for the "
                            f"parser (a spec nests at most {MAX_NESTING} deep)") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        """Read a spec from a TOML file with `[layer]` and `[call]` tables."""
        path = Path(path)
        try:
            if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
                raise SpecError(f"Cannot read spec file {path}: not a regular file")
            if path.exists() and path.stat().st_size > MAX_SPEC_BYTES:
                raise SpecError(f"Cannot read spec file {path}: {path.stat().st_size} bytes, more than "
                                f"the {MAX_SPEC_BYTES} a spec may have")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(f"Spec file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"Cannot read spec file {path}: {exc}") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_keras_config(
        cls,
        config: Mapping[str, Any],
        *,
        query_shape: Sequence[int],
        value_shape: Sequence[int],
        key_shape: Sequence[int] | None = None,
        dtype: str | None = None,
        attention_mask: bool | Sequence[int] = False,
        use_causal_mask: bool = False,
        return_attention_scores: bool = False,
        training: bool = False,
        cache_max_length: int | None = None,
    ) -> "Spec":
        """Build a spec from `layer.get_config()` of a Keras 3 MultiHeadAttention, unchanged.

        `cache_max_length=S` makes it a decoder build (keras_hub's CachedMultiHeadAttention with a
        `(B, 2, S, N, H)` cache; the call is then causal self-attention).

        `dtype=None` takes the config's own dtype policy (a name, or a serialized DTypePolicy),
        else float32. Keys that do not change inference are kept in `spec.keras`.
        """
        if not isinstance(config, Mapping):
            raise invalid("config", "the dict from layer.get_config()", type(config).__name__)
        layer_args = {k: config[k] for k in _LAYER_KEYS if k in config}
        extras = {k: v for k, v in config.items() if k not in _LAYER_KEYS}
        for name in ("kernel_initializer", "bias_initializer"):
            # An initializer mhagen cannot draw (VarianceScaling, a custom class) does not change
            # inference with the layer's own weights: keep it in [keras] rather than refuse the layer.
            if name in layer_args:
                try:
                    _initializer(name, layer_args[name])
                except SpecError:
                    extras[name] = layer_args.pop(name)
        if dtype is None:
            dtype = _policy_name(config.get("dtype")) or "float32"
        if "num_heads" not in layer_args or "key_dim" not in layer_args:
            raise SpecError("Keras config lacks `num_heads` or `key_dim`; expected the dict from "
                            "MultiHeadAttention.get_config()")
        layer = LayerSpec(**layer_args)
        call = CallSpec(
            query=tuple(query_shape), value=tuple(value_shape),
            key=None if key_shape is None else tuple(key_shape), dtype=dtype,
            attention_mask=attention_mask if isinstance(attention_mask, bool) else tuple(attention_mask),
            use_causal_mask=use_causal_mask, return_attention_scores=return_attention_scores,
            training=training, cache_max_length=cache_max_length,
        )
        return cls(layer=layer, call=call, keras=extras)

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer.to_dict(), "call": self.call.to_dict()}
        if self.keras:
            out["keras"] = dict(self.keras)
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, *, layer: dict[str, Any] | None = None, call: dict[str, Any] | None = None) -> "Spec":
        """A copy with some layer and/or call fields changed (validated again)."""
        return Spec(
            layer=dataclasses.replace(self.layer, **(layer or {})),
            call=dataclasses.replace(self.call, **(call or {})),
            keras=self.keras,
        )

    def at_size(self, batch: int | None = None, query_seq: int | None = None, key_seq: int | None = None,
                *, attention_mask: bool | None = None) -> "Spec":
        """A static copy with the batch (axis 0) and/or sequence (axis 1) sizes changed.

        A declared mask shape becomes `attention_mask = true` (its sizes follow the inputs) unless
        `attention_mask` says otherwise.
        """
        def resize(shape: tuple[int, ...] | None, seq: int | None) -> tuple[int, ...] | None:
            if shape is None:
                return None
            out = list(shape)
            if batch is not None:
                out[0] = batch
            if seq is not None:
                out[1] = seq
            return tuple(out)

        mask = self.call.attention_mask
        if attention_mask is not None:
            mask = attention_mask
        elif not isinstance(mask, bool):
            mask = True
        return self.replace(call={
            "query": resize(self.call.query, query_seq), "value": resize(self.call.value, key_seq),
            "key": resize(self.call.key, key_seq), "attention_mask": mask,
            "dynamic": (), "max_batch": None, "max_seq": None,
        })

    # ---- derived ------------------------------------------------------------------------------
    @functools.cached_property
    def geometry(self) -> Geometry:
        return _geometry(self.layer, self.call)

    @property
    def has_dropout(self) -> bool:
        """The compiled function takes a dropout key input."""
        return self.call.training and self.layer.dropout > 0

    @property
    def has_mask(self) -> bool:
        return self.call.attention_mask is not False

    @property
    def has_key(self) -> bool:
        return self.call.key is not None

    @property
    def is_decoder(self) -> bool:
        """A decoder build: prefill and decode entry points over a device-held KV cache."""
        return self.call.cache_max_length is not None

    @property
    def decoder_kind(self) -> str | None:
        """"self" or "cross" for a decoder build (see `_decoder_kind`), else None."""
        return _decoder_kind(self.call, self.geometry) if self.is_decoder else None

    @property
    def cache_shape(self) -> tuple[int, ...]:
        """Keras' (keras_hub's) cache layout `(B, 2, S, N, H)`: keys, then values, projected."""
        g = self.geometry
        return (g.query_shape[0], 2, self.call.cache_max_length or 0, g.num_heads, g.key_dim)

    @property
    def ignored_keys(self) -> dict[str, Any]:
        """Arguments kept in the spec that do not change the forward pass, for reporting."""
        out = {n: getattr(self.layer, n) for n in (
            "kernel_regularizer", "bias_regularizer", "activity_regularizer",
            "kernel_constraint", "bias_constraint") if getattr(self.layer, n) is not None}
        out.update(self.keras)
        return out

    @property
    def flops(self) -> int:
        """Multiply-adds of one call, counted from the spec (projections, scores, context, output)."""
        g = self.geometry
        tq = math.prod(g.query_shape[:-1])
        tk = math.prod(g.value_shape[:-1])
        n, h, hv = g.num_heads, g.key_dim, g.value_dim
        macs = tq * g.query_shape[-1] * n * h + tk * g.key_shape[-1] * n * h + tk * g.value_shape[-1] * n * hv
        if self.layer.use_gate:
            macs += tq * g.query_shape[-1] * n * hv
        scores = math.prod(g.scores_shape)
        macs += scores * h + scores * hv
        macs += tq * n * hv * math.prod(g.output_dims)
        return 2 * macs


def _from_table(cls: type, table: str, data: Mapping[str, Any], keys: Sequence[str]) -> Any:
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise SpecError(f"Unknown key(s) {unknown} in [{table}]; expected some of: {', '.join(keys)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    if missing:
        raise SpecError(f"Missing key(s) {missing} in [{table}]")
    return cls(**dict(data))


def _policy_name(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        cfg = value.get("config")
        if isinstance(cfg, Mapping) and isinstance(cfg.get("name"), str):
            return cfg["name"]
        if isinstance(value.get("name"), str):
            return value["name"]
    raise invalid("dtype", "a dtype policy name or a serialized DTypePolicy", value)


def _geometry(layer: LayerSpec, call: CallSpec) -> Geometry:
    q, v = call.query, call.value
    k = call.key if call.key is not None else v
    rank = len(q)
    if len(v) != rank:
        raise SpecError(f"`query` and `value` must have the same rank. Received: query_shape={q} "
                        f"and value_shape={v}")
    if k[:-1] != v[:-1]:
        raise SpecError("All dimensions of `value` and `key`, except the last one, must be equal. "
                        f"Received: value_shape={v} and key_shape={k}")
    proj_rank = rank + 1
    if layer.attention_axes is None:
        axes = tuple(range(1, rank - 1))
    else:
        # Keras normalizes negative axes against the projected rank: a -> (R - 1) + a.
        axes = tuple(a if a >= 0 else (proj_rank - 1) + a for a in layer.attention_axes)
    if len(set(axes)) != len(axes) or any(not 1 <= a <= rank - 2 for a in axes):
        raise invalid("attention_axes",
                      f"distinct axes of the {rank}-D input other than batch (0) and features "
                      f"({rank - 1}), i.e. within [1, {rank - 2}] or [{-(rank - 1)}, -2]",
                      list(layer.attention_axes or ()))
    letters = rank + 1 + max(len(axes), len(layer.output_shape or (1,)))
    if letters > EINSUM_LETTERS:
        # Keras' equations name the projected axes (rank + 1), then one letter per attention axis
        # or output dimension: past 26 the layer cannot be written (Keras itself fails there).
        arg, value = ("query", list(q)) if len(axes) >= len(layer.output_shape or ()) else (
            "output_shape", list(layer.output_shape or ()))
        raise invalid(arg, f"a layer Keras can write with its {EINSUM_LETTERS} einsum letters (rank + 1 + "
                      f"attention axes or output dims; here {rank} + 1 + {letters - rank - 1} = {letters})",
                      value)
    batch_axes = tuple(a for a in range(rank - 1) if a not in axes)
    for a in batch_axes:
        if q[a] != v[a]:
            raise SpecError(f"`query` and `value` must agree on every axis that is not attended over "
                            f"or features; axis {a} differs. Received: query_shape={q} and value_shape={v}")
    if call.use_causal_mask or layer.sliding_window is not None:
        what = "use_causal_mask" if call.use_causal_mask else "sliding_window"
        if axes != (1,):
            raise SpecError(f"`{what}` masks along input axis 1, as Keras does, so it needs "
                            f"attention_axes=(1,); received attention_axes={list(axes)}")
    if call.training and layer.dropout > 0 and call.dynamic:
        raise SpecError("training with dropout and a dynamic shape cannot be combined: the dropout "
                        "key must cover a fixed shape")
    if layer.masking == "keras2" and "seq" in call.dynamic and call.attention_mask is not False:
        # A fully masked row averages every value under tf.keras 2.x, padded keys included.
        raise SpecError('masking = "keras2" with an attention_mask cannot have a dynamic seq: a query row '
                        "with every key masked averages every value, the padding's too")
    output_dims = layer.output_shape if layer.output_shape is not None else (q[-1],)
    geo = Geometry(
        rank=rank, attention_axes=axes, batch_axes=batch_axes, num_heads=layer.num_heads,
        key_dim=layer.key_dim, value_dim=layer.effective_value_dim, query_shape=q, value_shape=v,
        key_shape=k, output_dims=output_dims, mask_shape=None,
    )
    if call.attention_mask is True:
        mask_shape: tuple[int, ...] | None = geo.full_mask_shape
    elif call.attention_mask is False:
        mask_shape = None
    else:
        mask_shape = tuple(call.attention_mask)
        expanded = geo.expand_mask_shape(mask_shape)
        if not _broadcasts(expanded, geo.scores_shape):
            raise invalid("attention_mask",
                          f"a shape that broadcasts to the scores {geo.scores_shape} after Keras' "
                          f"mask expansion (e.g. {geo.full_mask_shape})", list(mask_shape))
    if call.dynamic:
        _check_dynamic(call, geo, mask_shape)
    if call.cache_max_length is not None:
        _check_decoder(layer, call, geo, mask_shape)
    geo = dataclasses.replace(geo, mask_shape=mask_shape)
    _check_sizes(geo, layer, call)
    return geo


def _largest(geo: Geometry, call: CallSpec) -> Geometry:
    """The geometry of the largest shape a dynamic spec serves (max_batch, max_seq)."""
    def grow(shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        if "batch" in call.dynamic:
            out[0] = call.max_batch  # type: ignore[call-overload]
        if "seq" in call.dynamic:
            out[1] = call.max_seq  # type: ignore[call-overload]
        return tuple(out)

    big = dataclasses.replace(geo, query_shape=grow(geo.query_shape), value_shape=grow(geo.value_shape),
                              key_shape=grow(geo.key_shape), mask_shape=None)
    return dataclasses.replace(big, mask_shape=big.full_mask_shape if geo.mask_shape is not None else None)


def _check_sizes(geo: Geometry, layer: LayerSpec, call: CallSpec) -> None:
    """Every tensor of the layer (inputs, mask, outputs, scores, weights) at its largest shape has an
    element count that fits int64."""
    big = _largest(geo, call) if call.dynamic else geo
    where = " at max_batch / max_seq" if call.dynamic else ""
    for arg, shape in (("query", big.query_shape), ("value", big.value_shape), ("key", big.key_shape),
                       ("attention_mask", big.mask_shape)):
        if shape is not None and math.prod(shape) > INT64_MAX:
            raise invalid(arg, f"a shape whose element count fits int64 (at most {INT64_MAX}){where}",
                          list(shape))
    derived = [("output", big.output_shape), ("attention scores (B, N, T, S)", big.scores_shape)]
    derived += [(f"weight `{n}`", shape) for n, shape in big.weight_shapes(use_bias=layer.use_bias,
                                                                          use_gate=layer.use_gate)]
    for what, shape in derived:
        count = math.prod(shape)
        if count > INT64_MAX:
            raise SpecError(f"The {what} {shape}{where} would hold {count} elements, more than int64 "
                            f"indexes ({INT64_MAX}); received query={list(call.query)}, "
                            f"value={list(call.value)}, num_heads={layer.num_heads}, key_dim={layer.key_dim}")


def _check_initializer_ranges(layer: LayerSpec, call: CallSpec) -> None:
    """Initializer draws must fit the weights' dtype and the compute dtype they are cast to (float16
    overflows past 65504, also under mixed_float16)."""
    policy = call.dtype_policy
    dtype = min((policy.variable, policy.compute), key=_DTYPE_MAX.__getitem__)
    largest = _DTYPE_MAX[dtype]
    for name in ("kernel_initializer", "bias_initializer"):
        limit = _initializer_limit(getattr(layer, name))
        if limit is not None and limit[1] > largest:
            arg, reach = limit
            config = getattr(layer, name)["config"]
            raise invalid(f"{name}.{arg}", f"a value whose draws fit the weights' dtype {dtype} (they "
                          f"reach {reach:.3g}, past its largest {largest:.5g})",
                          config.get(arg, _INITIALIZER_DEFAULTS[arg]))


def _decoder_kind(call: CallSpec, geo: Geometry) -> str:
    """"self" (new tokens extend the cache) or "cross" (the cache holds an encoder's keys and values,
    `value` (B, S, D) with S = cache_max_length, and is only read)."""
    if not call.use_causal_mask and geo.value_shape[1] == call.cache_max_length and geo.rank == 3:
        return "cross"
    return "self"


def _check_decoder(layer: LayerSpec, call: CallSpec, geo: Geometry,
                   mask_shape: tuple[int, ...] | None) -> None:
    """A decoder build (`cache_max_length`): causal self-attention over 3-D tokens whose keys and
    values fit one `(B, 2, S, N, H)` cache, as keras_hub's CachedMultiHeadAttention holds them; or
    cross-attention over a static cache of an encoder's S positions (`value` (B, S, D), no causal
    mask), as keras_hub's TransformerDecoder caches its cross-attention."""
    S = call.cache_max_length
    what = "`cache_max_length` (a decoder build)"
    if geo.rank != 3 or geo.attention_axes != (1,):
        raise SpecError(f"{what} needs 3-D inputs (B, T, E) attending over axis 1; received "
                        f"query={list(call.query)}, attention_axes={list(geo.attention_axes)}")
    if geo.key_dim != geo.value_dim:
        raise invalid("value_dim", f"the key_dim {geo.key_dim} under {what}: the cache stacks keys and "
                      "values in one (B, 2, S, N, H) tensor, as keras_hub does", geo.value_dim)
    cross = _decoder_kind(call, geo) == "cross"
    if not cross and geo.value_shape[:2] != geo.query_shape[:2]:
        raise SpecError(f"{what} is self-attention, with `value` holding the same tokens as `query` (same "
                        f"batch and length), or cross-attention over a static cache, with `value` the "
                        f"encoder's S = cache_max_length positions and no causal mask. Received: "
                        f"query={list(call.query)}, value={list(call.value)}, use_causal_mask="
                        f"{str(call.use_causal_mask).lower()}")
    if not cross and not call.use_causal_mask:
        raise SpecError(f"{what} decodes causally: set [call] use_causal_mask = true, so the whole-"
                        "sequence call computes what prefill and decode steps compute")
    if not cross and geo.query_shape[1] > S:  # type: ignore[operator]
        raise invalid("cache_max_length", f"at least the chunk length T = {geo.query_shape[1]} of `query`",
                      S)
    for flag, reason in ((call.return_attention_scores, "return_attention_scores (the scores of a step "
                          "span the cache)"), (call.training and layer.dropout > 0, "training with dropout"),
                         (bool(call.dynamic), "`dynamic` (the cache fixes the batch; a step takes any "
                          "number of tokens up to T)"), (layer.masking == "keras2", 'masking = "keras2"'),
                         (cross and layer.sliding_window is not None, "sliding_window in cross-attention")):
        if flag:
            raise SpecError(f"{what} cannot be combined with {reason}")
    cache = math.prod((geo.query_shape[0], 2, S, geo.num_heads, geo.key_dim))  # type: ignore[arg-type]
    if cache > INT64_MAX:
        raise invalid("cache_max_length", f"a length whose cache (B, 2, S, N, H) has an element count that "
                      f"fits int64 (at most {INT64_MAX}); this one holds {cache}", S)
    if mask_shape is not None and mask_shape != geo.full_mask_shape:
        raise SpecError(f"{what} takes its padding mask as `attention_mask = true` ((B, t, S) in a step, "
                        f"{geo.full_mask_shape} in the whole call); received {list(mask_shape)}")


def _check_dynamic(call: CallSpec, geo: Geometry, mask_shape: tuple[int, ...] | None) -> None:
    if "seq" in call.dynamic and (geo.attention_axes != (1,)):
        raise SpecError("`dynamic` seq needs attention_axes=(1,): the sequence axis is input axis 1")
    if mask_shape is not None and mask_shape != geo.full_mask_shape:
        raise SpecError(f"a dynamic spec declares its mask as `attention_mask = true` "
                        f"({geo.full_mask_shape}); received {list(mask_shape)}")
    if "batch" in call.dynamic and call.max_batch is None:
        raise SpecError("`dynamic` includes batch, so [call] needs `max_batch`")
    if "seq" in call.dynamic and call.max_seq is None:
        raise SpecError("`dynamic` includes seq, so [call] needs `max_seq`")
    # The declared shape is one the bundle serves (and verifies): the maxima cover it.
    if "batch" in call.dynamic and call.max_batch < geo.query_shape[0]:  # type: ignore[operator]
        raise invalid("max_batch", f"at least the declared batch {geo.query_shape[0]} (query "
                      f"{list(geo.query_shape)})", call.max_batch)
    if "seq" in call.dynamic:
        longest = max(geo.query_shape[1], geo.value_shape[1])
        if call.max_seq < longest:  # type: ignore[operator]
            raise invalid("max_seq", f"at least the declared sequence lengths (query {geo.query_shape[1]}, "
                          f"value {geo.value_shape[1]})", call.max_seq)
