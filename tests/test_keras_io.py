"""Keras interop: specs from real Keras 3 configs, weights from live layers and every file format
(.keras, .weights.h5, legacy tf.keras .h5), and `mhagen import-keras` followed by `mhagen verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mhagen
from mhagen.cli import main
from mhagen.keras_io import read_keras
from mhagen.weights import weight_names
from mhagen.weights_io import load_weights_file

os.environ.setdefault("KERAS_BACKEND", "jax")


def _seeded(layer: Any, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    layer.set_weights([(0.3 * rng.standard_normal(w.shape)).astype(np.float32) for w in layer.get_weights()])
    return layer


def _two_layer_model(keras: Any) -> Any:
    """query (8, 16), value (4, 12): `mha` (gated) then `mha2` (no bias, self-attention)."""
    q, v = keras.Input((8, 16)), keras.Input((4, 12))
    first = keras.layers.MultiHeadAttention(2, 4, name="mha", use_gate=True, kernel_initializer="zeros")
    second = keras.layers.MultiHeadAttention(2, 4, name="mha2", use_bias=False, kernel_initializer="zeros")
    model = keras.Model([q, v], second(first(q, v), first(q, v)))
    _seeded(first, 1)
    _seeded(second, 2)
    return model


def _same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ---- the core install -----------------------------------------------------------------------------
def test_core_install_never_imports_keras() -> None:
    code = ("import sys, mhagen, mhagen.cli; mhagen.cli.build_parser(); "
            "bad = [m for m in ('keras', 'h5py', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_keras_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` now raises ImportError
    with pytest.raises(mhagen.MhagenError, match=r"pip install mhagen\[keras\]"):
        mhagen.weights_from_keras(object())


# ---- specs from real Keras configs ----------------------------------------------------------------
@pytest.mark.parametrize("use_gate,use_bias", [(False, True), (True, True), (True, False), (False, False)])
def test_get_weights_order_and_paths_match_mhagen(keras: Any, use_gate: bool, use_bias: bool) -> None:
    layer = keras.layers.MultiHeadAttention(2, 4, value_dim=3, use_gate=use_gate, use_bias=use_bias,
                                            output_shape=(2, 5), name="mha", kernel_initializer="zeros")
    layer.build((2, 6, 8), (2, 7, 5), (2, 7, 3))
    spec = mhagen.Spec.from_keras_config(layer.get_config(), query_shape=(2, 6, 8), value_shape=(2, 7, 5),
                                         key_shape=(2, 7, 3))
    paths = [w.path.removeprefix("mha/") for w in layer.weights]
    assert paths == weight_names(spec)
    assert [tuple(a.shape) for a in layer.get_weights()] == [
        s for _, s in spec.geometry.weight_shapes(use_bias=use_bias, use_gate=use_gate)]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16", "float16"])
def test_dtype_policies_as_keras_writes_them(keras: Any, policy: str) -> None:
    config = keras.layers.MultiHeadAttention(2, 4, dtype=policy).get_config()
    assert config["dtype"]["config"]["name"] == policy  # a serialized DTypePolicy dict
    for written in (config, {**config, "dtype": policy}):  # and the bare name older configs hold
        spec = mhagen.Spec.from_keras_config(written, query_shape=(2, 4, 8), value_shape=(2, 4, 8))
        assert spec.call.dtype == policy
        assert spec.keras["dtype"] == mhagen.Spec.from_dict(spec.to_dict()).keras["dtype"]
    explicit = mhagen.Spec.from_keras_config(config, query_shape=(2, 4, 8), value_shape=(2, 4, 8),
                                             dtype="float32")
    assert explicit.call.dtype == "float32"


def test_unused_config_keys_are_kept_and_reported(keras: Any) -> None:
    layer = keras.layers.MultiHeadAttention(
        2, 4, name="attn", trainable=False, kernel_regularizer="l2", bias_regularizer=keras.regularizers.L1(0.1),
        activity_regularizer="l1", kernel_constraint="non_neg", bias_constraint=keras.constraints.MaxNorm(2.0),
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02, seed=3), bias_initializer="ones")
    config = {**layer.get_config(), "flash_attention": False}  # a key other Keras versions write
    spec = mhagen.Spec.from_keras_config(config, query_shape=(2, 4, 8), value_shape=(2, 4, 8))
    assert set(spec.ignored_keys) == {
        "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
        "bias_constraint", "name", "trainable", "dtype", "flash_attention"}
    assert spec.ignored_keys["kernel_regularizer"]["class_name"] == "L2"
    assert spec.ignored_keys["name"] == "attn" and spec.ignored_keys["flash_attention"] is False
    assert spec.layer.kernel_initializer == {"class_name": "truncated_normal",
                                             "config": {"seed": 3, "mean": 0.0, "stddev": 0.02}}
    assert spec.layer.bias_initializer == "ones"
    assert mhagen.Spec.from_toml(spec.to_toml()) == spec


def test_initializer_mhagen_cannot_draw_is_kept_not_refused(keras: Any) -> None:
    layer = keras.layers.MultiHeadAttention(2, 4, kernel_initializer=keras.initializers.VarianceScaling(2.0))
    spec = mhagen.Spec.from_keras_config(layer.get_config(), query_shape=(2, 4, 8), value_shape=(2, 4, 8))
    assert spec.ignored_keys["kernel_initializer"]["class_name"] == "VarianceScaling"
    assert mhagen.Spec.from_toml(spec.to_toml()) == spec


# ---- weights from live objects and files ----------------------------------------------------------
def test_weights_from_live_layer_and_model(keras: Any) -> None:
    model = _two_layer_model(keras)
    for name in ("mha", "mha2"):
        want = model.get_layer(name).get_weights()
        _same(mhagen.weights_from_keras(model.get_layer(name)), want)
        _same(mhagen.weights_from_keras(model, layer=name), want)
    with pytest.raises(mhagen.WeightsError, match=r"2 MultiHeadAttention layers \['mha', 'mha2'\]"):
        mhagen.weights_from_keras(model)
    with pytest.raises(mhagen.WeightsError, match=r"one of \['mha', 'mha2'\]. Received: layer='nope'"):
        mhagen.weights_from_keras(model, layer="nope")


def test_weights_from_keras_and_weights_h5_files(keras: Any, tmp_path: Path) -> None:
    model = _two_layer_model(keras)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    for name in ("mha", "mha2"):
        want = model.get_layer(name).get_weights()
        for file in ("m.keras", "m.weights.h5"):
            _same(mhagen.weights_from_keras(tmp_path / file, layer=name), want)
    assert read_keras(tmp_path / "m.keras", layer="mha").config["use_gate"] is True
    assert read_keras(tmp_path / "m.weights.h5", layer="mha").config is None


def _write_tf_keras_h5(path: Path, arrays: dict[str, np.ndarray], *, whole_model: bool) -> None:
    """The tf.keras 2.x HDF5 layout: `[model_weights/]<layer>/<layer>/query/kernel:0` datasets,
    listed in the group's `weight_names` attribute (TF writes query, key, value, output)."""
    import h5py

    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        root.attrs["layer_names"] = [b"input_1", b"mha"]
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.15.0"
        root.create_group("input_1").attrs["weight_names"] = []
        group = root.create_group("mha")
        names = [f"mha/{k}:0" for k in arrays]
        group.attrs["weight_names"] = [n.encode() for n in names]
        for name, array in zip(names, arrays.values()):
            group.create_dataset(name, data=array)
        if whole_model:
            f.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {}})


