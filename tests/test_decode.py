"""Decoder builds (`[call] cache_max_length`): prefill and decode steps over a KV cache on the device.

The compiled steps are checked against the NumPy oracle's `reference_step`, against the oracle's
whole causal forward over the same tokens, and against keras_hub's CachedMultiHeadAttention called
the way keras_hub's generation loop calls it (a causal mask over the whole cache), on cpu, vmvx and
vulkan. The oracle's steps are checked against its own whole forward without any compile.
"""

from __future__ import annotations

import numpy as np
import pytest

import mhagen
from mhagen.errors import CallError, SpecError
from mhagen.oracle import reference, reference_step
from mhagen.verify import compare, tolerance
from mhagen.weights import init_weights, weight_names

from conftest import vulkan_available

B, T, S, D = 2, 4, 64, 16


def runnable_targets(names: list[str]) -> list:
    """Targets as test parameters; vulkan skipped, with the reason, where no device exists."""
    ok, reason = vulkan_available()
    return [pytest.param(n, marks=pytest.mark.skip(reason=f"no Vulkan device: {reason}"))
            if n == "vulkan" and not ok else n for n in names]


def decoder_spec(**call: object) -> mhagen.Spec:
    layer = call.pop("layer", {})
    return mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 8, "seed": 3, **layer},  # type: ignore[dict-item]
                                  "call": {"query": [B, T, D], "value": [B, T, D], "use_causal_mask": True,
                                           "cache_max_length": S, **call}})


def tokens(n: int, seed: int, features: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, n, features)).astype(np.float32)


def whole(spec: mhagen.Spec, weights: list[np.ndarray], x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The oracle's whole causal forward over every token so far."""
    n = x.shape[1]
    full = spec.replace(call={"query": [B, n, D], "value": [B, n, D], "cache_max_length": max(n, S),
                              "attention_mask": mask is not None})
    return reference(full, weights, x, x, attention_mask=mask)  # type: ignore[return-value]


# -- the oracle alone ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [{}, {"use_gate": True, "use_bias": False}, {"sliding_window": 3}],
                         ids=["plain", "gate-nobias", "window3"])
def test_oracle_steps_equal_the_whole_causal_forward(layer: dict) -> None:
    spec = decoder_spec(layer=layer)
    w = init_weights(spec)
    x = tokens(11, 1)
    cache, outs, at = np.zeros(spec.cache_shape), [], 0
    for n in (5, 1, 1, 3, 1):
        out, cache = reference_step(spec, w, cache, at, x[:, at:at + n], x[:, at:at + n])
        outs.append(out)
        at += n
    np.testing.assert_allclose(np.concatenate(outs, axis=1), whole(spec, w, x), rtol=0, atol=1e-12)
    # The cache holds the projected keys then values of every token, keras_hub's layout.
    named = dict(zip(weight_names(spec), w))
    k = np.tensordot(x.astype(np.float64), named["key/kernel"], axes=([-1], [0]))
    k = k + named["key/bias"] if spec.layer.use_bias else k
    np.testing.assert_allclose(cache[:, 0, :11], k, atol=1e-6)
    assert not cache[:, :, 11:].any()


def test_oracle_padding_mask_matches_the_whole_forward() -> None:
    spec = decoder_spec(attention_mask=True)
    w = init_weights(spec)
    x = tokens(6, 2)
    keep = np.random.default_rng(5).random((B, 6)) < 0.7          # padded keys, per batch row
    full_mask = np.broadcast_to(keep[:, None, :], (B, 6, 6))
    cache, outs = np.zeros(spec.cache_shape), []
    for at, n in ((0, 4), (4, 1), (5, 1)):
        step_mask = np.zeros((B, n, S), bool)
        step_mask[:, :, :6] = keep[:, None, :]
        out, cache = reference_step(spec, w, cache, at, x[:, at:at + n], x[:, at:at + n], attention_mask=step_mask)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), whole(spec, w, x, full_mask), atol=1e-12)


