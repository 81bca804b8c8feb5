"""The callable layer: `CompiledLayer` checks a call's arguments against the compiled signature
(shape and dtype before values), dispatches to the right shape bucket (padding keys under the mask
and slicing padded queries away), and runs the module on its device with NumPy arrays in and out."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .decoder import DecoderMixin
from .devices import _first_line, load_module
from .errors import CallError, MhagenRuntimeError

__all__ = ["CompiledLayer", "np_dtype", "expand_mask_shape", "free_dims"]


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def expand_mask_shape(shape: Sequence[int], scores_rank: int, num_axes: int) -> tuple[int, ...]:
    """Keras' mask expansion: unit axes inserted at -(2k+1) until the mask has the scores' rank."""
    out = list(shape)
    pos = -2 * num_axes - 1
    while len(out) < scores_rank:
        index = len(out) + 1 + pos
        if index < 0:
            break
        out.insert(index, 1)
    return tuple(out)



def free_dims(interface: Mapping[str, Any], name: str, shape: Sequence[int]) -> list[str]:
    """One input's axes as text, the free ones marked: `<=N` up to a dynamic maximum, `*` a batch of
    any size (served in chunks of the compiled one). Batch is axis 0; the sequence is axis 1, or the
    last two axes of the mask.

        free_dims(interface, "query", (8, 256, 64))   # ['<=8', '<=256', '64']
    """
    dims = [str(d) for d in shape]
    if name == "dropout_key" or not dims:
        return dims
    dynamic = interface.get("dynamic", [])
    if "batch" in dynamic:
        dims[0] = f"<={interface['max_batch']}"
    elif not interface.get("dropout"):      # dropout's random mask spans the whole batch: fixed
        dims[0] = "*"
    if "seq" in dynamic:
        for axis in ((-2, -1) if name == "attention_mask" else (1,)):
            dims[axis] = f"<={interface['max_seq']}"
    return dims


class CompiledLayer(DecoderMixin):
    """A compiled, loaded attention layer. Call it like the Keras layer, with NumPy arrays.

    `layer(query, value, key=None, attention_mask=None, *, dropout_key=None)` returns the output
    `(B, T, E)`, or `(output, scores)` when the spec asks for scores. `attention_mask` may have any
    shape that broadcasts (Keras-style) to the declared one. When the spec trains with dropout, each
    call draws the key `[seed, counter]` as Keras' SeedGenerator does, unless `dropout_key` is given.

    `interface` is the call description a bundle's manifest holds (see `mhagen.trace.interface`).
    A decoder build also has `prefill`, `decode` and `decoder` (`mhagen.runtime.decoder`).
    """

    def __init__(self, interface: Mapping[str, Any], vmfb: bytes, target: Any, *, stablehlo: str = "",
                 parameters: Any = None, spec: Any = None, compile_seconds: float = 0.0):
        self.interface = dict(interface)
        self.spec = spec
        self.target = target
        self.stablehlo = stablehlo
        self.vmfb = vmfb
        self.compile_seconds = compile_seconds
        self.inputs = tuple(_Sig(**s) for s in interface["inputs"])
        self.outputs = tuple(_Sig(**s) for s in interface["outputs"])
        self._functions = sorted(interface["functions"], key=lambda f: (f.get("batch") or 0, f.get("seq") or 0))
        driver = target["driver"] if isinstance(target, Mapping) else target.driver
        self._device, (self._context, self._table) = load_module(vmfb, driver, parameters=parameters)
        steps = (interface.get("decoder") or {}).get("steps", [])
        for fn in [*self._functions, *steps]:   # an interface naming what the module lacks is corrupt
            try:
                self._table[fn["name"]]
            except (KeyError, AttributeError, RuntimeError, ValueError):
                raise MhagenRuntimeError(f"the module has no function `{fn['name']}` that its interface "
                                         "names (a corrupt or mismatched interface)") from None
        self._counter = 0
        self._lock = threading.Lock()
        self.verified = False            # set by `mhagen.build` once the oracle agreed

    @property
    def target_name(self) -> str:
        return self.target["name"] if isinstance(self.target, Mapping) else self.target.name

    def __repr__(self) -> str:
        """The call signature with its free axes: `<=N` up to a dynamic maximum, `*` any size."""
        sig = ", ".join(f"{t.name}({', '.join(free_dims(self.interface, t.name, t.shape))})"
                        for t in self.inputs)
        chunked = not ("batch" in self.interface.get("dynamic", []) or self.interface.get("dropout"))
        note = f"; * = any batch, run {self.inputs[0].shape[0]} at a time" if chunked else ""
        return f"<CompiledLayer target={self.target_name} {sig}{note}>"

    # -- argument checking ----------------------------------------------------------------------
    def _array(self, name: str, value: Any, dtype: str) -> np.ndarray:
        array = np.asarray(value)
        want = np_dtype(dtype)
        if array.dtype != want:
            floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
            if not floating:
                raise CallError(f"`{name}` has dtype {array.dtype}, expected {dtype} "
                                "(or another floating dtype, which is cast)")
            array = array.astype(want)
        return array

    def _shapes(self, arrays: dict[str, np.ndarray]) -> tuple[int, int | None]:
        """Check shapes against the signature; returns the actual (batch, seq)."""
        dynamic = self.interface.get("dynamic", [])
        by_name = {s.name: s for s in self.inputs}
        batch = None
        for name, array in arrays.items():
            sig = by_name[name]
            if not dynamic:
                if array.shape != sig.shape:
                    raise CallError(f"`{name}` has shape {array.shape}, expected {sig.shape}")
                continue
            if array.ndim != len(sig.shape):
                raise CallError(f"`{name}` has rank {array.ndim} (shape {array.shape}), expected rank "
                                f"{len(sig.shape)} like {sig.shape}")
            free = {0} if "batch" in dynamic else set()
            if "seq" in dynamic:
                free.add(1)
            fixed = [i for i in range(array.ndim) if i not in free]
            if any(array.shape[i] != sig.shape[i] for i in fixed):
                pattern = ", ".join("*" if i in free else str(d) for i, d in enumerate(sig.shape))
                raise CallError(f"`{name}` has shape {array.shape}, expected ({pattern}) (* = any size)")
            batch = array.shape[0] if batch is None else batch
            if array.shape[0] != batch:
                raise CallError(f"`{name}` has batch {array.shape[0]}, but `query` has batch {batch}")
        q = arrays["query"]
        b = q.shape[0]
        s = max(q.shape[1], arrays["value"].shape[1]) if "seq" in dynamic else None
        if "batch" in dynamic and b > self.interface["max_batch"]:
            raise CallError(f"batch {b} is larger than this build's max_batch {self.interface['max_batch']}")
        if "seq" in dynamic and s is not None and s > self.interface["max_seq"]:
            raise CallError(f"sequence length {s} is larger than this build's max_seq "
                            f"{self.interface['max_seq']}")
        return b, s

    def _function_for(self, batch: int, seq: int | None) -> dict[str, Any]:
        if not self.interface.get("dynamic"):
            return self._functions[0]
        for fn in self._functions:
            if (fn.get("batch") is None or fn["batch"] >= batch) and (seq is None or fn["seq"] >= seq):
                return fn
        raise CallError(f"no compiled bucket holds batch {batch}, seq {seq}")  # guarded by _shapes

    def _mask(self, value: Any, declared: tuple[int, ...]) -> np.ndarray:
        info = self.interface["mask"]
        mask = np.asarray(value)
        if mask.dtype == object or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
            raise CallError(f"`attention_mask` has dtype {mask.dtype}, expected bool or numbers")
        rank, k = info["scores_rank"], info["num_axes"]
        target = expand_mask_shape(declared, rank, k)
        try:
            full = np.broadcast_to((mask != 0).reshape(expand_mask_shape(mask.shape, rank, k)), target)
        except ValueError:
            raise CallError(f"`attention_mask` has shape {mask.shape}, which does not broadcast to "
                            f"the declared mask {tuple(declared)}") from None
        return full.reshape(declared)

    def _dropout_key(self, dropout_key: Any) -> np.ndarray:
        if dropout_key is not None:
            key = np.asarray(dropout_key)
            if key.shape == ():
                key = np.array([0, int(key)])      # an int seed, as jax.random.PRNGKey(seed)
            if key.shape != (2,) or not np.issubdtype(key.dtype, np.integer):
                raise CallError(f"`dropout_key` has shape {key.shape} and dtype {key.dtype}, "
                                "expected 2 unsigned integers or an int")
            return key.astype(np.uint32)
        with self._lock:
            counter = self._counter
            self._counter += 1
        return np.array([self.interface["dropout"]["seed"], counter], dtype=np.uint32)

    def prepare(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                dropout_key: Any = None) -> tuple[dict[str, Any], list[np.ndarray], tuple[int, int | None]]:
        """Check the call's arguments; returns (function, host input arrays, actual (batch, seq))."""
        names = {t.name for t in self.inputs}
        if key is not None and "key" not in names:
            raise CallError("`key` was given, but the spec declares no key input (set [call] key)")
        if attention_mask is not None and "attention_mask" not in names:
            raise CallError("`attention_mask` was given, but the spec declares no mask "
                            "(set [call] attention_mask = true)")
        if dropout_key is not None and not self.interface.get("dropout"):
            raise CallError("`dropout_key` was given, but this layer applies no dropout "
                            "(the spec sets no dropout rate or does not train)")
        if query is None or value is None:
            raise CallError("`query` and `value` are required")
        dt = self.interface["compute_dtype"]
        arrays = {"query": self._array("query", query, dt), "value": self._array("value", value, dt)}
        if "key" in names:
            arrays["key"] = self._array("key", value if key is None else key, dt)
        batch, seq = self._shapes(arrays)
        fn = self._function_for(batch, seq)
        q, v = arrays["query"], arrays["value"]
        t_len, s_len = q.shape[1], v.shape[1]
        out: list[np.ndarray] = []
        for sig in fn["inputs"]:
            name, shape, dtype = sig["name"], tuple(sig["shape"]), sig["dtype"]
            if name in arrays:
                out.append(_pad(arrays[name], shape))
            elif name == "attention_mask":
                declared = self._actual_mask_shape(shape, batch, t_len, s_len)
                mask = (np.ones(declared, bool) if attention_mask is None
                        else self._mask(attention_mask, declared))
                out.append(_pad(mask, shape).astype(np_dtype(dtype)))   # padded keys stay masked
            elif name == "dropout_key":
                out.append(self._dropout_key(dropout_key))
            else:
                raise CallError(f"module input `{name}` has no source")  # a corrupt interface
        return fn, out, (batch, seq)

    def _actual_mask_shape(self, bucket_shape: tuple[int, ...], batch: int, t_len: int,
                           s_len: int) -> tuple[int, ...]:
        declared = tuple(self.interface["mask"]["shape"])
        dynamic = self.interface.get("dynamic", [])
        if not dynamic:
            return declared
        shape = list(declared)
        if "batch" in dynamic:
            shape[0] = batch
        if "seq" in dynamic:
            shape[-2], shape[-1] = t_len, s_len
        return tuple(shape)

    # -- running --------------------------------------------------------------------------------
    def run(self, fn: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one compiled function on prepared host arrays; returns host arrays (unsliced)."""
        device = self._device
        args = [device.to_device(np.ascontiguousarray(a)) for a in arrays]
        try:
            results = self._table[fn["name"]](*args)
        except (RuntimeError, ValueError) as exc:
            raise MhagenRuntimeError(f"IREE runtime failed running on `{self.target_name}`: "
                                     f"{_first_line(exc)}") from None
        if not isinstance(results, (list, tuple)):
            results = [results]
        return [device.to_host(r) for r in results]

    def __call__(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None, *,
                 dropout_key: Any = None) -> Any:
        declared = self.inputs[0].shape[0]
        batch = np.shape(query)[0] if np.ndim(query) >= 1 else declared
        if "batch" not in self.interface.get("dynamic", []) and batch != declared:
            return self._call_in_chunks(query, value, key, attention_mask, dropout_key=dropout_key)
        fn, arrays, (batch, seq) = self.prepare(query, value, key, attention_mask, dropout_key=dropout_key)
        outs = self.run(fn, arrays)
        if self.interface.get("dynamic"):
            t_len, s_len = np.shape(query)[1], np.shape(value)[1]
            outs = [_slice(o, batch, t_len if seq is not None else None, s_len if seq is not None else None, i == 1)
                    for i, o in enumerate(outs)]
        return tuple(outs) if len(outs) > 1 else outs[0]


    def _call_in_chunks(self, query: Any, value: Any, key: Any, attention_mask: Any, *,
                        dropout_key: Any) -> Any:
        """Any batch on a module compiled for batch B: the rows run B at a time (the last chunk
        padded with zero rows, which are dropped), since every batch row is computed alone."""
        declared = self.inputs[0].shape[0]
        if self.interface.get("dropout"):
            raise CallError(f"`query` has batch {np.shape(query)[0]}, but this layer trains with dropout, whose "
                            f"random mask depends on the whole batch: call it with batch {declared}, or "
                            "build with [call] dynamic = [\"batch\"]")
        q, v = np.asarray(query), np.asarray(value)
        k = None if key is None else np.asarray(key)
        sigs = {s.name: s for s in self.inputs}
        seq_free = "seq" in self.interface.get("dynamic", [])   # axis 1 is checked by each chunk's call
        for name, array in (("query", q), ("value", v), ("key", k)):
            sig = sigs.get(name)
            if array is not None and sig is not None and (
                    array.ndim != len(sig.shape) or any(
                        a != d for i, (a, d) in enumerate(zip(array.shape, sig.shape)) if i > (1 if seq_free else 0))):
                dims = free_dims(self.interface, sig.name, sig.shape)
                raise CallError(f"`{sig.name}` has shape {array.shape}, expected ({', '.join(dims)}) "
                                "(* = any batch)")
        b = q.shape[0]
        for name, array in (("value", v), ("key", k)):
            if array is not None and (array.ndim < 1 or array.shape[0] != b):
                raise CallError(f"`{name}` has shape {array.shape}, but `query` has batch {b}; "
                                "they must have the same batch")
        mask = None if attention_mask is None else np.asarray(attention_mask)
        mask_rows = False
        if mask is not None and self.interface.get("mask"):
            # Axis 0 of the mask as Keras expands it (a lower-rank mask gains unit axes) is the batch.
            info = self.interface["mask"]
            expanded = expand_mask_shape(mask.shape, info["scores_rank"], info["num_axes"])
            if len(expanded) == info["scores_rank"] and expanded[0] not in (1, b):
                raise CallError(f"`attention_mask` has shape {mask.shape}: its batch {expanded[0]} is "
                                f"neither 1 nor the batch of `query` ({b})")
            if len(expanded) == info["scores_rank"] and mask.ndim < len(expanded):
                mask = mask.reshape(expanded)
            mask_rows = len(expanded) == info["scores_rank"] and expanded[0] == b and b != 1
        if b == 0:
            probe = self._call_in_chunks(np.zeros((1, *q.shape[1:]), q.dtype), np.zeros((1, *v.shape[1:]), v.dtype),
                                         None if k is None else np.zeros((1, *k.shape[1:]), k.dtype),
                                         None, dropout_key=dropout_key)
            probes = list(probe) if isinstance(probe, tuple) else [probe]
            empty = [p[:0] for p in probes]
            return tuple(empty) if len(empty) > 1 else empty[0]

        def rows(array: np.ndarray | None, start: int, fill: Any = 0) -> np.ndarray | None:
            if array is None:
                return None
            part = array[start:start + declared]
            if part.shape[0] < declared:
                pad = [(0, declared - part.shape[0])] + [(0, 0)] * (part.ndim - 1)
                part = np.pad(part, pad, constant_values=fill)
            return part

        pieces: list[list[np.ndarray]] = []
        for start in range(0, b, declared):
            result = self(rows(q, start), rows(v, start), rows(k, start),
                          rows(mask, start, fill=1) if mask_rows else mask, dropout_key=dropout_key)
            outs = list(result) if isinstance(result, tuple) else [result]
            pieces.append([o[: min(declared, b - start)] for o in outs])
        joined = [np.concatenate(parts, axis=0) for parts in zip(*pieces)]
        return tuple(joined) if len(joined) > 1 else joined[0]


class _Sig:
    def __init__(self, name: str, shape: Sequence[int], dtype: str):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    def __repr__(self) -> str:
        return f"{self.name}{self.shape}:{self.dtype}"


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == shape:
        return array
    pad = [(0, s - a) for a, s in zip(array.shape, shape)]
    return np.pad(array, pad)


def _slice(array: np.ndarray, batch: int, t_len: int | None, s_len: int | None, scores: bool) -> np.ndarray:
    """Drop padding: batch on axis 0; queries on axis 1 (outputs) or -2 (scores); keys on -1 (scores)."""
    index: list[Any] = [slice(None)] * array.ndim
    index[0] = slice(0, batch)
    if t_len is not None:
        if scores:
            index[-2] = slice(0, t_len)
            index[-1] = slice(0, s_len)
        else:
            index[1] = slice(0, t_len)
    return np.ascontiguousarray(array[tuple(index)])