@pytest.mark.parametrize("whole_model", [False, True], ids=["save_weights", "model_save"])
def test_legacy_tf_keras_h5(keras: Any, tmp_path: Path, whole_model: bool) -> None:
    layer = keras.layers.MultiHeadAttention(2, 4, name="mha", kernel_initializer="zeros")
    layer.build((2, 5, 8), (2, 6, 8))
    _seeded(layer)
    names = [w.path.removeprefix("mha/") for w in layer.weights]
    arrays = dict(zip(names, layer.get_weights()))
    shuffled = {n: arrays[n] for n in reversed(names)}  # order comes from the names, not the file
    _write_tf_keras_h5(tmp_path / "w.h5", shuffled, whole_model=whole_model)
    _same(mhagen.weights_from_keras(tmp_path / "w.h5"), layer.get_weights())
    _same(mhagen.weights_from_keras(str(tmp_path / "w.h5"), layer="mha"), layer.get_weights())


def test_keras_archive_with_unregistered_custom_layer_reads_the_files(keras: Any, tmp_path: Path) -> None:
    class Block(keras.layers.Layer):  # not registered: Keras cannot rebuild the model
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.attention = keras.layers.MultiHeadAttention(2, 4, name="inner", kernel_initializer="zeros")

        def call(self, x: Any) -> Any:
            return self.attention(x, x)

    x = keras.Input((6, 8))
    block = Block(name="block")
    model = keras.Model(x, block(x))
    _seeded(block.attention)
    model.save(tmp_path / "custom.keras")
    found = read_keras(tmp_path / "custom.keras")
    assert found.name == "inner" and found.config is None  # the custom layer's config omits it
    _same(list(found.weights.values()), block.attention.get_weights())