# -- the spec --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, needle", [
    ({"use_causal_mask": False}, "use_causal_mask = true"),
    ({"value": [B, 6, D]}, "self-attention"),
    ({"layer": {"value_dim": 4}}, "value_dim"),
    ({"query": [B, 2, 2, D], "value": [B, 2, 2, D], "layer": {"attention_axes": [1]}}, "3-D inputs"),
    ({"cache_max_length": 3}, "at least the chunk length T = 4"),
    ({"cache_max_length": 0}, "cache_max_length"),
    ({"return_attention_scores": True}, "return_attention_scores"),
    ({"dynamic": ["batch"], "max_batch": 4}, "`dynamic`"),
    ({"layer": {"masking": "keras2"}}, "keras2"),
    ({"attention_mask": [B, 1, T]}, "attention_mask = true"),
])
def test_decoder_spec_refusals(change: dict, needle: str) -> None:
    with pytest.raises(SpecError, match=None) as info:
        decoder_spec(**dict(change))
    assert needle in str(info.value)


def test_decoder_spec_round_trips_and_from_keras_config() -> None:
    spec = decoder_spec()
    assert mhagen.Spec.from_toml(spec.to_toml()) == spec and spec.is_decoder
    assert spec.cache_shape == (B, 2, S, 2, 8)
    cfg = {"num_heads": 2, "key_dim": 8, "name": "cached"}
    from_keras = mhagen.Spec.from_keras_config(cfg, query_shape=(B, T, D), value_shape=(B, T, D),
                                               use_causal_mask=True, cache_max_length=S)
    assert from_keras.call.cache_max_length == S and from_keras.keras == {"name": "cached"}


# -- compiled steps --------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=runnable_targets(["cpu", "vmvx", "vulkan"]))
def built(request: pytest.FixtureRequest) -> tuple[mhagen.Spec, list[np.ndarray], object]:
    spec = decoder_spec(attention_mask=True, layer={"use_gate": True})
    w = init_weights(spec)
    return spec, w, mhagen.build(spec, target=request.param, weights=w)   # verifies the steps too


def test_steps_equal_the_oracle_and_the_whole_forward(built) -> None:
    spec, w, layer = built
    tol = tolerance(spec)
    x = tokens(14, 7)
    ones = np.ones((B, 1, S), bool)
    out, cache = layer.prefill(x[:, :6], x[:, :6])                 # a chunk of 4, then 2 more
    outs = [out]
    expected_cache, at = np.zeros(spec.cache_shape), 0
    want, expected_cache = reference_step(spec, w, expected_cache, 0, x[:, :6], x[:, :6])
    assert compare(out, want, tol=tol).passed
    at = 6
    for n in (1, 1, 5, 1):                                          # single tokens and several
        before = cache
        out, cache = layer.decode(x[:, at:at + n], x[:, at:at + n], cache=cache)
        assert cache is before and cache.length == at + n           # the same cache, updated
        want, expected_cache = reference_step(spec, w, expected_cache, at, x[:, at:at + n], x[:, at:at + n],
                                              attention_mask=np.broadcast_to(ones, (B, n, S)))
        assert compare(out, want, tol=tol, name=f"step at {at}").passed
        outs.append(out)
        at += n
    got = np.concatenate(outs, axis=1)
    assert compare(got, whole(spec, w, x), tol=tol, name="whole forward").passed
    assert compare(np.asarray(cache), expected_cache, tol=tol, name="cache").passed


