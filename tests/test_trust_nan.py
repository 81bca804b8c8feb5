"""NaN where Keras puts it: the oracle against Keras 3 (JAX backend) and the compiled CPU build
against the oracle, position for position, and a verify that reports NaN/Inf places as such.

What Keras 3.15 does (its `Softmax` with a mask, and JAX's fused `dot_product_attention`, both
fill and zero with `where`):
- masked scores are *replaced* by -1e9 (-3e4 in float16), so a NaN key at a masked place is gone;
- an unmasked NaN score makes the row's max NaN, so the whole probability row is NaN, except its
  masked places, which are *replaced* by 0 after the softmax;
- the context is `probs @ V`, where 0 * NaN is NaN: a NaN value reaches every query row of its
  batch element, masked or not.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import mhagen
from mhagen.verify import TOLERANCES, check_outputs, compare

B, T, S, D, DK, N, H = 2, 4, 5, 8, 6, 2, 4
F32 = TOLERANCES["float32"]


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((B, T, S), dtype=np.int32)
    mask[0, :, 2] = 0          # key 2 of batch 0 masked for every query
    mask[1, 0, 4] = 0
    return {"query": rng.standard_normal((B, T, D)).astype(np.float32),
            "value": rng.standard_normal((B, S, D)).astype(np.float32),
            "key": rng.standard_normal((B, S, DK)).astype(np.float32),
            "attention_mask": mask}


# name -> (input, index set to NaN)
NAN_AT = {
    "query": ("query", (0, 2, 3)),
    "key": ("key", (1, 3, 0)),
    "value": ("value", (1, 3, 0)),
    "masked_key": ("key", (0, 2, 1)),
    "masked_value": ("value", (0, 2, 1)),
}


def _with_nan(case: str, masked: bool) -> dict[str, np.ndarray]:
    x = _inputs()
    which, index = NAN_AT[case]
    x[which][index] = np.nan
    if not masked:
        del x["attention_mask"]
    return x


def _spec(*, scores: bool, masked: bool, **layer: Any) -> mhagen.Spec:
    call: dict[str, Any] = {"query": [B, T, D], "value": [B, S, D], "key": [B, S, DK],
                            "return_attention_scores": scores}
    if masked:
        call["attention_mask"] = [B, T, S]
    return mhagen.Spec.from_dict({"layer": {"num_heads": N, "key_dim": H, **layer}, "call": call})


def _weights(spec: mhagen.Spec) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(0.3 * rng.standard_normal(w.shape)).astype(np.float32) for w in mhagen.init_weights(spec)]


def _oracle(spec: mhagen.Spec, ws: list[np.ndarray], x: dict[str, np.ndarray]) -> list[np.ndarray]:
    ref = mhagen.reference(spec, ws, x["query"], x["value"], x["key"], x.get("attention_mask"))
    return list(ref) if isinstance(ref, tuple) else [ref]


def _assert_same_places(got: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0, equal_nan=True)


# ---- compare() --------------------------------------------------------------------------------
E = np.array([[0.52, np.nan, np.inf], [1.0, -np.inf, 3.0]])

COMPARE = {
    "all_agree": (E.copy(), True, "|err| 0 <= atol"),
    "nan_for_number": (np.where(np.eye(2, 3, dtype=bool), np.nan, E), False,
                       "outputs[0][0, 0]: got nan, expected 0.52 (NaN where the oracle has a number"),
    "number_for_nan": (np.where(np.isnan(E), 0.1, E), False,
                       "outputs[0][0, 1]: got 0.1, expected nan (a number where the oracle has NaN)"),
    "inf_wrong_sign": (np.where(np.isposinf(E), -np.inf, E), False, "infinity of the wrong sign"),
    "inf_for_number": (np.where(E == 3.0, np.inf, E), False,
                       "got inf, expected 3 (infinity where the oracle has a number)"),
    "nan_for_inf": (np.where(np.isneginf(E), np.nan, E), False, "NaN where the oracle has infinity"),
    "number_for_inf": (np.where(np.isposinf(E), 1e30, E), False, "a number where the oracle has infinity"),
    "finite_error_still_reported": (np.where(E == 1.0, 1.1, E), False, "got 1.1, expected 1 (|err| 0.1 > atol"),
}


@pytest.mark.parametrize("name", sorted(COMPARE))
def test_compare_reports_nonfinite_places(name: str) -> None:
    got, passed, needle = COMPARE[name]
    with np.errstate(all="raise"):
        c = compare(got, E, tol=F32)
    assert c.passed is passed and needle in c.message, c.message
    if not passed and "|err|" not in needle:
        assert c.max_abs == float("inf")


def test_compare_counts_the_places_and_agrees_on_all_nan() -> None:
    c = compare(np.full((3, 2), np.nan), np.zeros((3, 2)), tol=F32)
    assert not c.passed and c.message.endswith("(NaN where the oracle has a number, 6 places)"), c.message
    c = compare(np.full((3, 2), np.nan, np.float16), np.full((3, 2), np.nan), tol=TOLERANCES["float16"])
    assert c.passed and c.max_abs == 0.0, c.message


# ---- the oracle on its own ---------------------------------------------------------------------
def test_oracle_nan_query_poisons_its_row_only() -> None:
    spec = _spec(scores=True, masked=True)
    ws = _weights(spec)
    out, probs = _oracle(spec, ws, _with_nan("query", masked=True))
    rows = np.isnan(out).any(-1)
    assert rows[0, 2] and rows.sum() == 1 and np.isnan(out[0, 2]).all()
    # The NaN row is NaN where keys are allowed and exactly 0 where they are masked.
    assert np.isnan(probs[0, :, 2, [0, 1, 3, 4]]).all() and (probs[0, :, 2, 2] == 0).all()
    assert np.isfinite(np.delete(probs[0], 2, axis=1)).all() and np.isfinite(probs[1]).all()


def test_oracle_drops_a_masked_nan_key_and_keeps_fully_masked_rows_at_zero() -> None:
    spec = _spec(scores=True, masked=True)
    ws = _weights(spec)
    x = _with_nan("masked_key", masked=True)
    x["attention_mask"][1, 1, :] = 0
    out, probs = _oracle(spec, ws, x)
    assert np.isfinite(out).all() and np.isfinite(probs).all()
    assert (probs[1, :, 1] == 0).all()
    np.testing.assert_allclose(out[1, 1], ws[-1], atol=1e-12)   # context 0: the output bias


def test_oracle_nan_value_reaches_every_row_of_its_batch() -> None:
    spec = _spec(scores=True, masked=True)
    ws = _weights(spec)
    out, probs = _oracle(spec, ws, _with_nan("masked_value", masked=True))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all() and np.isfinite(probs).all()


# ---- against Keras -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_mod() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on JAX here; KERAS_BACKEND is {keras.backend.backend()}")
    return keras


def _keras_call(keras: Any, spec: mhagen.Spec, ws: list[np.ndarray], x: dict[str, np.ndarray]) -> list[np.ndarray]:
    layer = keras.layers.MultiHeadAttention(num_heads=N, key_dim=H, **(
        {"sliding_window": spec.layer.sliding_window} if spec.layer.sliding_window else {}))
    layer(x["query"], x["value"], x["key"])
    layer.set_weights(ws)
    mask = x.get("attention_mask")
    got = layer(x["query"], x["value"], x["key"], attention_mask=None if mask is None else mask.astype(bool),
                return_attention_scores=spec.call.return_attention_scores,
                use_causal_mask=spec.call.use_causal_mask)
    return [np.asarray(a) for a in got] if spec.call.return_attention_scores else [np.asarray(got)]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("scores", [True, False], ids=["explicit", "fused"])
@pytest.mark.parametrize("case", sorted(NAN_AT))
def test_oracle_matches_keras_nan_placement(keras_mod: Any, case: str, scores: bool, masked: bool) -> None:
    """Keras' explicit path (scores returned) and its fused path (3-D, no scores) alike."""
    spec = _spec(scores=scores, masked=masked)
    ws = _weights(spec)
    x = _with_nan(case, masked)
    for got, expected in zip(_keras_call(keras_mod, spec, ws, x), _oracle(spec, ws, x)):
        _assert_same_places(got, expected)


