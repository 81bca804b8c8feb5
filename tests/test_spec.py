"""Spec validation (Keras' rules and messages), round trips, and the derived geometry."""

from __future__ import annotations

import numpy as np
import pytest

import mhagen
from conftest import EXAMPLES, make_spec

CALL = {"query": [2, 5, 8], "value": [2, 7, 8]}


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_num_heads_must_be_positive_int(value: object) -> None:
    with pytest.raises(mhagen.SpecError) as err:
        make_spec({"num_heads": value, "key_dim": 4}, CALL)
    assert str(err.value) == ("Received an invalid value for argument `num_heads`, expected a positive "
                              f"integer. Received: num_heads={value!r}")


@pytest.mark.parametrize("layer,match", [
    ({"key_dim": 0}, "`key_dim`"),
    ({"key_dim": 4, "value_dim": -1}, "`value_dim`"),
    ({"key_dim": 4, "output_shape": 8.0}, "Invalid `output_shape`"),
    ({"key_dim": 4, "dropout": 1.0}, "`dropout`"),
    ({"key_dim": 4, "sliding_window": 0}, "`sliding_window`"),
    ({"key_dim": 4, "attention_axes": "1"}, "`attention_axes`"),
    ({"key_dim": 4, "attention_axes": [0]}, "`attention_axes`"),
    ({"key_dim": 4, "attention_axes": [2]}, "`attention_axes`"),
    ({"key_dim": 4, "attention_axes": [-1]}, "`attention_axes`"),
    ({"key_dim": 4, "kernel_initializer": "no_such_init"}, "`kernel_initializer`"),
    ({"key_dim": 4, "use_bias": 1}, "`use_bias`"),
    ({"key_dim": 4, "seed": -3}, "`seed`"),
])
def test_invalid_layer_arguments(layer: dict, match: str) -> None:
    with pytest.raises(mhagen.SpecError, match=match):
        make_spec({"num_heads": 2, **layer}, CALL)


def test_key_value_mismatch_uses_keras_message() -> None:
    with pytest.raises(mhagen.SpecError, match="All dimensions of `value` and `key`, except the last one, "
                       "must be equal"):
        make_spec({"num_heads": 2, "key_dim": 4}, {**CALL, "key": [2, 6, 8]})


@pytest.mark.parametrize("call,match", [
    ({"query": [2, 5, 8], "value": [3, 7, 8]}, "axis 0 differs"),
    ({"query": [2, 5, 8], "value": [2, 7, 8, 1]}, "same rank"),
    ({"query": [5, 8], "value": [7, 8]}, "`query`"),
    ({**CALL, "dtype": "float64"}, "`dtype`"),
    ({**CALL, "attention_mask": [3, 5, 7]}, "`attention_mask`"),
    ({**CALL, "attention_mask": "yes"}, "`attention_mask`"),
])
def test_invalid_calls(call: dict, match: str) -> None:
    with pytest.raises(mhagen.SpecError, match=match):
        make_spec({"num_heads": 2, "key_dim": 4}, call)


def test_causal_needs_axis_one() -> None:
    with pytest.raises(mhagen.SpecError, match="attention_axes=\\(1,\\)"):
        make_spec({"num_heads": 2, "key_dim": 4, "attention_axes": [1, 2]},
                  {"query": [2, 3, 4, 8], "value": [2, 3, 4, 8], "use_causal_mask": True})


def test_unknown_keys_and_tables_are_refused() -> None:
    with pytest.raises(mhagen.SpecError, match="Unknown key\\(s\\) \\['num_head'\\] in \\[layer\\]"):
        mhagen.Spec.from_dict({"layer": {"num_head": 2, "key_dim": 4}, "call": CALL})
    with pytest.raises(mhagen.SpecError, match="Unknown table"):
        mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": CALL, "extra": {}})
    with pytest.raises(mhagen.SpecError, match="Missing table \\[call\\]"):
        mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}})
    with pytest.raises(mhagen.SpecError, match="Missing key\\(s\\) \\['key_dim'\\]"):
        mhagen.Spec.from_dict({"layer": {"num_heads": 2}, "call": CALL})


