"""Shrinking a failing spec: the smallest spec that still fails the same way.

Greedy, first improvement: every candidate is one simplification of the current spec (a feature
turned off, a rank dropped, a size made 1, halved or made one smaller); the first that is a valid
spec and still fails becomes the current spec, and the search starts over, until no candidate
fails (a local minimum: no single simplification keeps the failure) or the tries run out.

    smaller, tries, minimal = shrink(spec, lambda s: fails_same_way(s))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import SpecError
from ..spec import Spec

__all__ = ["shrink", "candidates"]

# Features, in the order they are turned off (most machinery first), and their "off" values.
_CALL_OFF = (("return_attention_scores", False), ("training", False), ("use_causal_mask", False),
             ("attention_mask", False))
_LAYER_OFF = (("use_gate", False), ("sliding_window", None), ("dropout", 0.0), ("masking", None),
              ("value_dim", None), ("output_shape", None), ("kernel_initializer", "glorot_uniform"),
              ("bias_initializer", "zeros"), ("use_bias", True), ("seed", None))


def _smaller(n: int) -> list[int]:
    """Sizes below n to try, largest step first: 1, n // 2, n - 1."""
    return sorted({m for m in (1, n // 2, n - 1) if 1 <= m < n})


def candidates(spec: Spec) -> Iterator[dict[str, Any]]:
    """Simpler versions of `spec` as dicts (some may be invalid specs; `shrink` skips those)."""
    base = spec.to_dict()
    layer, call = base["layer"], base["call"]

    def with_(table: str, key: str, value: Any) -> dict[str, Any]:
        out = copy.deepcopy(base)
        if value is None:
            out[table].pop(key, None)
        else:
            out[table][key] = value
        return out

    for key, off in _CALL_OFF:
        if call.get(key, off) != off:
            yield with_("call", key, off)
    for key, off in _LAYER_OFF:
        if key in layer and layer[key] != off:
            yield with_("layer", key, off)
    if call.get("dynamic"):
        out = copy.deepcopy(base)
        for key in ("dynamic", "max_batch", "max_seq"):
            out["call"].pop(key, None)
        yield out
        for dim, top in (("batch", "max_batch"), ("seq", "max_seq")):
            if dim in call["dynamic"] and len(call["dynamic"]) == 2:
                out = copy.deepcopy(base)
                out["call"]["dynamic"] = [d for d in call["dynamic"] if d != dim]
                out["call"].pop(top)
                yield out
    if isinstance(call.get("attention_mask"), list):
        yield with_("call", "attention_mask", True)
    if "key" in call:
        yield with_("call", "key", None)
    if "attention_axes" in layer:
        yield with_("layer", "attention_axes", None)
    yield from _drop_axes(base)
    for key in ("num_heads", "key_dim", "value_dim", "sliding_window"):
        if key in layer:
            for n in _smaller(layer[key]):
                yield with_("layer", key, n)
    if "output_shape" in layer:
        dims = layer["output_shape"] if isinstance(layer["output_shape"], list) else [layer["output_shape"]]
        for i, d in enumerate(dims):
            for n in _smaller(d):
                yield with_("layer", "output_shape", dims[:i] + [n] + dims[i + 1:])
    yield from _smaller_shapes(base)
    for key in ("max_batch", "max_seq"):
        if key in call:
            for n in _smaller(call[key]):
                yield with_("call", key, n)
    if call.get("dtype", "float32") != "float32":
        for dtype in ("float32", call["dtype"].replace("mixed_", "")):
            if dtype != call["dtype"]:
                yield with_("call", "dtype", dtype)


def _drop_axes(base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The same layer with one inner axis of the inputs removed (rank 5 -> 4 -> 3)."""
    call, layer = base["call"], base["layer"]
    rank = len(call["query"])
    if rank <= 3:
        return
    for axis in range(1, rank - 1):
        out = copy.deepcopy(base)
        for key in ("query", "value", "key"):
            if key in call:
                out["call"][key] = call[key][:axis] + call[key][axis + 1:]
        if "attention_axes" in layer:
            axes = [a % rank for a in layer["attention_axes"]]
            kept = [a - (a > axis) for a in axes if a != axis]
            if not kept:
                continue
            out["layer"]["attention_axes"] = kept
        if isinstance(call.get("attention_mask"), list):
            out["call"]["attention_mask"] = True
        yield out


def _smaller_shapes(base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each axis of the inputs smaller: the batch and the inner axes of query and value (value and
    key together, and with the query where an axis is not attended over), then the features."""
    call = base["call"]
    rank = len(call["query"])
    others = [k for k in ("value", "key") if k in call]
    for axis in range(rank - 1):
        groups = [["query"], others] if axis else [["query", *others]]
        if axis and call["query"][axis] == call["value"][axis]:
            groups.insert(0, ["query", *others])
        for group in groups:
            size = call[group[0]][axis]
            for n in _smaller(size):
                out = copy.deepcopy(base)
                for key in group:
                    out["call"][key][axis] = n
                if isinstance(call.get("attention_mask"), list):
                    out["call"]["attention_mask"] = True
                yield out
    for key in ("query", "value", "key"):
        if key in call:
            for n in _smaller(call[key][-1]):
                out = copy.deepcopy(base)
                out["call"][key][-1] = n
                yield out


def shrink(spec: Spec, still_fails: Callable[[Spec], bool], *, max_tries: int = 60,
           max_seconds: float | None = None,
           on_try: Callable[[Spec, bool], None] | None = None) -> tuple[Spec, int, bool]:
    """The smallest spec found that `still_fails`, starting from `spec` (which must fail).

    Returns (spec, tries: candidates checked with `still_fails`, minimal: True when no single
    simplification of the result still fails, False when `max_tries` or `max_seconds` ran out
    first). Candidates that are not valid specs cost no try. `on_try(candidate, failed)` hears of
    each try.
    """
    current, tries = spec, 0
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    seen: set[str] = {spec.to_toml()}
    while True:
        improved = False
        for data in candidates(current):
            try:
                candidate = Spec.from_dict(data)
            except SpecError:
                continue
            text = candidate.to_toml()
            if text in seen:
                continue
            seen.add(text)
            if tries >= max_tries or (deadline is not None and time.monotonic() > deadline):
                return current, tries, False
            tries += 1
            failed = still_fails(candidate)
            if on_try:
                on_try(candidate, failed)
            if failed:
                current, improved = candidate, True
                break
        if not improved:
            return current, tries, True