# ---- the compiled CPU build --------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled() -> dict[tuple[bool, bool], tuple[mhagen.Spec, list[np.ndarray], mhagen.CompiledLayer]]:
    """(scores, masked) -> spec, weights, CPU build: scores take Keras' path, no scores the blocked one."""
    out = {}
    for scores in (True, False):
        for masked in (False, True):
            spec = _spec(scores=scores, masked=masked)
            ws = _weights(spec)
            out[scores, masked] = spec, ws, mhagen.build(spec, target="cpu", weights=ws)
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("scores", [True, False], ids=["plain", "blocked"])
@pytest.mark.parametrize("case", sorted(NAN_AT))
def test_compiled_matches_oracle_nan_placement(compiled: Any, case: str, scores: bool, masked: bool) -> None:
    spec, ws, layer = compiled[scores, masked]
    x = _with_nan(case, masked)
    result = layer(**x)
    got = list(result) if isinstance(result, tuple) else [result]
    expected = _oracle(spec, ws, x)
    for g, e in zip(got, expected):
        _assert_same_places(g, e)
    assert all(c.passed for c in check_outputs(spec, got, expected))


@pytest.mark.parametrize("case", sorted(NAN_AT))
def test_blocked_online_softmax_carries_nan_across_key_blocks(case: str) -> None:
    """Blocks of 2 queries x 3 keys, so a NaN meets the running max and the rescaling of the past."""
    import jax

    from mhagen.trace import forward, input_signature

    spec = _spec(scores=False, masked=True)
    ws = _weights(spec)
    x = _with_nan(case, masked=True)
    fn = jax.jit(forward(spec, attention="blocked", block=(2, 3)))
    got = np.asarray(fn(*(x[t.name] for t in input_signature(spec)), *ws))
    _assert_same_places(got, _oracle(spec, ws, x)[0])