def test_malformed_toml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[layer\nnum_heads = 2")
    with pytest.raises(mhagen.SpecError, match="malformed TOML"):
        mhagen.Spec.load(bad)
    with pytest.raises(mhagen.SpecError, match="not found"):
        mhagen.Spec.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_round_trip(path, tmp_path) -> None:
    spec = mhagen.Spec.load(path)
    assert mhagen.Spec.from_dict(spec.to_dict()) == spec
    assert set(spec.to_dict()) == {"layer", "call"}
    again = tmp_path / "again.toml"
    again.write_text(spec.to_toml())
    assert mhagen.Spec.load(again) == spec


def test_output_shape_forms_normalize() -> None:
    a = make_spec({"num_heads": 2, "key_dim": 4, "output_shape": 6}, CALL)
    b = make_spec({"num_heads": 2, "key_dim": 4, "output_shape": [6]}, CALL)
    c = make_spec({"num_heads": 2, "key_dim": 4, "output_shape": 0}, CALL)
    assert a == b and a.layer.output_shape == (6,)
    assert c.layer.output_shape is None and c.geometry.output_shape == (2, 5, 8)


def test_negative_axes_count_from_input_end() -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 4, "attention_axes": [-3, -2]},
                     {"query": [2, 3, 4, 5, 8], "value": [2, 3, 4, 5, 8]})
    assert spec.geometry.attention_axes == (2, 3)


def test_from_keras_config_keeps_unused_keys() -> None:
    config = {
        "name": "mha", "trainable": True, "flash_attention": None,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"},
                  "registered_name": None},
        "num_heads": 2, "key_dim": 4, "value_dim": None, "dropout": 0.0, "use_bias": True,
        "output_shape": None, "attention_axes": None,
        "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform",
                               "config": {"seed": None}, "registered_name": None},
        "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                             "registered_name": None},
        "kernel_regularizer": {"module": "keras.regularizers", "class_name": "L2",
                               "config": {"l2": 0.01}, "registered_name": None},
        "bias_regularizer": None, "activity_regularizer": None, "kernel_constraint": None,
        "bias_constraint": None, "seed": None,
    }
    spec = mhagen.Spec.from_keras_config(config, query_shape=(2, 8, 16), value_shape=(2, 4, 16))
    assert spec.call.dtype == "mixed_float16"
    assert spec.layer.kernel_initializer == "glorot_uniform"
    assert spec.ignored_keys["name"] == "mha" and "kernel_regularizer" in spec.ignored_keys
    assert mhagen.Spec.from_dict(spec.to_dict()) == spec
    explicit = mhagen.Spec.from_keras_config(config, query_shape=(2, 8, 16), value_shape=(2, 4, 16),
                                             dtype="float32")
    assert explicit.call.dtype == "float32"


def test_init_weights_reproducible_and_shaped() -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 4, "value_dim": 3, "use_gate": True, "seed": 7,
                      "output_shape": [2, 3]}, {"query": [2, 5, 8], "value": [2, 7, 6], "key": [2, 7, 5]})
    a, b = mhagen.init_weights(spec), mhagen.init_weights(spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    from mhagen.weights import weight_names

    assert weight_names(spec) == ["query/kernel", "query/bias", "key/kernel", "key/bias", "gate/kernel",
                                  "gate/bias", "value/kernel", "value/bias", "attention_output/kernel",
                                  "attention_output/bias"]
    assert [w.shape for w in a] == [(8, 2, 4), (2, 4), (5, 2, 4), (2, 4), (8, 2, 3), (2, 3), (6, 2, 3),
                                    (2, 3), (2, 3, 2, 3), (2, 3)]
    limit = np.sqrt(6.0 / (8 + 2 * 4))  # glorot_uniform on (D, N, H): fan_in D, fan_out N*H
    assert np.abs(a[0]).max() <= limit and np.abs(a[0]).max() > 0.5 * limit
    assert not np.any(a[1])


def test_weights_validation() -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 4}, CALL)
    good = mhagen.init_weights(spec)
    from mhagen.weights import normalize_weights, weight_names

    as_dict = {f"mha/{n}:0": w for n, w in zip(weight_names(spec), good)}
    assert all(np.array_equal(x, y) for x, y in zip(normalize_weights(spec, as_dict), good))
    with pytest.raises(mhagen.WeightsError, match="`query/kernel` has shape \\(8, 2, 3\\), expected \\(8, 2, 4\\)"):
        normalize_weights(spec, [np.zeros((8, 2, 3))] + good[1:])
    with pytest.raises(mhagen.WeightsError, match="Received 7 weight arrays, expected 8"):
        normalize_weights(spec, good[:-1])
    with pytest.raises(mhagen.WeightsError, match="missing \\['value/bias'\\]"):
        normalize_weights(spec, {n: w for n, w in zip(weight_names(spec), good) if n != "value/bias"})
