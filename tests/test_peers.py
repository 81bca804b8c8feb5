"""Peers in the benchmark (`mhagen.peers`): the same layer and weights in ONNX Runtime and OpenVINO
must give the oracle's output at their precision's tolerance; the benchmark reports them under
`results.<peer>`; bad `--peers` and `--threads` are refused in one line. Without the `bench` extra
(pip install 'mhagen[bench]') the runtime tests skip with that reason."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import mhagen
from conftest import make_spec, unit_inputs
from corpus import refuses
from mhagen.peers import PEERS, PeerSkipped, make_peer, parse_peers, unsupported
from mhagen.verify import TOLERANCES, compare

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "openvino")}


def _needs(peer: str) -> None:
    runtime = "onnxruntime" if peer.startswith("onnxruntime") else "openvino"
    for package in ("onnx", runtime):
        if not HAVE[package]:
            pytest.skip(f"{package} is not installed (pip install 'mhagen[bench]')")


# Small shapes through every feature the ONNX graphs express: self and cross attention (a
# separate key, value_dim != key_dim), a (B, T, S) mask, a (T, S) mask, causal, a sliding window,
# the gate without biases, a 2-D output shape. `causal_mask_window` has query rows with every key
# masked (Keras gives them 0).
CASES = {
    "self": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 7, 8], "value": [2, 7, 8]}),
    "cross_key_value_dims": ({"num_heads": 2, "key_dim": 4, "value_dim": 3},
                             {"query": [2, 5, 8], "value": [2, 11, 6], "key": [2, 11, 5]}),
    "causal_mask_window": ({"num_heads": 2, "key_dim": 4, "sliding_window": 3},
                           {"query": [2, 9, 8], "value": [2, 9, 8], "use_causal_mask": True,
                            "attention_mask": True}),
    "mask_TS_gate_no_bias": ({"num_heads": 2, "key_dim": 4, "use_gate": True, "use_bias": False},
                             {"query": [2, 5, 8], "value": [2, 7, 8], "attention_mask": [5, 7]}),
    "output_shape": ({"num_heads": 2, "key_dim": 4, "output_shape": [3, 2]},
                     {"query": [1, 5, 8], "value": [1, 6, 8], "use_causal_mask": True}),
}

TINY = """
[layer]
num_heads = 2
key_dim = 4
seed = 0

