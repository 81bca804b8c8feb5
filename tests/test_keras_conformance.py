"""Conformance against Keras itself: a Keras 3 MultiHeadAttention (JAX backend) and the compiled CPU
artifact of the same config and weights give the same outputs and scores (float32, atol 1e-5).

The cases follow Keras' own `multi_head_attention_test.py` (test_basics, test_high_dim_attention,
test_attention_axes_negative_indexing, test_compute_output_shape, test_masking*, test_sliding_window,
test_causal_only_*, test_shape_mismatch_error, test_invalid_scalar_args_rejected, output_shape_*),
at batch 2 and small dims, plus training-mode dropout draw for draw.
Set MHAGEN_CONFORMANCE_JSON=FILE to write the largest error per case.

Keras has two attention paths. With 3-D inputs, no scores and dropout == 0 it calls the fused
`ops.dot_product_attention`; otherwise it runs the explicit masked softmax. They agree except on a
query row whose keys are all masked: `test_fully_masked_row_fused_and_explicit_paths_differ`
pins down what each does, and mhagen follows the explicit path. Every other case keeps at least
one key per query row, so both paths are held to 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(f"the conformance suite runs Keras on JAX; KERAS_BACKEND is {keras.backend.backend()}",
                allow_module_level=True)

import mhagen  # noqa: E402
from mhagen.verify import TOLERANCES  # noqa: E402

# 65 cases, each a compile and a Keras run: 80 s with a warm compile cache, out of `-m "not slow"`.
pytestmark = pytest.mark.slow

ATOL = 1e-5  # float32 contract
B = 2


@dataclass(frozen=True)
class Case:
    """One Keras call: constructor kwargs, full input shapes, and the call's mask and modes."""

    layer: dict[str, Any]
    query: tuple[int, ...]
    value: tuple[int, ...]
    key: tuple[int, ...] | None = None
    mask: tuple[int, ...] | None = None       # attention_mask shape given to both Keras and mhagen
    causal: bool = False
    scores: bool = False
    dtype: str = "float32"
    self_attention: bool = False       # value is the query array itself
    config_before_build: bool = False  # the spec reads the config as given (Keras normalizes it in build)


def _h(q: tuple[int, ...], v: tuple[int, ...], hidden: int = 8) -> dict[str, tuple[int, ...]]:
    """Keras' high-dim test shapes: (B, *dims, hidden)."""
    return {"query": (B, *q, hidden), "value": (B, *v, hidden)}