def test_cache_crosses_as_an_array_and_the_last_position(built) -> None:
    spec, w, layer = built
    tol = tolerance(spec)
    x = tokens(5, 11)
    _, cache = layer.prefill(x[:, :4], x[:, :4])
    host = np.asarray(cache)
    assert host.shape == spec.cache_shape and host.dtype == np.float32
    # A host array (as keras_hub holds it) continues the same generation; it is not changed.
    out_a, from_array = layer.decode(x[:, 4:], x[:, 4:], cache=host, index=4)
    assert not host[:, :, 4].any() and from_array is not cache
    out_b, _ = layer.decode(x[:, 4:], x[:, 4:], cache=cache)
    np.testing.assert_array_equal(out_a, out_b)
    # The last position reads the whole cache (the largest length bucket).
    last, _ = layer.decode(x[:, :1], x[:, :1], cache=host, index=S - 1)
    want, _ = reference_step(spec, w, host, S - 1, x[:, :1], x[:, :1])
    assert compare(last, want, tol=tol).passed


def test_decoder_context(built) -> None:
    spec, w, layer = built
    x = tokens(6, 13)
    with layer.decoder() as d:
        first = d.prefill(x[:, :5])
        nxt = d.step(x[:, 5:])
        assert d.index == 6
    got = np.concatenate([first, nxt], axis=1)
    assert compare(got, whole(spec, w, x), tol=tolerance(spec)).passed
    assert d.cache is None


@pytest.mark.parametrize("call, needle", [
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(1, 0), cache=None), "`cache` is required"),
    (lambda layer, c: layer.decode(tokens(2, 0), tokens(2, 0), cache=c, index=S - 1), "do not fit the cache"),
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(1, 0), cache=c, index=-1), "do not fit the cache"),
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(1, 0), cache=c, index=1.5), "`index` must be an int"),
    (lambda layer, c: layer.decode(tokens(1, 0, 8), tokens(1, 0), cache=c), "expected (2, t, 16)"),
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(2, 0), cache=c), "has 2 tokens"),
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(1, 0), cache=np.zeros((1, 2, S, 2, 8)), index=0),
     "`cache` has shape (1, 2, 64, 2, 8)"),
    (lambda layer, c: layer.decode(tokens(1, 0), tokens(1, 0), cache=c, attention_mask=np.ones((B, 1, 5))),
     "expected (2, 1, 64)"),
])
def test_step_call_errors(built, call, needle: str) -> None:
    _, _, layer = built
    _, cache = layer.prefill(tokens(2, 0), tokens(2, 0))
    with pytest.raises(CallError) as info:
        call(layer, cache)
    assert needle in str(info.value)


def test_whole_call_layer_has_no_steps() -> None:
    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4},
                                  "call": {"query": [1, 4, 8], "value": [1, 4, 8]}})
    layer = mhagen.build(spec, target="cpu")
    with pytest.raises(CallError, match="not a decoder build"):
        layer.prefill(np.zeros((1, 4, 8)), np.zeros((1, 4, 8)))


