"""Training with dropout: the compiled keep-mask is jax.random.bernoulli on the same key."""

from __future__ import annotations

import numpy as np

import mhagen
from conftest import build_once, make_spec, unit_inputs
from mhagen.verify import dropout_keep_mask

SPEC = ({"num_heads": 2, "key_dim": 4, "dropout": 0.3, "seed": 5},
        {"query": [2, 6, 8], "value": [2, 6, 8], "training": True, "return_attention_scores": True})


def test_dropout_matches_oracle_with_jax_keep_mask() -> None:
    spec = make_spec(*SPEC)
    layer = build_once(spec)
    weights = mhagen.init_weights(spec)
    inputs = unit_inputs(spec)
    key = np.array([5, 11], np.uint32)
    out, scores = layer(inputs["query"], inputs["value"], dropout_key=key)
    keep = dropout_keep_mask(spec, key)
    assert 0.5 < keep.mean() < 0.9  # about 1 - rate
    ref_out, ref_scores = mhagen.reference(spec, weights, inputs["query"], inputs["value"],
                                           dropout_keep=keep)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)  # scores are before dropout
    no_drop = mhagen.reference(spec, weights, inputs["query"], inputs["value"])[0]
    assert np.abs(out - no_drop).max() > 1e-2


def test_default_keys_advance_like_keras_seed_generator() -> None:
    spec = make_spec(*SPEC)
    layer = build_once(spec)
    inputs = unit_inputs(spec)
    first = layer(inputs["query"], inputs["value"])[0]
    second = layer(inputs["query"], inputs["value"])[0]
    assert not np.allclose(first, second)
    weights = mhagen.init_weights(spec)
    for counter in (0, 1):  # one of them was drawn with [seed, 0], the other [seed, 1] (order per session)
        keep = dropout_keep_mask(spec, np.array([5, counter], np.uint32))
        ref = mhagen.reference(spec, weights, inputs["query"], inputs["value"], dropout_keep=keep)[0]
        assert min(np.abs(ref - first).max(), np.abs(ref - second).max()) < 1e-5


def test_inference_ignores_dropout() -> None:
    layer_args, call = SPEC
    spec = make_spec(layer_args, {**call, "training": False})
    assert not spec.has_dropout
    assert [t.name for t in mhagen.trace.input_signature(spec)] == ["query", "value"]