CASES: dict[str, Case] = {
    # test_basics (dropout only acts in training; here it just turns off Keras' fused path)
    "basic/cross": Case({"num_heads": 2, "key_dim": 2, "kernel_initializer": "glorot_uniform"},
                        (B, 8, 16), (B, 4, 16)),
    "basic/self": Case({"num_heads": 2, "key_dim": 4}, (B, 6, 8), (B, 6, 8), self_attention=True),
    "basic/value_dim_no_bias_dropout": Case(
        {"num_heads": 2, "key_dim": 2, "value_dim": 4, "use_bias": False, "dropout": 0.5}, (B, 8, 16), (B, 4, 16)),
    "basic/gate": Case({"num_heads": 2, "key_dim": 2, "use_gate": True}, (B, 8, 16), (B, 4, 16)),
    "basic/gate_value_dim_no_bias_dropout": Case(
        {"num_heads": 2, "key_dim": 2, "value_dim": 4, "use_bias": False, "dropout": 0.5, "use_gate": True},
        (B, 8, 16), (B, 4, 16)),
    # Keras' fused path cannot run value_dim != key_dim on JAX (see test_value_dim_ne_key_dim_...).
    "basic/value_dim_ne_key_dim": Case({"num_heads": 3, "key_dim": 4, "value_dim": 6}, (B, 5, 8), (B, 7, 8),
                                       scores=True),
    "basic/key_given": Case({"num_heads": 2, "key_dim": 4}, (B, 5, 8), (B, 7, 6), key=(B, 7, 3)),
    # test_high_dim_attention: masks of every rank Keras expands, one and two attention axes
    "high_dim/4d_1freebatch_mask2": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (2,)},
                                         **_h((3, 4), (3, 2)), mask=(B, 4, 2)),
    "high_dim/4d_1freebatch_mask3": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (2,)},
                                         **_h((3, 4), (3, 2)), mask=(B, 3, 4, 2)),
    "high_dim/4d_1freebatch_mask4": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (2,)},
                                         **_h((3, 4), (3, 2)), mask=(B, 3, 2, 4, 2)),
    "high_dim/4d_2d_attention": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (1, 2)},
                                     **_h((3, 4), (3, 2)), mask=(B, 3, 4, 3, 2)),
    "high_dim/4d_2d_attention_gate": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (1, 2), "use_gate": True},
                                          **_h((3, 4), (3, 2))),
    "high_dim/5d_2d_attention": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (2, 3)},
                                     **_h((5, 3, 4), (5, 3, 2)), mask=(B, 3, 4, 3, 2)),
    "high_dim/5d_2d_attention_fullmask": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (2, 3)},
                                              **_h((5, 3, 4), (5, 3, 2)), mask=(B, 5, 3, 4, 3, 2)),
    "high_dim/4d_default_axes": Case({"num_heads": 2, "key_dim": 2}, **_h((3, 4), (3, 2)), config_before_build=True),
    # test_attention_axes_negative_indexing (the spec is built from the *unbuilt* config, -2 as given)
    "negative_axes/4d_minus2": Case({"num_heads": 2, "key_dim": 4, "attention_axes": -2}, (B, 3, 8, 4),
                                    (B, 3, 8, 4), scores=True, config_before_build=True),
    "negative_axes/4d_minus2_gate": Case({"num_heads": 2, "key_dim": 4, "attention_axes": -2, "use_gate": True},
                                         (B, 3, 8, 4), (B, 3, 8, 4), scores=True,
                                         config_before_build=True),
    "negative_axes/5d_minus3_minus2": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (-3, -2)},
                                           (B, 2, 3, 4, 6), (B, 2, 2, 3, 6), scores=True,
                                           config_before_build=True),
    # test_compute_output_shape (num_heads 2, key_dim 2, value_dim 2; batch 2 instead of 7)
    "output_shape/without_key_same_proj": Case({"num_heads": 2, "key_dim": 2, "value_dim": 2},
                                               (B, 4, 8), (B, 2, 8)),
    "output_shape/with_key_same_proj": Case({"num_heads": 2, "key_dim": 2, "value_dim": 2},
                                            (B, 4, 8), (B, 2, 8), key=(B, 2, 3)),
    "output_shape/without_key_different_proj": Case(
        {"num_heads": 2, "key_dim": 2, "value_dim": 2, "output_shape": (3, 4)}, (B, 4, 8), (B, 2, 8)),
    "output_shape/with_key_different_proj": Case(
        {"num_heads": 2, "key_dim": 2, "value_dim": 2, "output_shape": (1, 5)}, (B, 4, 8), (B, 2, 8), key=(B, 2, 3)),
    "output_shape/high_dim_same_proj": Case({"num_heads": 2, "key_dim": 2, "value_dim": 2},
                                            (B, 4, 2, 3, 8), (B, 1, 1, 5, 8), key=(B, 1, 1, 5, 2)),
    "output_shape/high_dim_different_proj": Case(
        {"num_heads": 2, "key_dim": 2, "value_dim": 2, "output_shape": (3, 2)},
        (B, 4, 2, 3, 8), (B, 1, 1, 5, 8), key=(B, 1, 1, 5, 2)),
    "output_shape/different_qv_last_dims": Case({"num_heads": 2, "key_dim": 2, "value_dim": 2},
                                                (B, 4, 2, 3, 8), (B, 4, 2, 3, 7), key=(B, 4, 2, 3, 8)),
    "output_shape/int": Case({"num_heads": 2, "key_dim": 4, "output_shape": 6}, (B, 4, 8), (B, 4, 8)),
    "output_shape/tuple": Case({"num_heads": 2, "key_dim": 4, "output_shape": (3, 4)}, (B, 4, 8), (B, 4, 8)),
    # masks: (B, T, S), (T, S), (B, N, T, S); causal alone and with a mask (test_masking*,
    # test_causal_only_*), sliding window with and without causal (test_sliding_window)
    "mask/BTS": Case({"num_heads": 2, "key_dim": 4}, (B, 5, 8), (B, 7, 8), mask=(B, 5, 7)),
    "mask/TS": Case({"num_heads": 2, "key_dim": 4}, (B, 5, 8), (B, 7, 8), mask=(5, 7)),
    "mask/BNTS": Case({"num_heads": 2, "key_dim": 4}, (B, 5, 8), (B, 7, 8), mask=(B, 2, 5, 7)),
    "mask/causal": Case({"num_heads": 2, "key_dim": 4}, (B, 6, 8), (B, 6, 8), causal=True),
    "mask/causal_T_lt_S": Case({"num_heads": 2, "key_dim": 4}, (B, 4, 8), (B, 7, 8), causal=True),
    "mask/causal_with_mask": Case({"num_heads": 2, "key_dim": 4}, (B, 6, 8), (B, 6, 8), mask=(B, 6, 6),
                                  causal=True),
    "mask/causal_with_mask_scores": Case({"num_heads": 2, "key_dim": 4}, (B, 6, 8), (B, 6, 8), mask=(B, 6, 6),
                                         causal=True, scores=True),
    "mask/causal_4d_one_axis_scores": Case({"num_heads": 2, "key_dim": 4, "attention_axes": 1}, (B, 5, 3, 8),
                                           (B, 5, 3, 8), causal=True, scores=True),
    "mask/sliding_window": Case({"num_heads": 2, "key_dim": 4, "sliding_window": 3}, (B, 6, 8), (B, 6, 8)),
    "mask/sliding_window_causal": Case({"num_heads": 2, "key_dim": 4, "sliding_window": 3}, (B, 6, 8), (B, 6, 8),
                                       causal=True),
    "mask/sliding_window_causal_mask_scores": Case({"num_heads": 2, "key_dim": 4, "sliding_window": 2},
                                                   (B, 6, 8), (B, 6, 8), mask=(B, 6, 6), causal=True, scores=True),
    # return_attention_scores: the explicit path, scores compared too
    "scores/3d": Case({"num_heads": 3, "key_dim": 4}, (B, 5, 8), (B, 7, 8), scores=True),
    "scores/3d_self": Case({"num_heads": 4, "key_dim": 2}, (B, 3, 5), (B, 3, 5), scores=True),  # test_symbolic_return_*
    "scores/gate_no_bias": Case({"num_heads": 2, "key_dim": 4, "use_gate": True, "use_bias": False, "value_dim": 3},
                                (B, 5, 8), (B, 7, 6), scores=True),
    "scores/4d_two_axes_mask": Case({"num_heads": 2, "key_dim": 2, "attention_axes": (1, 2)}, (B, 3, 4, 8),
                                    (B, 2, 3, 8), mask=(B, 3, 4, 2, 3), scores=True),
    # the dtype policy as Keras writes it; float16 tolerance from mhagen's table
    "dtype/mixed_float16_scores": Case({"num_heads": 2, "key_dim": 4, "dtype": "mixed_float16"}, (B, 5, 8),
                                       (B, 5, 8), scores=True, dtype="float16"),
}

_ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    path = os.environ.get("MHAGEN_CONFORMANCE_JSON")
    if path:
        groups: dict[str, float] = {}
        for name, err in _ERRORS.items():
            group = name.split("/")[0]
            groups[group] = max(groups.get(group, 0.0), err)
        with open(path, "w") as f:
            json.dump({"cases": _ERRORS, "groups": groups}, f, indent=2, sort_keys=True)


# ---- helpers ---------------------------------------------------------------------------------------
def keras_layer(case: Case, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A built Keras layer with seeded weights (non-zero biases, so bias handling shows),
    and the config taken before or after the build as the case asks."""
    # Zeros to start with: the weights are replaced anyway, and Keras' random initializers cost
    # ~0.5 s of JAX compiles per layer (basic/cross keeps glorot_uniform to cover its config).
    layer = keras.layers.MultiHeadAttention(**{"kernel_initializer": "zeros", **case.layer})
    before = layer.get_config()
    layer.build(case.query, case.value, case.key)
    rng = np.random.default_rng(seed)
    layer.set_weights([(0.3 * rng.standard_normal(w.shape)).astype(np.float32) for w in layer.get_weights()])
    return layer, before if case.config_before_build else layer.get_config()


def inputs(case: Case, seed: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(case.query).astype(np.float32)
    value = query if case.self_attention else rng.standard_normal(case.value).astype(np.float32)
    out: dict[str, Any] = {"query": query, "value": value}
    if case.key is not None:
        out["key"] = rng.standard_normal(case.key).astype(np.float32)
    if case.mask is not None:
        out["attention_mask"] = _mask(case, rng)
    return out


def _mask(case: Case, rng: np.random.Generator) -> np.ndarray:
    """A random mask that leaves every query row at least one key, under causal and window masks too:
    the diagonal when a window may hide key 0, else key 0 (which top-left causal always allows)."""
    mask = rng.random(case.mask) < 0.6
    n_axes = len(case.layer.get("attention_axes") or ()) or len(case.query) - 2
    if case.layer.get("sliding_window"):
        t = min(mask.shape[-2:])
        mask[..., np.arange(t), np.arange(t)] = True
    else:
        mask[(Ellipsis,) + (0,) * n_axes] = True
    return mask


def _spec(case: Case, config: dict[str, Any]) -> mhagen.Spec:
    return mhagen.Spec.from_keras_config(
        config, query_shape=case.query, value_shape=case.value, key_shape=case.key,
        attention_mask=case.mask if case.mask is not None else False,
        use_causal_mask=case.causal, return_attention_scores=case.scores)


_BUILDS: dict[tuple[str, str], mhagen.CompiledLayer] = {}


def build(spec: mhagen.Spec, weights: list[np.ndarray]) -> mhagen.CompiledLayer:
    """Compile each (spec, weights) once per session (conftest's build_once uses init_weights)."""
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()
    key = (spec.to_toml(), digest)
    if key not in _BUILDS:
        _BUILDS[key] = mhagen.build(spec, target="cpu", weights=weights)
    return _BUILDS[key]


def call_keras(layer: Any, case: Case, x: dict[str, Any]) -> list[np.ndarray]:
    result = layer(x["query"], x["value"], key=x.get("key"), attention_mask=x.get("attention_mask"),
                   use_causal_mask=case.causal, return_attention_scores=case.scores)
    return [np.asarray(r) for r in (result if case.scores else (result,))]


def call_mhagen(compiled: mhagen.CompiledLayer, x: dict[str, Any]) -> list[np.ndarray]:
    result = compiled(**x)
    return list(result) if isinstance(result, tuple) else [result]


def uses_fused_path(case: Case) -> bool:
    """Keras' `_compute_attention` takes `ops.dot_product_attention` exactly when this holds."""
    return not (case.layer.get("dropout", 0.0) > 0 or case.scores or len(case.query) + 1 != 4)


# ---- conformance -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras(name: str) -> None:
    case = CASES[name]
    layer, config = keras_layer(case)
    x = inputs(case)
    want = call_keras(layer, case, x)
    spec = _spec(case, config)
    g = spec.geometry
    # Shapes first: Keras' compute_output_shape, Keras' eager outputs and the spec agree.
    assert tuple(layer.compute_output_shape(case.query, case.value, case.key)) == g.output_shape
    assert want[0].shape == g.output_shape
    if case.scores:
        assert want[1].shape == g.scores_shape
    compiled = build(spec, layer.get_weights())
    got = call_mhagen(compiled, x)
    assert [a.shape for a in got] == [a.shape for a in want]
    atol = ATOL if case.dtype == "float32" else TOLERANCES[case.dtype].atol
    rtol = 0.0 if case.dtype == "float32" else TOLERANCES[case.dtype].rtol
    if case.dtype != "float32":
        assert spec.call.dtype == case.layer["dtype"] and got[0].dtype == np.dtype(case.dtype)
    for label, a, b in zip(("outputs", "scores"), got, want):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=atol, rtol=rtol,
                                   err_msg=f"{name}: {label}")
    _ERRORS[name] = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(got, want))


