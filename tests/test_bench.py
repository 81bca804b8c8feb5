"""The benchmark command (a smoke test: no timing is asserted) and the blocked attention path,
which must match the float64 oracle at the f32 contract (1e-5) wherever it is taken."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mhagen
from conftest import make_spec, unit_inputs
from mhagen.blocked import AttentionPath, choose_path
from mhagen.trace import forward, input_signature

ATOL = 1e-5

TINY = """
[layer]
num_heads = 2
key_dim = 4
seed = 0

[call]
query = [1, 6, 8]
value = [1, 6, 8]
use_causal_mask = true
"""

# Small shapes that put several query and key blocks, ragged last blocks, skipped blocks and
# all-masked rows through the blocked path (forced, with blocks of 2 queries x 3 keys).
BLOCKED_CASES = {
    "self": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 7, 8], "value": [2, 7, 8]}),
    "cross_key_value_dims": ({"num_heads": 2, "key_dim": 4, "value_dim": 3},
                             {"query": [2, 5, 8], "value": [2, 11, 6], "key": [2, 11, 5]}),
    "causal": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 9, 8], "value": [2, 9, 8], "use_causal_mask": True}),
    "causal_T_lt_S": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 4, 8], "value": [2, 10, 8], "use_causal_mask": True}),
    "causal_T_gt_S": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 10, 8], "value": [2, 4, 8], "use_causal_mask": True}),
    "sliding_window": ({"num_heads": 2, "key_dim": 4, "sliding_window": 2}, {"query": [2, 9, 8], "value": [2, 9, 8]}),
    "window_past_the_keys": ({"num_heads": 2, "key_dim": 4, "sliding_window": 2}, {"query": [2, 12, 8], "value": [2, 5, 8]}),
    "mask_causal_window": ({"num_heads": 2, "key_dim": 4, "sliding_window": 3},
                           {"query": [2, 9, 8], "value": [2, 9, 8], "use_causal_mask": True, "attention_mask": True}),
    "mask_BNTS": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 5, 8], "value": [2, 7, 8], "attention_mask": [2, 2, 5, 7]}),
    "mask_TS": ({"num_heads": 2, "key_dim": 4}, {"query": [2, 5, 8], "value": [2, 7, 8], "attention_mask": [5, 7]}),
    "gate_no_bias": ({"num_heads": 2, "key_dim": 4, "use_gate": True, "use_bias": False},
                     {"query": [2, 5, 8], "value": [2, 7, 8], "attention_mask": True}),
}


def _blocked_inputs(spec: mhagen.Spec) -> dict[str, np.ndarray]:
    inputs = unit_inputs(spec, seed=1)
    if "attention_mask" in inputs:   # one query row with every key masked: its context must be 0
        mask = inputs["attention_mask"].copy()
        mask[..., 1, :] = False
        inputs["attention_mask"] = mask
    return inputs


# Batch elements share a step when their scores are small, as in these tiny cases; these also run
# with one element per step, as larger shapes do.
BATCH_APART = ["mask_causal_window", "mask_BNTS", "window_past_the_keys", "cross_key_value_dims"]


@pytest.mark.parametrize("name, apart", [(n, False) for n in sorted(BLOCKED_CASES)]
                         + [(n, True) for n in BATCH_APART])
def test_blocked_path_matches_oracle(name: str, apart: bool, monkeypatch) -> None:
    import jax

    import mhagen.blocked

    if apart:
        monkeypatch.setattr(mhagen.blocked, "STEP_SCORES_BYTES", 1)
    spec = make_spec(*BLOCKED_CASES[name])
    weights = mhagen.init_weights(spec)
    inputs = _blocked_inputs(spec)
    fn = jax.jit(forward(spec, attention="blocked", block=(2, 3)))
    got = np.asarray(fn(*(inputs[t.name] for t in input_signature(spec)), *weights))
    want = mhagen.reference(spec, weights, **inputs)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_blocked_path_projects_keys_and_values_block_by_block() -> None:
    """With several key blocks, K and V are projected per block, never whole: no (B, S, N, H)
    array in the traced program (the whole projections sliced into blocks cost IREE a copy of
    each block and 32 MiB more memory at T = 8192)."""
    import jax

    spec = make_spec(*BLOCKED_CASES["cross_key_value_dims"])     # S = 11 keys, blocks of 3
    B, S = spec.geometry.value_shape[:2]
    avals = [jax.ShapeDtypeStruct(t.shape, np.dtype(t.dtype)) for t in input_signature(spec)]
    weights = mhagen.init_weights(spec)

    def shapes(attention: str) -> set[tuple[int, ...]]:
        jaxpr = jax.make_jaxpr(lambda *xs: forward(spec, attention=attention, block=(2, 3))(*xs, *weights))
        return {tuple(v.aval.shape) for eqn in jaxpr(*avals).jaxpr.eqns for v in eqn.outvars}

    whole = {s for s in shapes("keras") if len(s) == 4 and s[:2] == (B, S)}
    assert whole == {(B, S, 2, 4), (B, S, 2, 3)}                 # Keras' path: the whole K and V
    assert not {s for s in shapes("blocked") if len(s) == 4 and s[:2] == (B, S)}


def test_default_blocks() -> None:
    from mhagen.blocked import DEFAULT_BLOCK, default_block

    assert default_block(512, 512, 12, 4) == (128, 512)      # BERT-base T=512: 3 MiB per step
    assert default_block(128, 1024, 12, 4) == (64, 1024)     # cross-attention 128 x 1024
    assert default_block(128, 128, 12, 4) == (128, 128)      # small enough for one step
    assert default_block(8192, 8192, 8, 4) == DEFAULT_BLOCK  # long context: key blocks too


@pytest.mark.parametrize("name", ["self", "causal_T_gt_S", "mask_BNTS", "gate_no_bias"])
def test_default_query_blocks_match_oracle(name: str, monkeypatch) -> None:
    """The automatic split into query blocks (all keys per step), forced onto small shapes."""
    import jax

    import mhagen.blocked

    monkeypatch.setattr(mhagen.blocked, "QUERY_BLOCK_SCORES_BYTES", 1)
    monkeypatch.setattr(mhagen.blocked, "MIN_QUERY_BLOCK", 2)
    spec = make_spec(*BLOCKED_CASES[name])
    T = spec.geometry.query_shape[1]
    assert mhagen.blocked.default_block(T, spec.geometry.value_shape[1], 2, 4)[0] < T
    weights = mhagen.init_weights(spec)
    inputs = _blocked_inputs(spec)
    fn = jax.jit(forward(spec, attention="blocked"))
    got = np.asarray(fn(*(inputs[t.name] for t in input_signature(spec)), *weights))
    np.testing.assert_allclose(got, mhagen.reference(spec, weights, **inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(BLOCKED_CASES))
def test_looped_blocked_path_matches_oracle(name: str, monkeypatch) -> None:
    """The looped form (scan over query blocks, a loop over the key blocks in reach, ragged edges
    as one more step each), forced at small sizes."""
    import jax

    import mhagen.blocked

    monkeypatch.setattr(mhagen.blocked, "LOOP_STEPS", 0)
    spec = make_spec(*BLOCKED_CASES[name])
    weights = mhagen.init_weights(spec)
    inputs = _blocked_inputs(spec)
    args = [inputs[t.name] for t in input_signature(spec)]
    for block in ((2, 3), (4, 4)):
        fn = forward(spec, attention="blocked", block=block)
        assert "while" in str(jax.make_jaxpr(fn)(*args, *weights))
        got = np.asarray(jax.jit(fn)(*args, *weights))
        np.testing.assert_allclose(got, mhagen.reference(spec, weights, **inputs), atol=ATOL, rtol=0)


def test_looped_program_does_not_grow_with_T() -> None:
    """Causal, 8 heads x 64: T = 4096 and T = 65536 trace to the same program (two dot_generals in
    the key loop, the four projections), and T = 10^6 passes the trace budget."""
    import jax

    from mhagen.blocked import loops, static_steps
    from mhagen.trace import check_trace_budget

    texts = []
    for T in (4096, 65536):
        spec = make_spec({"num_heads": 8, "key_dim": 64}, {"query": [1, T, 512], "value": [1, T, 512],
                                                           "use_causal_mask": True})
        assert loops(1, T, T, 8, 4, causal=True)
        avals = [jax.ShapeDtypeStruct(t.shape, np.dtype(t.dtype)) for t in input_signature(spec)]
        avals += [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in mhagen.init_weights(spec)]
        texts.append(jax.jit(forward(spec)).lower(*avals).as_text())
    assert [t.count("stablehlo.dot_general") for t in texts] == [6, 6]
    assert abs(len(texts[0]) - len(texts[1])) < 200
    assert static_steps(1, 65536, 65536, 8, 4, causal=True) == (1, True)
    assert static_steps(1, 10 ** 6, 10 ** 6, 8, 4, causal=True) == (4, True)   # ragged last blocks
    check_trace_budget(make_spec({"num_heads": 8, "key_dim": 64},
                                 {"query": [1, 10 ** 6, 512], "value": [1, 10 ** 6, 512], "use_causal_mask": True}))


@pytest.mark.slow  # 10-30 s: compiles the looped path for the CPU
def test_looped_path_compiled_for_cpu_matches_oracle(monkeypatch) -> None:
    import mhagen.blocked

    monkeypatch.setattr(mhagen.blocked, "LOOP_STEPS", 0)
    monkeypatch.setattr(mhagen.blocked, "SINGLE_BLOCK_MAX_SCORES", 0)
    monkeypatch.setattr(mhagen.blocked, "DEFAULT_BLOCK", (16, 32))
    spec = make_spec({"num_heads": 2, "key_dim": 8, "sliding_window": 40},
                     {"query": [2, 100, 16], "value": [2, 90, 16], "use_causal_mask": True, "attention_mask": True})
    weights = mhagen.init_weights(spec)
    layer = mhagen.build(spec, target="cpu", weights=weights, verify=False)
    assert "stablehlo.while" in layer.stablehlo
    inputs = _blocked_inputs(spec)
    np.testing.assert_allclose(layer(**inputs), mhagen.reference(spec, weights, **inputs), atol=ATOL, rtol=0)


@pytest.mark.slow  # 7-29 s each: compiles the blocked path for the CPU
@pytest.mark.parametrize("name", ["mask_causal_window", "causal_T_gt_S"])
def test_blocked_path_compiled_for_cpu_matches_oracle(name: str) -> None:
    import iree.runtime as rt
    import jax

    from mhagen.compile import compile_program

    spec = make_spec(*BLOCKED_CASES[name])
    weights = mhagen.init_weights(spec)
    inputs = _blocked_inputs(spec)
    fn = forward(spec, attention="blocked", block=(2, 3))
    sigs = input_signature(spec)
    avals = [jax.ShapeDtypeStruct(t.shape, np.dtype(t.dtype)) for t in sigs]
    text = jax.export.export(jax.jit(lambda *xs: fn(*xs, *weights)), platforms=["cpu"])(*avals).mlir_module()
    vmfb = compile_program(text, "cpu").vmfb
    config = rt.Config("local-task")
    module = rt.VmModule.copy_buffer(config.vm_instance, vmfb)
    main = rt.SystemContext(vm_modules=[module], config=config).modules[module.name]["main"]
    args = [np.ascontiguousarray(np.asarray(inputs[t.name]).astype(t.dtype)) for t in sigs]
    got = np.asarray(main(*args).to_host())
    np.testing.assert_allclose(got, mhagen.reference(spec, weights, **inputs), atol=ATOL, rtol=0)


def test_auto_takes_blocked_path_only_where_it_is_exact() -> None:
    long = {"query": [1, 1024, 8], "value": [1, 1024, 8], "use_causal_mask": True}
    layer = {"num_heads": 2, "key_dim": 4}
    assert choose_path(make_spec(layer, long)) is AttentionPath.BLOCKED
    assert choose_path(make_spec(layer, {**long, "query": [1, 5, 8]})) is AttentionPath.BLOCKED
    assert choose_path(make_spec(layer, long), "keras") is AttentionPath.KERAS
    assert choose_path(make_spec(layer, {**long, "return_attention_scores": True})) is AttentionPath.KERAS
    assert choose_path(make_spec({**layer, "dropout": 0.1}, {**long, "training": True})) is AttentionPath.KERAS
    four_d = make_spec({**layer, "attention_axes": [1, 2]}, {"query": [1, 32, 32, 8], "value": [1, 32, 32, 8]})
    assert choose_path(four_d) is AttentionPath.KERAS
    with pytest.raises(mhagen.SpecError, match="argument `attention`.*scores"):
        choose_path(make_spec(layer, {**long, "return_attention_scores": True}), "blocked")
    with pytest.raises(mhagen.SpecError, match="expected one of"):
        choose_path(make_spec(layer, long), "flash")


@pytest.mark.slow  # 9-22 s: compiles, jits and times a spec
def test_bench_command_writes_json(tmp_path) -> None:
    from mhagen.cli import main

    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = tmp_path / "bench.json"
    assert main(["bench", str(spec), "--repeats", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cpu", "vector_isa", "cores", "jax", "iree_compiler", "flags"} <= set(data["environment"])
    (result,) = data["results"]
    assert result["flops"] == mhagen.Spec.from_toml(TINY).flops
    assert result["attention_path"] == "blocked"
    assert result["max_abs_vs_jax"] < 1e-5
    for impl in ("mhagen", "jax", "oracle"):
        row = result["results"][impl]
        assert len(row["times_ms"]) >= 3 and row["median_ms"] > 0 and row["gflops"] > 0
        assert row["peak_mb"] is not None and row["peak_mb"] >= 0, row["note"]
        assert row["ratio_to_jax"] > 0
    assert result["results"]["jax"]["ratio_to_jax"] == 1.0


def test_suite_writes_table(tmp_path) -> None:
    from mhagen.bench import run_suite

    (tmp_path / "tiny.toml").write_text(TINY)
    results = run_suite(tmp_path, repeats=3, memory=False, oracle=False)
    assert [r.name for r in results] == ["tiny"]
    table = (tmp_path / "results.md").read_text()
    assert "| tiny |" in table and "speed-up vs jax.jit" in table
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["name"] == "tiny"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot written" in table
    else:
        assert (tmp_path / "results.png").stat().st_size > 0