def test_weights_errors(keras: Any, tmp_path: Path) -> None:
    with pytest.raises(mhagen.WeightsError, match="not built"):
        mhagen.weights_from_keras(keras.layers.MultiHeadAttention(2, 4))
    with pytest.raises(mhagen.WeightsError, match="not found"):
        mhagen.weights_from_keras(tmp_path / "missing.keras")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(mhagen.WeightsError, match=r"\.keras, \.weights\.h5"):
        mhagen.weights_from_keras(tmp_path / "w.bin")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(mhagen.WeightsError, match="not a readable HDF5"):
        mhagen.weights_from_keras(tmp_path / "bad.h5")
    with pytest.raises(mhagen.WeightsError, match="expected a Keras layer or model"):
        mhagen.weights_from_keras([np.zeros(3)])
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(mhagen.WeightsError, match="No MultiHeadAttention"):
        mhagen.weights_from_keras(dense)


# ---- the two commands -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .keras model with one MultiHeadAttention `mha`: query (8, 16), value (4, 16)."""
    q, v = keras.Input((8, 16)), keras.Input((4, 16))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha", kernel_initializer="zeros")
    model = keras.Model([q, v], keras.layers.Dense(3)(mha(q, v)))
    _seeded(mha, 5)
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    model.save(path)
    return path


