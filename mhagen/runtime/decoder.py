"""Autoregressive decoding: a key/value cache that stays on the device between calls.

A decoder build (`[call] cache_max_length = S`) carries step entry points (see `mhagen.decode`):
each writes the new tokens' keys and values into the caller's cache buffer in place and attends
causally over it. This module drives them:

    out, cache = layer.prefill(prompt, prompt)                 # (B, T0, E), KVCache (B, 2, S, N, H)
    out, cache = layer.decode(token, token, cache=cache)       # next position: cache.length
    np.asarray(cache)                                          # keras_hub's layout, on the host

    with layer.decoder() as d:                                 # the same, holding cache and index
        d.prefill(prompt)
        out = d.step(token)

Only the new tokens, their output and two int32 scalars (index, count) cross to the device per
step; the cache is updated where it lives and is read back only by `np.asarray(cache)`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from .devices import _first_line
from .errors import CallError, MhagenRuntimeError

__all__ = ["KVCache", "Decoder", "DecoderMixin"]


class KVCache:
    """A decoder's key/value cache on the device: keys then values, projected, `(B, 2, S, N, H)`.

    Steps update it in place (a step given this cache changes it and returns it). `length` is one
    past the last position the latest step wrote, where the next `decode` continues by default.
    `np.asarray(cache)` copies it to the host in keras_hub's layout.
    """

    def __init__(self, layer: "DecoderMixin", buffer: Any, length: int = 0):
        self._layer = layer
        self._buffer = buffer
        self.length = length
        # Steps on one cache run one at a time: each reads what the previous one wrote.
        self._lock = threading.Lock()
        info = layer.interface["decoder"]
        self.shape = tuple(info["cache_shape"])
        self.dtype = np.dtype(_np_dtype(info["dtype"]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """A host copy, `(B, 2, S, N, H)`."""
        return self._layer._device.to_host(self._buffer)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    def __repr__(self) -> str:
        return (f"<KVCache shape={self.shape} dtype={self.dtype} length={self.length} on "
                f"{self._layer.target_name}>")


def _np_dtype(name: str) -> Any:
    from .layer import np_dtype

    return np_dtype(name)


class DecoderMixin:
    """`prefill`, `decode` and `decoder` for a `CompiledLayer` whose interface has a decoder."""

    interface: dict[str, Any]
    _device: Any
    _table: Any

    @property
    def target_name(self) -> str:  # pragma: no cover - CompiledLayer defines it
        raise NotImplementedError

    def _decoder_info(self) -> Mapping[str, Any]:
        info = self.interface.get("decoder")
        if not info:
            raise CallError("this layer is not a decoder build: prefill and decode need a spec with "
                            "[call] cache_max_length = S")
        return info

    def new_cache(self) -> KVCache:
        """A zeroed cache on the device, as keras_hub starts generation with."""
        info = self._decoder_info()
        return KVCache(self, self._device.zeros(info["cache_shape"], _np_dtype(info["dtype"])))

    def prefill(self, query: Any, value: Any, key: Any = None, attention_mask: Any = None
                ) -> tuple[np.ndarray, KVCache]:
        """Self-attention: project the T0 prompt tokens into a fresh cache at positions 0..T0-1 and
        return their causal output `(B, T0, E)` and the cache. Cross-attention: the cache of the
        encoder's output `value` `(B, S, D)` (`cross_cache`), and the queries' output over it."""
        if self._decoder_info().get("kind") == "cross":
            cache = self.cross_cache(value, key)
            return self.decode(query, attention_mask=attention_mask, cache=cache)
        cache = self.new_cache()
        return self.decode(query, value, key, attention_mask, cache=cache, index=0)

    def cross_cache(self, value: Any, key: Any = None) -> KVCache:
        """A cross-attention decoder's static cache: the encoder output's projected keys and values,
        `(B, 2, S, N, H)`, computed on the device once; steps only read it."""
        info = self._decoder_info()
        if info.get("kind") != "cross":
            raise CallError("cross_cache is for a cross-attention decoder build (value (B, S, D) with S = "
                            "cache_max_length, no causal mask); this one is self-attention")
        fill = next((s for s in info["steps"] if s.get("kind") == "fill"), None)
        if fill is None:
            raise CallError("this build has no cross_cache entry point (a corrupt interface)")
        if key is not None and not info["key"]:
            raise CallError("`key` was given, but the spec declares no key input (set [call] key)")
        args = []
        for sig in fill["inputs"]:
            raw = value if sig["name"] == "value" or key is None else key
            array = np.asarray(raw)
            want = tuple(sig["shape"])
            if array.shape != want or not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
                raise CallError(f"`{sig['name']}` has shape {array.shape} and dtype {array.dtype}, expected "
                                f"{want} floats (the encoder's output)")
            args.append(self._device.to_device(np.ascontiguousarray(array.astype(_np_dtype(sig["dtype"])))))
        try:
            result = self._table[fill["name"]](*args)
        except (RuntimeError, ValueError) as exc:
            raise MhagenRuntimeError(f"IREE runtime failed running `{fill['name']}` on "
                                     f"`{self.target_name}`: {_first_line(exc)}") from None
        return KVCache(self, result, length=info["cache_shape"][2])

    def decode(self, query: Any, value: Any = None, key: Any = None, attention_mask: Any = None, *,
               cache: Any, index: int | None = None) -> tuple[np.ndarray, KVCache]:
        """Self-attention: write t >= 1 new tokens at `index .. index+t-1` (default: `cache.length`)
        and attend causally to positions `0 .. index+j` for token j, under an optional `(B, t, S)`
        padding mask; `value` defaults to `query`. Cross-attention: attend over the static cache
        (no value, key or index: the cache holds the encoder's keys and values).

        `cache`: a `KVCache` of this layer (updated in place and returned), or an array in the
        `(B, 2, S, N, H)` layout (e.g. from keras_hub), copied to the device (the array itself is
        not changed). Returns (output `(B, t, E)`, cache).
        """
        info = self._decoder_info()
        B, _, S, _, _ = info["cache_shape"]
        dtype = _np_dtype(info["dtype"])
        if index is None and not isinstance(cache, KVCache) and cache is not None and info.get("kind") != "cross":
            raise CallError("`index` is required with a cache given as an array: the position of the first "
                            "new token (a KVCache knows its own, cache.length)")
        cache = self._as_cache(cache, info)
        if info.get("kind") == "cross":
            return self._cross(query, value, key, attention_mask, cache, index, info, dtype), cache
        if value is None:
            value = query
        if index is not None and (isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer))):
            raise CallError(f"`index` must be an int position in the cache, received {index!r}")
        arrays = self._tokens(query, value, key, info, dtype)
        t = arrays["query"].shape[1]
        mask = self._step_mask(attention_mask, info, t)
        steps = [s for s in info["steps"] if s.get("kind", "self") == "self"]
        chunk = info["chunk"]
        outs: list[np.ndarray] = []
        pos = 0
        with cache._lock:     # the default index is read, checked and advanced under the same lock
            index = cache.length if index is None else int(index)
            if index < 0 or index + t > S:
                raise CallError(f"{t} new token(s) at index {index} do not fit the cache length {S} "
                                f"(positions 0..{S - 1})")
            while pos < t:
                at = index + pos
                size = chunk if (chunk > 1 and t - pos > 1 and at + chunk <= S) else 1
                n = min(size, t - pos)
                step = next((s for s in steps if s["t"] == size and s["length"] >= at + n), None)
                if step is None:
                    raise CallError(f"this build has no step of {size} token(s) reading {at + n} positions "
                                    "(a corrupt interface)")
                outs.append(self._run_step(step, arrays, mask, pos, n, at, cache))
                pos += n
            cache.length = index + t
        return np.concatenate(outs, axis=1), cache

    def decoder(self, *, batch: int | None = None) -> "Decoder":
        """A context holding one cache and its position: `with layer.decoder() as d: d.prefill(x);
        d.step(token)`. `batch`, when given, must be the build's batch (the cache fixes it)."""
        info = self._decoder_info()
        if batch is not None and batch != info["cache_shape"][0]:
            raise CallError(f"`batch` {batch} is not this build's batch {info['cache_shape'][0]}: a decoder "
                            "build serves the batch of its spec's `query`")
        return Decoder(self)

    def _cross(self, query: Any, value: Any, key: Any, attention_mask: Any, cache: KVCache, index: Any,
               info: Mapping[str, Any], dtype: Any) -> np.ndarray:
        if value is not None or key is not None or index is not None:
            raise CallError("a cross-attention decoder reads keys and values from its static cache: "
                            "pass no value, key or index (make the cache with cross_cache(encoder_output))")
        B, _, S, _, _ = info["cache_shape"]
        steps = sorted((s for s in info["steps"] if s.get("kind") == "cross"), key=lambda s: -s["t"])
        if not steps or steps[-1]["t"] != 1:
            raise CallError("this build has no one-token cross step (a corrupt interface)")
        sig = {x["name"]: x for x in steps[-1]["inputs"]}["query"]
        q = np.asarray(query)
        want = tuple(sig["shape"])
        if q.ndim != 3 or q.shape[0] != want[0] or q.shape[2] != want[2] or q.shape[1] < 1 or not (
                np.issubdtype(q.dtype, np.floating) or q.dtype.name == "bfloat16"):
            raise CallError(f"`query` has shape {q.shape} and dtype {q.dtype}, expected ({want[0]}, t, "
                            f"{want[2]}) floats with t >= 1")
        t = q.shape[1]
        mask = self._step_mask(attention_mask, info, t)
        arrays = {"query": q.astype(dtype)}
        outs, pos = [], 0
        while pos < t:       # query rows are independent: chunks of the largest step, the last padded
            step = steps[0] if t - pos > 1 else steps[-1]
            n = min(step["t"], t - pos)
            outs.append(self._run_step(step, arrays, mask, pos, n, 0, cache))
            pos += n
        return np.concatenate(outs, axis=1)

    # -- helpers --------------------------------------------------------------------------------
    def _as_cache(self, cache: Any, info: Mapping[str, Any]) -> KVCache:
        if isinstance(cache, KVCache):
            if cache._layer is not self:
                raise CallError("`cache` belongs to another compiled layer; pass np.asarray(cache) to "
                                "copy it here")
            return cache
        if cache is None:
            raise CallError("`cache` is required: the cache from prefill (or a previous decode), or an "
                            f"array of shape {tuple(info['cache_shape'])}")
        array = np.asarray(cache)
        shape = tuple(info["cache_shape"])
        if array.shape != shape:
            raise CallError(f"`cache` has shape {array.shape}, expected {shape} (B, 2, S, N, H)")
        floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
        if not floating:
            raise CallError(f"`cache` has dtype {array.dtype}, expected {info['dtype']}")
        with np.errstate(over="ignore"):
            host = np.ascontiguousarray(array.astype(_np_dtype(info["dtype"])))
        overflow = np.isinf(host.astype(np.float32)) & np.isfinite(array.astype(np.float32))
        if overflow.any():
            where = tuple(int(i) for i in np.argwhere(overflow)[0])
            raise CallError(f"`cache` holds {float(array[where]):g} at {where}, past the range of {info['dtype']}")
        return KVCache(self, self._device.to_device(host))

    def _tokens(self, query: Any, value: Any, key: Any, info: Mapping[str, Any], dtype: Any
                ) -> dict[str, np.ndarray]:
        first = info["steps"][0]["inputs"]
        sigs = {s["name"]: s for s in first}
        if key is not None and not info["key"]:
            raise CallError("`key` was given, but the spec declares no key input (set [call] key)")
        given = {"query": query, "value": value}
        if info["key"]:
            given["key"] = value if key is None else key
        out: dict[str, np.ndarray] = {}
        t = None
        for name, raw in given.items():
            if raw is None:
                raise CallError(f"`{name}` is required")
            array = np.asarray(raw)
            if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
                raise CallError(f"`{name}` has dtype {array.dtype}, expected {info['dtype']}")
            want = tuple(sigs[name]["shape"])
            if array.ndim != 3 or array.shape[0] != want[0] or array.shape[2] != want[2] or array.shape[1] < 1:
                raise CallError(f"`{name}` has shape {array.shape}, expected ({want[0]}, t, {want[2]}) "
                                "with t >= 1 new tokens")
            if t is not None and array.shape[1] != t:
                raise CallError(f"`{name}` has {array.shape[1]} tokens, but `query` has {t}")
            t = array.shape[1]
            # The same tokens as query and value (self-attention) stay one array, sent once a step.
            same = next((out[n] for n, r in given.items() if n in out and r is raw), None)
            out[name] = same if same is not None else array.astype(dtype)
        return out

    @staticmethod
    def _step_mask(attention_mask: Any, info: Mapping[str, Any], t: int) -> np.ndarray | None:
        """The `(B, t, S)` padding mask as booleans, None when not given."""
        if attention_mask is None:
            return None
        if not info["mask"]:
            raise CallError("`attention_mask` was given, but the spec declares no mask "
                            "(set [call] attention_mask = true)")
        B, _, S, _, _ = info["cache_shape"]
        mask = np.asarray(attention_mask)
        if mask.dtype == object or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
            raise CallError(f"`attention_mask` has dtype {mask.dtype}, expected bool or numbers")
        try:
            return np.broadcast_to(mask != 0, (B, t, S))
        except ValueError:
            raise CallError(f"`attention_mask` has shape {mask.shape}, expected ({B}, {t}, {S}) "
                            "(batch, new tokens, cache positions)") from None

    def _run_step(self, step: Mapping[str, Any], arrays: Mapping[str, np.ndarray], mask: np.ndarray | None,
                  pos: int, n: int, at: int, cache: KVCache) -> np.ndarray:
        size = step["t"]
        device = self._device
        args = []
        sent: dict[int, Any] = {}
        for sig in step["inputs"]:
            name, shape = sig["name"], tuple(sig["shape"])
            if name in arrays:
                if id(arrays[name]) not in sent:
                    rows = arrays[name][:, pos:pos + n]
                    if n < size:
                        rows = np.pad(rows, [(0, 0), (0, size - n), (0, 0)])
                    sent[id(arrays[name])] = device.to_device(np.ascontiguousarray(rows))
                args.append(sent[id(arrays[name])])
            elif name == "attention_mask":
                rows = np.ones(shape, np.int32)
                if mask is not None:
                    rows[:, :n] = mask[:, pos:pos + n]
                args.append(device.to_device(rows))
            elif name == "index":
                args.append(device.to_device(np.array(at, np.int32)))
            elif name == "count":
                args.append(device.to_device(np.array(n, np.int32)))
            elif name == "cache":
                args.append(cache._buffer)
            else:
                raise CallError(f"step input `{name}` has no source")  # a corrupt interface
        try:
            results = self._table[step["name"]](*args)
        except (RuntimeError, ValueError) as exc:
            raise MhagenRuntimeError(f"IREE runtime failed running `{step['name']}` on "
                                     f"`{self.target_name}`: {_first_line(exc)}") from None
        first = results[0] if isinstance(results, (list, tuple)) else results
        return device.to_host(first)[:, :n]


class Decoder:
    """One generation: a cache and the next position. `value` defaults to `query` (self-attention)."""

    def __init__(self, layer: DecoderMixin):
        self.layer = layer
        self.cache: KVCache | None = None

    @property
    def index(self) -> int:
        return 0 if self.cache is None else self.cache.length

    @property
    def _cross(self) -> bool:
        return self.layer.interface["decoder"].get("kind") == "cross"

    def prefill(self, query: Any, value: Any = None, key: Any = None, attention_mask: Any = None) -> np.ndarray:
        """Self-attention: the prompt (value defaults to it). Cross-attention: the first queries and
        the encoder's output `value` (B, S, D), required."""
        if value is None and self._cross:
            raise CallError("a cross-attention decoder's prefill needs the encoder output: prefill(query, value)")
        out, self.cache = self.layer.prefill(query, query if value is None else value, key, attention_mask)
        return out

    def step(self, query: Any, value: Any = None, key: Any = None, attention_mask: Any = None) -> np.ndarray:
        if self.cache is None:
            raise CallError("call prefill(prompt) before step(tokens)")
        if self._cross:
            out, _ = self.layer.decode(query, attention_mask=attention_mask, cache=self.cache)
        else:
            out, _ = self.layer.decode(query, query if value is None else value, key, attention_mask,
                                       cache=self.cache)
        return out

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cache = None          # the device buffer goes with its last reference