# -- keras_hub -------------------------------------------------------------------------------------
def _keras_hub_steps(spec: mhagen.Spec, weights: list[np.ndarray], x: np.ndarray,
                     plan: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """keras_hub's CachedMultiHeadAttention as its generation loop calls it: a zero cache, each call
    writing at `cache_update_index`, a causal mask over the whole cache."""
    keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed (the interop extra)")
    layer = keras_hub.layers.CachedMultiHeadAttention(num_heads=spec.layer.num_heads, key_dim=spec.layer.key_dim,
                                                      use_bias=spec.layer.use_bias)
    layer.build((B, 1, D), (B, 1, D))
    layer.set_weights(weights)
    cache = np.zeros(spec.cache_shape, np.float32)
    out = []
    for at, n in plan:
        mask = np.arange(S)[None, None, :] <= (at + np.arange(n))[None, :, None]
        y, cache = layer(x[:, at:at + n], x[:, at:at + n], attention_mask=np.broadcast_to(mask, (B, n, S)),
                         cache=cache, cache_update_index=at)
        cache = np.asarray(cache)
        out.append((np.asarray(y), cache))
    return out


@pytest.fixture(scope="module")
def hub_case(keras) -> tuple[mhagen.Spec, list[np.ndarray], np.ndarray, list, list]:
    spec = decoder_spec()
    w = init_weights(spec)
    x = tokens(12, 21)
    plan = [(0, 5), (5, 1), (6, 1), (7, 4), (11, 1)]
    return spec, w, x, plan, _keras_hub_steps(spec, w, x, plan)


@pytest.mark.parametrize("target", runnable_targets(["cpu", "vmvx", "vulkan"]))
def test_steps_equal_keras_hub_cached_attention(hub_case, target: str) -> None:
    spec, w, x, plan, hub = hub_case
    layer = mhagen.build(spec, target=target, weights=w)
    cache = None
    worst = 0.0
    for (at, n), (want, want_cache) in zip(plan, hub):
        if cache is None:
            got, cache = layer.prefill(x[:, :n], x[:, :n])
        else:
            got, cache = layer.decode(x[:, at:at + n], x[:, at:at + n], cache=cache, index=at)
        worst = max(worst, float(np.abs(got - want).max()), float(np.abs(np.asarray(cache) - want_cache).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"output at {at}")
        np.testing.assert_allclose(np.asarray(cache), want_cache, rtol=0, atol=1e-5, err_msg=f"cache at {at}")
    assert worst < 1e-5


def test_transformer_decoder_attention_from_a_keras_file(keras, tmp_path) -> None:
    """The self-attention inside a keras_hub TransformerDecoder, read by path from a saved .keras
    file, built as a decoder: its steps equal the live layer's cached calls."""
    keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed (the interop extra)")
    from mhagen.keras_io import read_keras

    dec = keras_hub.layers.TransformerDecoder(32, 2, name="dec")
    inputs = keras.Input((T, D))
    model = keras.Model(inputs, dec(inputs))
    model.save(tmp_path / "decoder.keras")
    found = read_keras(tmp_path / "decoder.keras", layer="dec/self_attention")
    spec = mhagen.Spec.from_keras_config(found.config, query_shape=(B, T, D), value_shape=(B, T, D),
                                         use_causal_mask=True, cache_max_length=16)
    weights = mhagen.weights_from_keras(tmp_path / "decoder.keras", layer="dec/self_attention")
    layer = mhagen.build(spec, target="cpu", weights=weights)
    live = dec._self_attention_layer
    x = tokens(6, 31)
    cache = np.zeros(spec.cache_shape, np.float32)
    ours = None
    for at, n in ((0, 5), (5, 1)):
        mask = np.broadcast_to(np.arange(16)[None, None, :] <= (at + np.arange(n))[None, :, None], (B, n, 16))
        want, cache = live(x[:, at:at + n], x[:, at:at + n], attention_mask=mask, cache=cache,
                           cache_update_index=at)
        cache = np.asarray(cache)
        if ours is None:
            got, ours = layer.prefill(x[:, :n], x[:, :n])
        else:
            got, ours = layer.decode(x[:, at:at + n], x[:, at:at + n], cache=ours)
        np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours), cache, rtol=0, atol=1e-5)


# -- cross-attention over a static cache -----------------------------------------------------------
S_ENC = 24


def cross_spec(**call: object) -> mhagen.Spec:
    return mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 8, "seed": 5},
                                  "call": {"query": [B, T, D], "value": [B, S_ENC, D], "cache_max_length": S_ENC,
                                           **call}})


def test_cross_oracle_equals_the_whole_cross_attention() -> None:
    from mhagen.oracle import reference_cache

    spec = cross_spec(attention_mask=True)
    assert spec.decoder_kind == "cross"
    w = init_weights(spec)
    q, enc = tokens(T, 3), np.random.default_rng(4).standard_normal((B, S_ENC, D))
    mask = np.random.default_rng(5).random((B, T, S_ENC)) < 0.7
    out, cache = reference_step(spec, w, reference_cache(spec, w, enc), None, q, attention_mask=mask)
    np.testing.assert_allclose(out, reference(spec, w, q, enc, attention_mask=mask), atol=1e-12)
    with pytest.raises(SpecError, match="cross-attention"):
        cross_spec(use_causal_mask=True)