def test_negative_axes_resolve_like_positive() -> None:
    """attention_axes=-2 on 4-D inputs is input axis 2, before and after Keras normalizes it."""
    case = CASES["negative_axes/4d_minus2"]
    layer, before = keras_layer(case)
    assert before["attention_axes"] == (-2,) and layer.get_config()["attention_axes"] == (2,)
    assert _spec(case, before).geometry == _spec(case, layer.get_config()).geometry


def test_masks_of_every_rank_agree() -> None:
    """test_masking_with_different_shapes: one (T, S) pattern given as (T, S), (B, T, S) and
    (B, N, T, S) gives one output, in Keras and in mhagen (the mask/* cases' builds, reused)."""
    pattern = np.tril(np.ones((5, 7), bool))
    masks = {"mask/TS": pattern, "mask/BTS": np.tile(pattern, (B, 1, 1)),
             "mask/BNTS": np.tile(pattern, (B, 2, 1, 1))}
    outs = []
    for name, mask in masks.items():
        case = CASES[name]
        layer, config = keras_layer(case)
        x = inputs(case) | {"attention_mask": mask}
        got = call_mhagen(build(_spec(case, config), layer.get_weights()), x)[0]
        np.testing.assert_allclose(got, call_keras(layer, case, x)[0], atol=ATOL, rtol=0)
        outs.append(got)
    np.testing.assert_allclose(outs[0], outs[1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(outs[0], outs[2], atol=ATOL, rtol=0)


def test_fused_path_is_taken_where_expected() -> None:
    """The cases above exercise both Keras paths (so both are held to 1e-5)."""
    fused = {n for n, c in CASES.items() if uses_fused_path(c)}
    assert {"basic/cross", "mask/BTS", "mask/causal", "mask/sliding_window"} <= fused
    assert not {"basic/value_dim_no_bias_dropout", "scores/3d", "high_dim/4d_2d_attention"} & fused


def test_fully_masked_row_fused_and_explicit_paths_differ() -> None:
    """A query row with every key masked (as Keras' test_masking produces for padded queries).

    Keras' explicit path (here: return_attention_scores=True) zeroes the masked probabilities, so
    the row attends to nothing and its output is the output bias. The fused path
    (`ops.dot_product_attention`, 3-D inputs, no scores, no dropout) softmaxes a row of equal
    fill values, so the row is the mean of the projected values, projected. mhagen follows the
    explicit path; every other row agrees with both.
    """
    case = CASES["mask/BTS"]  # its build is reused
    layer, config = keras_layer(case)
    x = inputs(case)
    mask = np.ones((B, 5, 7), bool)
    mask[1, 3, :] = False
    x["attention_mask"] = mask
    fused = call_keras(layer, case, x)[0]
    explicit, scores = call_keras(layer, replace(case, scores=True), x)
    got = call_mhagen(build(_spec(case, config), layer.get_weights()), x)[0]

    w = dict(zip(["qk", "qb", "kk", "kb", "vk", "vb", "ok", "ob"], layer.get_weights()))
    value_proj = np.einsum("sd,dnh->snh", x["value"][1], w["vk"]) + w["vb"]
    mean_of_values = np.einsum("nh,nhe->e", value_proj.mean(axis=0), w["ok"]) + w["ob"]
    np.testing.assert_allclose(fused[1, 3], mean_of_values, atol=ATOL, rtol=0)   # fused: mean of V
    np.testing.assert_array_equal(scores[1, :, 3], 0.0)                           # explicit: no weight
    np.testing.assert_allclose(explicit[1, 3], w["ob"], atol=ATOL, rtol=0)         # explicit: bias only
    np.testing.assert_allclose(got, explicit, atol=ATOL, rtol=0)                   # mhagen: explicit
    assert np.abs(got[1, 3] - fused[1, 3]).max() > 0.1
    others = np.ones((B, 5), bool)
    others[1, 3] = False
    np.testing.assert_allclose(got[others], fused[others], atol=ATOL, rtol=0)


def test_value_dim_ne_key_dim_on_keras_fused_path() -> None:
    """Keras 3.15.1 on JAX raises on its fused path when value_dim != key_dim
    (`jax.nn.dot_product_attention` wants equal head dims, and Keras' fallback reshapes the context
    to the query's (B, T, N, key_dim)); its explicit path runs. mhagen compiles the layer and
    matches the explicit path, and the fused one too should a later Keras run it."""
    case = CASES["basic/value_dim_ne_key_dim"]
    layer, config = keras_layer(case)
    x = inputs(case)
    explicit = call_keras(layer, case, x)[0]
    got = call_mhagen(build(_spec(case, config), layer.get_weights()), x)[0]
    np.testing.assert_allclose(got, explicit, atol=ATOL, rtol=0)
    try:
        fused = np.asarray(layer(x["query"], x["value"]))
    except (TypeError, ValueError) as exc:
        assert "reshape" in str(exc) or "shape" in str(exc)
    else:
        np.testing.assert_allclose(got, fused, atol=ATOL, rtol=0)


def test_training_dropout_matches_keras_draw_for_draw() -> None:
    """training=True with dropout: Keras' SeedGenerator keys its n-th call [seed, n]; the compiled
    layer counts calls the same way, so the same probabilities are dropped on every call."""
    case = Case({"num_heads": 2, "key_dim": 4, "dropout": 0.3, "seed": 7}, (B, 5, 8), (B, 5, 8))
    layer, config = keras_layer(case)
    x = inputs(case)
    spec = mhagen.Spec.from_keras_config(config, query_shape=case.query, value_shape=case.value, training=True)
    compiled = mhagen.build(spec, target="cpu", weights=layer.get_weights())  # fresh: its counter starts at 0
    calls = []
    for _ in range(2):
        want = np.asarray(layer(x["query"], x["value"], training=True))
        got = compiled(x["query"], x["value"])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        calls.append(got)
    assert np.abs(calls[0] - calls[1]).max() > 0.1  # two different draws, both matched
    _ERRORS["dropout/training"] = float(np.abs(calls[1] - want).max())


# ---- the errors Keras raises, mhagen raises as SpecError --------------------------------------------
INVALID_ARGS = [
    (arg, bad) for arg in ("num_heads", "key_dim", "value_dim") for bad in (0, -2, 1.5)
] + [("output_shape", 8.0), ("sliding_window", 0), ("sliding_window", -3), ("attention_axes", "x")]


@pytest.mark.parametrize("arg,bad", INVALID_ARGS, ids=[f"{a}={b}" for a, b in INVALID_ARGS])
def test_invalid_argument_refused_like_keras(arg: str, bad: Any) -> None:
    kwargs = {"num_heads": 2, "key_dim": 4, arg: bad}
    with pytest.raises(ValueError, match=arg if arg != "output_shape" else "Invalid `output_shape`"):
        keras.layers.MultiHeadAttention(**kwargs)
    with pytest.raises(mhagen.SpecError, match=f"`{arg}`"):
        mhagen.Spec.from_keras_config(kwargs, query_shape=(B, 4, 8), value_shape=(B, 4, 8))


SHAPE_MISMATCHES = {
    "query_value_dim_mismatch": ((2, 4, 8), (2, 2, 7), (2,)),
    "key_value_dim_mismatch": ((2, 4, 8), (2, 2, 8), (2, 1, 7)),
    "key_value_dim_mismatch_high_dim": ((2, 4, 2, 3, 8), (2, 1, 1, 5, 8), (2, 1, 15, 5, 2)),
}


@pytest.mark.parametrize("name", list(SHAPE_MISMATCHES))
def test_shape_mismatch_refused_like_keras(name: str) -> None:
    query, value, key = SHAPE_MISMATCHES[name]
    layer = keras.layers.MultiHeadAttention(num_heads=4, key_dim=2, value_dim=2)
    with pytest.raises(ValueError, match="must be equal"):
        layer.compute_output_shape(query, value, key)
    with pytest.raises(ValueError, match="must be equal"):
        layer(np.ones(query), np.ones(value), np.ones(key))
    with pytest.raises(mhagen.SpecError):
        mhagen.Spec.from_keras_config(layer.get_config(), query_shape=query, value_shape=value, key_shape=key)