[call]
query = [1, 6, 8]
value = [1, 9, 8]
attention_mask = true
"""


def _masked_inputs(spec: mhagen.Spec) -> dict[str, np.ndarray]:
    inputs = unit_inputs(spec, seed=1)
    if "attention_mask" in inputs:          # one query row with every key masked
        mask = inputs["attention_mask"].copy()
        mask[..., 1, :] = False
        inputs["attention_mask"] = mask
    return inputs


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("peer", PEERS)
def test_peer_matches_oracle(peer: str, case: str) -> None:
    _needs(peer)
    spec = make_spec(*CASES[case])
    weights = mhagen.init_weights(spec)
    inputs = _masked_inputs(spec)
    try:
        built = make_peer(peer, spec, weights, inputs, threads=1)
    except PeerSkipped as exc:              # openvino_bf16 on a CPU whose default is f32
        assert peer == "openvino_bf16", exc
        pytest.skip(str(exc))
    result = compare(built.to_host(built.call()), mhagen.reference(spec, weights, **inputs),
                     tol=TOLERANCES[built.precision])
    assert result.passed, result.message
    if built.precision == "float32":
        assert result.max_abs < 1e-6, result.message


@pytest.mark.parametrize("peer", ["onnxruntime", "openvino"])
def test_peer_holds_the_arrays_it_reads(peer: str) -> None:
    """The runtimes read the inputs in place; the mask is a converted copy that only the peer
    holds. With the peer object dropped and the memory reused, the call must still be right
    (OpenVINO read freed memory: |err| 0.32 on masked cross-attention, or a segfault)."""
    import gc

    _needs(peer)
    spec = make_spec({"num_heads": 2, "key_dim": 4}, {"query": [1, 16, 8], "value": [1, 64, 8],
                                                      "attention_mask": True})
    weights = mhagen.init_weights(spec)
    inputs = _masked_inputs(spec)
    built = make_peer(peer, spec, weights, inputs, threads=1)
    call, to_host = built.call, built.to_host
    del built
    gc.collect()
    junk = [np.ones(n, dtype=np.uint8) for n in (16 * 64, 16 * 64 * 4, 16 * 64 * 8) for _ in range(50)]
    result = compare(to_host(call()), mhagen.reference(spec, weights, **inputs), tol=TOLERANCES["float32"])
    assert result.passed and junk, result.message


def test_unsupported_specs_name_the_reason() -> None:
    five_d = make_spec({"num_heads": 2, "key_dim": 4, "attention_axes": [2, 3]},
                       {"query": [1, 2, 4, 4, 8], "value": [1, 2, 4, 4, 8]})
    assert "3-D inputs" in unsupported(five_d)
    scores = make_spec({"num_heads": 2, "key_dim": 4},
                       {"query": [1, 4, 8], "value": [1, 4, 8], "return_attention_scores": True})
    assert "scores" in unsupported(scores)
    assert unsupported(make_spec(*CASES["causal_mask_window"])) == ""


def test_oracle_on_query_rows_equals_the_whole_oracle(monkeypatch) -> None:
    """Past the oracle's size limit, the bench checks the first and last rows against the same
    layer on those rows (causal, window and mask cut to them): the rows must equal the full oracle's."""
    import mhagen.bench as bench

    spec = make_spec({"num_heads": 2, "key_dim": 4, "sliding_window": 4},
                     {"query": [2, 12, 8], "value": [2, 12, 8], "use_causal_mask": True, "attention_mask": True})
    weights = mhagen.init_weights(spec)
    inputs = _masked_inputs(spec)
    full = mhagen.reference(spec, weights, **inputs)
    monkeypatch.setattr(bench, "ORACLE_MAX_SCORES", 1)
    monkeypatch.setattr(bench, "ORACLE_CHECK_ROWS", 3)
    rows, expected, which = bench._expected_rows(spec, weights, inputs)
    assert list(rows) == [0, 1, 2, 9, 10, 11] and "6 of 12" in which
    np.testing.assert_allclose(expected, full[:, rows], atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def tiny_bench_json(tmp_path_factory) -> dict:
    for peer in PEERS:
        _needs(peer)
    from mhagen.cli import main

    folder = tmp_path_factory.mktemp("peers")
    spec, out = folder / "tiny.toml", folder / "bench.json"
    spec.write_text(TINY)
    assert main(["bench", str(spec), "--repeats", "3", "--no-memory", "--peers", "onnxruntime,openvino",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_json_has_every_peer(tiny_bench_json: dict) -> None:
    result = tiny_bench_json["results"][0]
    assert result["threads"] >= 1 and result["oracle_checked_rows"] == "all"
    for name in ("mhagen", "jax", "onnxruntime", "onnxruntime_fused", "openvino"):
        row = result["results"][name]
        assert {"median_ms", "peak_mb", "ratio_to_jax", "precision", "max_abs_vs_oracle", "note"} <= set(row)
        assert row["precision"] == "float32" and row["max_abs_vs_oracle"] < 1e-5, (name, row)
        assert len(row["times_ms"]) == 3 and row["median_ms"] > 0, (name, row)
    bf16 = result["results"]["openvino_bf16"]
    assert bf16["precision"] == "bfloat16" or bf16["note"].startswith("skipped"), bf16
    env = tiny_bench_json["environment"]
    assert env["onnxruntime"] != "unknown" and env["openvino"] != "unknown"


def test_peer_that_disagrees_is_reported_not_timed(monkeypatch) -> None:
    """A graph that fills masked scores with 0 instead of -1e9 computes another function: the bench
    names its error and gives it no time."""
    _needs("onnxruntime")
    import mhagen.peers

    from mhagen.bench import bench_spec, peers_table

    monkeypatch.setattr(mhagen.peers, "LARGE_NEGATIVE", 0.0)
    spec = mhagen.Spec.from_toml(TINY)
    result = bench_spec(spec, name="tiny", peers=("onnxruntime",), repeats=3, memory=False, threads=1)
    row = result.rows["onnxruntime"]
    assert row.times_ms == [] and row.note.startswith("does not match the oracle"), row
    assert row.max_abs_vs_oracle > 1e-3
    assert result.rows["mhagen"].times_ms and "mismatch, max err" in peers_table([result])


def test_skipped_spec_keeps_the_reason(tmp_path) -> None:
    _needs("onnxruntime")
    from mhagen.bench import bench_spec

    spec = make_spec({"num_heads": 2, "key_dim": 4, "attention_axes": [2, 3]},
                     {"query": [1, 2, 4, 4, 8], "value": [1, 2, 4, 4, 8]})
    result = bench_spec(spec, peers=("onnxruntime_fused",), repeats=3, memory=False, oracle=False, threads=1)
    row = result.to_dict()["results"]["onnxruntime_fused"]
    assert row["median_ms"] is None and "3-D inputs" in row["note"], row


def test_unknown_peer_is_refused(tmp_path, capsys) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    refuses(["bench", str(spec), "--peers", "tensorrt"], capsys, needle=["`peers`", "onnxruntime", "tensorrt"])
    refuses(["bench", str(spec), "--peers", ","], capsys, needle="`peers`")


def test_missing_package_says_how_to_install(tmp_path, capsys, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    refuses(["bench", str(spec), "--peers", "openvino"], capsys,
            needle=["openvino", "pip install 'mhagen[bench]'"], max_lines=1)
    with pytest.raises(mhagen.MhagenError, match="openvino"):
        parse_peers("onnxruntime,openvino")


def test_bad_threads_refused(tmp_path, capsys) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    refuses(["bench", str(spec), "--threads", "0"], capsys, needle=["`threads`", "threads=0"])
    refuses(["bench", str(spec), "--threads", "4096"], capsys, needle=["`threads`", "threads=4096"])