@pytest.fixture(scope="module")
def hub_cross(keras) -> tuple[mhagen.Spec, list[np.ndarray], np.ndarray, np.ndarray, list]:
    """keras_hub's CachedMultiHeadAttention with a static cache (cache_update_index=None), the cache
    made from the encoder output by the layer's own key and value projections."""
    keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed (the interop extra)")
    spec = cross_spec()
    w = init_weights(spec)
    enc = np.random.default_rng(8).standard_normal((B, S_ENC, D)).astype(np.float32)
    q = tokens(6, 9)
    layer = keras_hub.layers.CachedMultiHeadAttention(num_heads=2, key_dim=8)
    layer.build((B, T, D), (B, S_ENC, D))
    layer.set_weights(w)
    cache = np.stack([np.asarray(layer._key_dense(enc)), np.asarray(layer._value_dense(enc))], axis=1)
    outs = [np.asarray(layer(q[:, a:b], q[:, a:b], cache=cache, cache_update_index=None)[0])
            for a, b in ((0, 5), (5, 6))]
    return spec, w, enc, q, [cache, *outs]


@pytest.mark.parametrize("target", runnable_targets(["cpu", "vmvx", "vulkan"]))
def test_cross_steps_equal_keras_hub(hub_cross, target: str) -> None:
    spec, w, enc, q, (hub_cache, first, second) = hub_cross
    layer = mhagen.build(spec, target=target, weights=w)
    got, cache = layer.prefill(q[:, :5], enc)
    np.testing.assert_allclose(np.asarray(cache), hub_cache, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, first, rtol=0, atol=1e-5)
    got, same = layer.decode(q[:, 5:], cache=hub_cache)       # a host cache, as keras_hub holds it
    np.testing.assert_allclose(got, second, rtol=0, atol=1e-5)
    with pytest.raises(CallError, match="pass no value, key or index"):
        layer.decode(q[:, 5:], q[:, 5:], cache=cache)


def test_a_cache_too_big_to_verify_is_refused_before_work() -> None:
    from mhagen.budget import check

    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 32, "key_dim": 128}, "call": {
        "query": [64, 16, 4096], "value": [64, 16, 4096], "use_causal_mask": True, "cache_max_length": 32768}})
    with pytest.raises(SpecError, match=r"KV cache \(64, 2, 32768, 32, 128\).*--no-verify"):
        check(spec, available=64 << 30)
    check(spec, verify=False, available=64 << 30)      # building it (for a bigger machine) fits


def test_import_keras_cache_max_length(keras, tmp_path, capsys) -> None:
    """`mhagen import-keras --cache-max-length S` on a keras_hub TransformerDecoder's self-attention:
    a causal decoder spec whose build verifies its steps."""
    keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed (the interop extra)")
    from mhagen.cli import main

    dec = keras_hub.layers.TransformerDecoder(32, 2, name="dec")
    inputs = keras.Input((T, D))
    keras.Model(inputs, dec(inputs)).save(tmp_path / "m.keras")
    out = tmp_path / "dec.toml"
    assert main(["import-keras", str(tmp_path / "m.keras"), "--layer", "dec/self_attention", "--query-shape",
                 f"1,{T},{D}", "--value-shape", f"1,{T},{D}", "--cache-max-length", "16", "--out", str(out)]) == 0
    spec = mhagen.Spec.load(out)
    assert spec.decoder_kind == "self" and spec.call.use_causal_mask and spec.cache_shape == (1, 2, 16, 2, 8)
    assert main(["verify", str(out), "--targets", "cpu"]) == 0
    assert "decoder steps" in capsys.readouterr().out