def test_verify_names_a_nan_the_oracle_lacks(compiled: Any) -> None:
    spec, ws, layer = compiled[False, True]
    x = _with_nan("query", masked=True)
    expected = _oracle(spec, ws, _inputs())          # as if the compiled code invented the NaN
    (c,) = check_outputs(spec, [layer(**x)], expected)
    assert not c.passed and c.message.startswith("outputs[0][0, 2, 0]: got nan, expected ")
    assert c.message.endswith("(NaN where the oracle has a number, 8 places)"), c.message


@pytest.mark.parametrize("layer_args,call_args", [({}, {"use_causal_mask": True}), ({"sliding_window": 2}, {})],
                         ids=["causal", "window"])
def test_blocked_path_skips_values_no_query_can_see(keras_mod: Any, layer_args: dict[str, Any],
                                                    call_args: dict[str, Any]) -> None:
    """The one documented NaN difference (see `mhagen.blocked`): with a causal mask or a sliding
    window, the blocked path never reads key blocks no query may see, so a NaN *value* there does
    not reach the output; Keras (and the oracle, and the plain path) multiply it by 0 and get NaN in
    every row of its batch element. A NaN *key* there is dropped by all of them alike."""
    t, s = 4, 6
    spec = mhagen.Spec.from_dict({"layer": {"num_heads": N, "key_dim": H, **layer_args},
                                  "call": {"query": [1, t, D], "value": [1, s, D], "key": [1, s, DK],
                                           **call_args}})
    ws = _weights(spec)
    layer = mhagen.build(spec, target="cpu", weights=ws)
    rng = np.random.default_rng(2)
    x = {"query": rng.standard_normal((1, t, D)).astype(np.float32),
         "value": rng.standard_normal((1, s, D)).astype(np.float32),
         "key": rng.standard_normal((1, s, DK)).astype(np.float32)}
    x["key"][0, 5, 0] = np.nan                        # key 5: no query row sees it
    _assert_same_places(layer(**x), _oracle(spec, ws, x)[0])
    _assert_same_places(_keras_call(keras_mod, spec, ws, x)[0], _oracle(spec, ws, x)[0])
    x["value"][0, 5, 0] = np.nan
    assert np.isnan(_keras_call(keras_mod, spec, ws, x)[0]).all()
    assert np.isnan(_oracle(spec, ws, x)[0]).all()
    assert np.isfinite(layer(**x)).all()


def test_api_build_verifies_by_default(monkeypatch) -> None:
    """`mhagen.build` checks the layer against the oracle: a disagreement is a `VerifyError`,
    and only `verify=False` hands back an unchecked layer (which says so)."""
    import mhagen
    import mhagen.verify as verify_mod

    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4},
                                  "call": {"query": [2, 3, 8], "value": [2, 5, 8]}})
    layer = mhagen.build(spec, target="cpu")
    assert layer.verified is True
    real = verify_mod.expected_outputs
    monkeypatch.setattr(verify_mod, "expected_outputs", lambda *a, **k: [x + 1.0 for x in real(*a, **k)])
    with pytest.raises(mhagen.VerifyError, match=r"disagrees with the NumPy oracle: query \(2, 3, 8\)"):
        mhagen.build(spec, target="cpu")
    unchecked = mhagen.build(spec, target="cpu", verify=False)
    assert unchecked.verified is False