def test_import_keras_then_verify(keras: Any, saved_model: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.toml"
    assert main(["import-keras", str(saved_model), "--layer", "mha", "--query-shape", "2,8,16",
                 "--value-shape", "2,4,16", "--out", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "kept in the spec, not used for inference: dtype, name, trainable" in out
    assert (tmp_path / "spec.keras-ref.npz").is_file()  # the model's own output: verify compares with it too
    assert main(["verify", str(spec_path), "--target", "cpu"]) == 0
    assert "vs source" in capsys.readouterr().out

    # The sidecar holds the model's own weights, and the built layer computes what Keras computes.
    model = keras.saving.load_model(saved_model)
    mha = model.get_layer("mha")
    weights = load_weights_file(tmp_path / "spec.npz")
    _same([weights[n] for n in weight_names(mhagen.Spec.load(spec_path))], mha.get_weights())
    rng = np.random.default_rng(0)
    query, value = rng.standard_normal((2, 8, 16), np.float32), rng.standard_normal((2, 4, 16), np.float32)
    compiled = mhagen.build(spec_path, target="cpu", weights=weights)
    np.testing.assert_allclose(compiled(query, value), np.asarray(mha(query, value)), atol=1e-5, rtol=0)


def test_import_keras_options(keras: Any, saved_model: Path, tmp_path: Path) -> None:
    # The .keras model's graph calls `mha` plainly, so these flags would contradict it (refused,
    # see test_keras_interop.py): a weights-only file plus --config records no call site.
    model = keras.saving.load_model(saved_model)
    mha = model.get_layer("mha")
    weights = tmp_path / "mha.weights.h5"
    model.save_weights(weights)
    (tmp_path / "mha.json").write_text(json.dumps(mha.get_config()))
    spec_path = tmp_path / "masked.toml"
    assert main(["import-keras", str(weights), "--config", str(tmp_path / "mha.json"),
                 "--query-shape", "2,8,16", "--value-shape", "2,4,16",
                 "--attention-mask", "2,2,8,4", "--causal", "--scores", "--dtype", "float16",
                 "--format", "safetensors", "--out", str(spec_path)]) == 0
    spec = mhagen.Spec.load(spec_path)
    assert spec.call.attention_mask == (2, 2, 8, 4) and spec.call.use_causal_mask
    assert spec.call.return_attention_scores and spec.call.dtype == "float16"
    assert (tmp_path / "masked.safetensors").is_file() and not (tmp_path / "masked.npz").exists()
    assert main(["import-keras", str(weights), "--config", str(tmp_path / "mha.json"), "--query-shape",
                 "2,8,16", "--value-shape", "2,4,16", "--attention-mask", "--out", str(spec_path)]) == 0
    assert mhagen.Spec.load(spec_path).call.attention_mask is True


def test_import_keras_weights_only_file_needs_config(keras: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model = _two_layer_model(keras)
    model.save_weights(tmp_path / "m.weights.h5")
    args = ["import-keras", str(tmp_path / "m.weights.h5"), "--layer", "mha", "--query-shape", "2,8,16",
            "--value-shape", "2,4,12", "--out", str(tmp_path / "s.toml")]
    assert main(args) == 2
    assert "holds weights only" in capsys.readouterr().err
    (tmp_path / "mha.json").write_text(json.dumps(model.get_layer("mha").get_config()))
    assert main(args + ["--config", str(tmp_path / "mha.json")]) == 0
    assert mhagen.Spec.load(tmp_path / "s.toml").layer.use_gate


@pytest.mark.parametrize("args,message", [
    (["--query-shape", "2,8,x", "--value-shape", "2,4,16"], "`--query-shape`, expected comma-separated"),
    (["--query-shape", "2,8,15", "--value-shape", "2,4,16"], "Weight `query/kernel` has shape (16, 2, 4)"),
    (["--query-shape", "2,8,16", "--value-shape", "2,4,16", "--layer", "other"], "Received: layer='other'"),
    (["--query-shape", "2,8,16", "--value-shape", "2,4,16", "--key-shape", "2,5,16"],
     "--key-shape contradicts call 0 of `mha`, which passes no separate key"),
], ids=["bad_shape", "shape_vs_weights", "unknown_layer", "key_not_in_the_graph"])
def test_import_keras_refuses_bad_input(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], message: str) -> None:
    out = tmp_path / "s.toml"
    assert main(["import-keras", str(saved_model), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhagen: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "s.npz").exists()


def test_import_keras_refuses_a_stale_npz_that_build_would_prefer(
        saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s.npz").write_bytes(b"")
    assert main(["import-keras", str(saved_model), "--query-shape", "2,8,16", "--value-shape", "2,4,16",
                 "--format", "safetensors", "--out", str(tmp_path / "s.toml")]) == 2
    assert "would load it before s.safetensors" in capsys.readouterr().err


def test_verify_reference_file_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`verify --reference` reads only a SourceReference .npz; anything else is one line (exit 2)."""
    from corpus import refuses

    spec = tmp_path / "s.toml"
    spec.write_text("[layer]\nnum_heads = 2\nkey_dim = 4\n[call]\nquery = [2, 3, 8]\nvalue = [2, 3, 8]\n")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    refuses(["verify", str(spec), "--reference", str(tmp_path / "bad.npz")], capsys,
            needle="is not a readable .npz", max_lines=1)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    refuses(["verify", str(spec), "--reference", str(tmp_path / "other.npz")], capsys,
            needle="expected source, input_query", max_lines=1)