# -- found by an attack review ---------------------------------------------------------------------
def test_host_cache_needs_an_index_and_unread_positions_stay_unread(built) -> None:
    spec, w, layer = built
    x = tokens(7, 41)
    _, cache = layer.prefill(x[:, :6], x[:, :6])
    host = np.asarray(cache)
    with pytest.raises(CallError, match="`index` is required with a cache given as an array"):
        layer.decode(x[:, 6:], x[:, 6:], cache=host)
    # A NaN value past the last token written is never read (the oracle's rule), wherever the
    # length bucket ends; a NaN value that is read reaches the output.
    for pos in (10, 40):
        bad = host.copy()
        bad[:, 1, pos] = np.nan
        out, _ = layer.decode(x[:, 6:], x[:, 6:], cache=bad, index=6)
        want, _ = reference_step(spec, w, bad, 6, x[:, 6:], x[:, 6:])
        assert np.isfinite(want).all() and compare(out, want, tol=tolerance(spec)).passed
    bad = host.copy()
    bad[:, 1, 3] = np.nan
    out, _ = layer.decode(x[:, 6:], x[:, 6:], cache=bad, index=6)
    assert np.isnan(out).any()


def test_concurrent_decodes_on_one_cache_lose_no_token(built) -> None:
    import threading

    _, _, layer = built
    x = tokens(8, 43)
    _, cache = layer.prefill(x[:, :6], x[:, :6])
    threads = [threading.Thread(target=layer.decode, args=(x[:, 6 + i:7 + i], x[:, 6 + i:7 + i]),
                                kwargs={"cache": cache}) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    host = np.asarray(cache)
    assert cache.length == 8 and np.abs(host[:, 0, 6:8]).min() > 0 and not host[:, :, 8:].any()


def test_decoder_context_for_cross_attention_and_batch_check() -> None:
    spec = cross_spec()
    w = init_weights(spec)
    layer = mhagen.build(spec, target="cpu", weights=w)
    enc, q = np.random.default_rng(3).standard_normal((B, S_ENC, D)), tokens(5, 44)
    with layer.decoder(batch=B) as d:
        first = d.prefill(q[:, :4], enc)
        second = d.step(q[:, 4:])
    full = reference(spec.replace(call={"query": [B, 5, D]}), w, q, enc)
    assert compare(np.concatenate([first, second], axis=1), full, tol=tolerance(spec)).passed
    with pytest.raises(CallError, match="not this build's batch"):
        layer.decoder(batch=B + 1)
    with pytest.raises(CallError, match="spec declares no key"):
        layer.cross_cache(enc, enc)


def test_tampered_step_names_and_run_decode(tmp_path, capsys) -> None:
    import json

    from mhagen.bundle import build_bundle
    from mhagen.cli import main
    from mhagen.runtime import load_bundle
    from mhagen.targets import parse_targets

    from corpus import refuses

    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": {
        "query": [1, 4, 8], "value": [1, 4, 8], "use_causal_mask": True, "cache_max_length": 32}})
    out = tmp_path / "b"
    build_bundle(spec, parse_targets("cpu"), out)
    prompt = tmp_path / "q.npy"
    np.save(prompt, tokens(6, 45, 8)[:1])
    assert main(["run", str(out), "--input", f"query={prompt}", "--input", f"value={prompt}", "--decode", "3",
                 "--output", str(tmp_path / "gen")]) == 0
    assert np.load(tmp_path / "gen" / "output.npy").shape == (1, 9, 8)
    refuses(["run", str(out), "--input", f"query={prompt}", "--input", f"value={prompt}", "--decode", "30",
             "--output", str(tmp_path / "g2")], capsys, needle="need 36 cache positions")
    # Swapping two steps' names (each then reads another cache length) is refused at load.
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["interface"]["decoder"]["steps"]
    steps[0]["name"], steps[1]["name"] = steps[1]["name"], steps[0]["name"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mhagen.BundleError, match=r"steps\[0\]\.name must be 'step_t1_l16'"):
        load_bundle(out, "cpu")


def test_cache_larger_than_int64_is_refused() -> None:
    with pytest.raises(SpecError, match="fits int64"):
        decoder_spec(cache_max_length=1 << 62)
