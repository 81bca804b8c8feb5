"""The invalid-spec family of the trust corpus, and the budgets checked before any work.

Every file in `tests/corpus/specs/` is an invalid spec whose first line says what its one error line
must contain (`# expect: ...`); a second line `# api: build` or `# api: verify` marks a spec that is
valid but too large to trace or to verify here, which `Spec.load` accepts and `mhagen.build` or
`verify_matrix` refuse. Each is refused by `mhagen build` and `mhagen verify` in one line, exit 2,
with nothing written, and before any weight is drawn, any program traced or compiled.
"""

from __future__ import annotations

import math
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import mhagen
from corpus import CORPUS, refuses
from mhagen import budget
from mhagen.blocked import STEP_BUDGET, static_steps
from mhagen.targets import get_target

SPECS = sorted((CORPUS / "specs").glob("*.toml"))
GiB = 1 << 30


def _header(path: Path) -> tuple[str, str]:
    """(text the error line must contain, the API that refuses: load, build or verify)."""
    lines = path.read_bytes().split(b"\n", 2)
    assert lines[0].startswith(b"# expect: "), path
    api = lines[1].decode()[len("# api: "):] if lines[1].startswith(b"# api: ") else "load"
    return lines[0].decode()[len("# expect: "):], api


@pytest.fixture
def no_work(monkeypatch) -> list[str]:
    """Trip wires on every stage after the spec: drawing weights, tracing, compiling. The list of
    stages reached must stay empty (the CLI turns an unexpected exception into one line, so the
    trip wires record as well as raise)."""
    reached: list[str] = []

    def wire(stage: str):
        def tripped(*args, **kwargs):
            reached.append(stage)
            raise AssertionError(f"{stage} reached for an invalid spec")
        return tripped

    for module in ("mhagen.pipeline", "mhagen.bundle", "mhagen.weights"):
        monkeypatch.setattr(f"{module}.normalize_weights", wire("weights"))
    for module in ("mhagen.pipeline", "mhagen.bundle", "mhagen.trace"):
        monkeypatch.setattr(f"{module}.trace", wire("trace"))
    for module in ("mhagen.pipeline", "mhagen.bundle", "mhagen.compile"):
        monkeypatch.setattr(f"{module}.compile_program", wire("compile"))
    return reached


def test_corpus_is_large_and_well_formed() -> None:
    assert len(SPECS) >= 70
    for path in SPECS:
        expect, api = _header(path)
        assert expect and api in ("load", "build", "verify"), path.name


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_invalid_spec_is_refused(path: Path, tmp_path: Path, capsys, no_work: list[str]) -> None:
    expect, api = _header(path)
    work = tmp_path / "work"
    work.mkdir()
    started = time.perf_counter()
    refuses(["build", str(path), "--out", str(work / "out")], capsys, needle=expect,
            watch=[work, path.parent])
    refuses(["verify", str(path)], capsys, needle=expect, watch=[work, path.parent])
    if api == "load":
        with pytest.raises(mhagen.MhagenError) as err:
            mhagen.Spec.load(path)
    else:
        spec = mhagen.Spec.load(path)
        with pytest.raises(mhagen.MhagenError) as err:
            if api == "build":
                mhagen.build(spec, target="cpu")
            else:
                from mhagen.verify import verify_matrix

                verify_matrix(spec, [get_target("cpu")])
    assert expect in str(err.value).splitlines()[0]
    assert no_work == []
    assert time.perf_counter() - started < 5.0


# ---- memory budgets ------------------------------------------------------------------------------

def _write(tmp_path: Path, layer: str, call: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(f"[layer]\n{layer}\n[call]\n{call}")
    return path


def test_weights_past_memory_refused_before_any_work(tmp_path: Path, capsys, monkeypatch,
                                                     no_work: list[str]) -> None:
    """30 GiB of weights (30720 heads x 64 over 1024 features) on a 24 GiB machine: refused with
    the figures, before a weight is drawn (it used to die with MemoryError)."""
    monkeypatch.setattr(budget, "machine_memory", lambda: 24 * GiB)
    path = _write(tmp_path, "num_heads = 30720\nkey_dim = 64\n", "query = [1, 4, 1024]\nvalue = [1, 4, 1024]\n")
    spec = mhagen.Spec.load(path)
    assert budget.footprint(spec).weights == pytest.approx(30 * GiB, rel=0.01)
    work = tmp_path / "work"
    work.mkdir()
    started = time.perf_counter()
    for args in (["build", str(path), "--out", str(work / "out")],
                 ["build", str(path), "--out", str(work / "out"), "--no-verify"],
                 ["verify", str(path)]):
        refuses(args, capsys, needle=["Building this spec needs about", "(weights 30.0 GiB",
                                      "this machine has 24.0 GiB available"], watch=[work])
    with pytest.raises(mhagen.SpecError, match="32x that while IREE compiles them inline"):
        mhagen.build(spec, target="cpu")
    assert time.perf_counter() - started < 5.0
    assert no_work == []


BIG_INPUTS = ("num_heads = 1\nkey_dim = 4\n",
              # 16 GiB of float32 inputs; Keras' path (scores returned), so the program is a few einsums.
              "query = [67108864, 4, 8]\nvalue = [67108864, 4, 8]\nreturn_attention_scores = true\n")


def test_big_inputs_verify_refused_but_build_no_verify_works(tmp_path: Path, capsys, monkeypatch) -> None:
    """16 GiB of inputs: verifying here is refused with the figure and the way out, and a real
    `mhagen build --no-verify` for a bigger deployment machine goes through without making them."""
    monkeypatch.setattr(budget, "machine_memory", lambda: 24 * GiB)
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path, *BIG_INPUTS)
    work = tmp_path / "work"
    work.mkdir()
    needle = ["Verifying this spec needs about", "inputs 16.0 GiB", "`mhagen build --no-verify`",
              "this machine has 24.0 GiB available"]
    started = time.perf_counter()
    refuses(["verify", str(path)], capsys, needle=needle, watch=[work])
    refuses(["build", str(path), "--out", str(work / "out")], capsys, needle=needle, watch=[work])
    assert time.perf_counter() - started < 5.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from mhagen.cli import main

    assert main(["build", str(path), "--out", str(work / "out"), "--no-verify"]) == 0
    assert (work / "out" / "manifest.json").is_file()
    # The inputs (16 GiB) were never made: the process grew by far less than one of them.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak < 2 * GiB


def test_budget_decisions() -> None:
    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 1, "key_dim": 4},
                                  "call": {"query": [67108864, 4, 8], "value": [67108864, 4, 8],
                                           "return_attention_scores": True}})
    fp = budget.footprint(spec)
    assert fp.inputs == 16 * GiB and fp.outputs == 8 * GiB + 4 * GiB  # output (B, T, 8), scores (B, 1, 4, 4)
    assert fp.scores_shape == (67108864, 1, 4, 4)
    assert fp.build < 1 * GiB < fp.verify
    budget.check(spec, verify=False, available=1 * GiB)           # building for a bigger machine
    with pytest.raises(mhagen.SpecError, match=r"--no-verify.*smaller batch or sequence"):
        budget.check(spec, verify=True, available=fp.verify - 1)
    budget.check(spec, verify=True, available=fp.verify)
    # Inline weights cost IREE many times their size; a parameter archive about twice.
    heavy = mhagen.Spec.from_dict({"layer": {"num_heads": 16, "key_dim": 64},
                                   "call": {"query": [1, 8, 4096], "value": [1, 8, 4096]}})
    weights = budget.footprint(heavy).weights
    inline, archive = (budget.footprint(heavy, weights_mode=m).build for m in ("inline", "parameters"))
    assert inline - budget.BASELINE_BYTES == budget.INLINE_FACTOR * weights
    assert 2 * weights <= archive - budget.BASELINE_BYTES <= 2.1 * weights
    budget.check(heavy, weights_mode="parameters", verify=False, available=archive)
    with pytest.raises(mhagen.SpecError, match=r"Building this spec needs about .* keep the weights out "
                       r"of the module \(weights_mode='parameters'\)"):
        budget.check(heavy, weights_mode="inline", verify=False, available=archive)
    # A dynamic spec is verified up to its largest size.
    small = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4},
                                   "call": {"query": [2, 8, 8], "value": [2, 8, 8], "dynamic": ["batch", "seq"],
                                            "max_batch": 64, "max_seq": 4096}})
    assert budget.footprint(small).scores_shape == (64, 2, 4096, 4096)
    assert budget.format_bytes(3 * GiB // 2) == "1.5 GiB" and budget.format_bytes(1 << 52) == "4.0 PiB"
    assert budget.machine_memory() > 0


@pytest.mark.parametrize("layer,call", [
    ({"num_heads": 8, "key_dim": 4}, {"query": [1, 512, 16], "value": [1, 512, 16], "use_causal_mask": True,
                                      "attention_mask": True}),
    ({"num_heads": 8, "key_dim": 4}, {"query": [1, 256, 16], "value": [1, 256, 16],
                                      "return_attention_scores": True}),
    ({"num_heads": 1, "key_dim": 4}, {"query": [512, 16, 256], "value": [512, 16, 256]}),
], ids=["scores", "scores_returned", "inputs"])
def test_verify_footprint_bounds_the_measured_peak(layer: dict, call: dict) -> None:
    """The oracle's model is an upper bound of what verify's NumPy work holds, and not far above."""
    from mhagen.verify import check_outputs, expected_outputs, random_inputs

    spec = mhagen.Spec.from_dict({"layer": layer, "call": call})
    weights = mhagen.init_weights(spec)
    fp = budget.footprint(spec)
    tracemalloc.start()
    try:
        inputs = random_inputs(spec, 0)
        expected = expected_outputs(spec, weights, inputs)
        got = [e.astype(np.float32) for e in expected]
        check_outputs(spec, got, expected)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    model = fp.verify - budget.BASELINE_BYTES - fp.weights
    assert peak <= model <= 2.5 * peak, (peak, model)


# ---- dynamic maxima ------------------------------------------------------------------------------

@pytest.mark.parametrize("call,needle", [
    ({"dynamic": ["batch"], "max_batch": 1}, "`max_batch`, expected at least the declared batch 2"),
    ({"dynamic": ["seq"], "max_seq": 4}, "`max_seq`, expected at least the declared sequence lengths"),
    ({"dynamic": ["seq"], "max_seq": 1 << 40}, "`max_seq`, expected a positive integer of at most 65536"),
    ({"max_batch": 8}, "`max_batch`, expected no value unless `dynamic` includes 'batch'"),
], ids=["max_batch_below", "max_seq_below", "max_seq_2_40", "max_batch_not_dynamic"])
def test_dynamic_maxima_refused_before_compiling(call: dict, needle: str, tmp_path: Path, capsys,
                                                 no_work: list[str]) -> None:
    base = {"query": [2, 5, 8], "value": [2, 7, 8]}
    started = time.perf_counter()
    with pytest.raises(mhagen.SpecError, match="Received an invalid value"):
        mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": {**base, **call}})
    text = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in {**base, **call}.items())
    path = _write(tmp_path, "num_heads = 2\nkey_dim = 4\n", text)
    work = tmp_path / "work"
    work.mkdir()
    refuses(["build", str(path), "--out", str(work / "out")], capsys, needle=needle, watch=[work])
    assert time.perf_counter() - started < 2.0
    assert no_work == []


def test_dynamic_maxima_at_the_declared_shape_are_fine() -> None:
    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4},
                                  "call": {"query": [2, 5, 8], "value": [2, 7, 8], "dynamic": ["batch", "seq"],
                                           "max_batch": 2, "max_seq": 7}})
    assert (spec.call.max_batch, spec.call.max_seq) == (2, 7)


# ---- the step budget -----------------------------------------------------------------------------

def test_step_budget_refused_fast(tmp_path: Path, capsys, no_work: list[str]) -> None:
    """T = 10^6 on the blocked path would unroll 15 million steps (it used to trace forever); the
    path loops there now, so the trace budget passes, and verifying is refused at once for the
    oracle's memory (80 TiB of float64 scores), with the way out."""
    from mhagen.trace import check_trace_budget

    path = _write(tmp_path, "num_heads = 2\nkey_dim = 4\n", "query = [1, 1000000, 8]\nvalue = [1, 1000000, 8]\n")
    work = tmp_path / "work"
    work.mkdir()
    started = time.perf_counter()
    check_trace_budget(mhagen.Spec.load(path))
    refuses(["build", str(path), "--out", str(work / "out")], capsys, needle=["--no-verify", "TiB"], watch=[work])
    with pytest.raises(mhagen.SpecError, match="--no-verify"):
        mhagen.build(path, target="cpu")
    assert time.perf_counter() - started < 2.0
    assert no_work == []


def test_trace_of_a_long_sequence_loops() -> None:
    """T = 40000 causal (12403 unrolled steps) traces to the looped program, in about a second."""
    from mhagen.trace import trace

    spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4},
                                  "call": {"query": [1, 40000, 8], "value": [1, 40000, 8], "use_causal_mask": True}})
    started = time.perf_counter()
    program = trace(spec)
    assert "stablehlo.while" in program.text and len(program.text) < 200_000
    assert time.perf_counter() - started < 20.0


@pytest.mark.parametrize("B,T,S,heads,causal,window", [
    (1, 2048, 2048, 4, True, None),
    (1, 1536, 1024, 4, False, 300),
    (1, 1280, 1280, 2, False, None),
    (3, 512, 512, 8, True, None),       # one step per batch element and query block
    (100, 128, 128, 8, False, None),    # 50 groups of 2 batch elements
], ids=["causal", "window", "plain", "batch_causal", "batch_groups"])
def test_static_steps_count_the_traced_program(B: int, T: int, S: int, heads: int, causal: bool,
                                               window: int | None, monkeypatch) -> None:
    """`static_steps` counts what `blocked.attention` unrolls: two dot_generals per step."""
    import jax
    import jax.numpy as jnp

    from mhagen.blocked import attention

    calls = []
    real = jax.lax.dot_general

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.lax, "dot_general", counting)
    q = jax.ShapeDtypeStruct((B, T, heads, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((B, S, heads, 4), jnp.float32)
    jax.eval_shape(lambda q, k: attention(q, k, k, causal=causal, sliding_window=window), q, k)
    steps, exact = static_steps(B, T, S, heads, 4, causal=causal, window=window)
    assert exact and len(calls) == 2 * steps, (len(calls), steps)
    assert static_steps(B, T, S, heads, 4, causal=causal, window=window, limit=10 ** 9) == (steps, True)


def test_rank_limit_is_keras_einsum_letters() -> None:
    """Rank 13 with 11 attention axes needs all 26 letters and builds; rank 14 is refused."""
    ok = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 2},
                                "call": {"query": [1] * 11 + [2, 4], "value": [1] * 11 + [2, 4]}})
    assert ok.geometry.rank == 13 and math.prod(ok.geometry.scores_shape) == 8
    with pytest.raises(mhagen.SpecError, match="here 14 \\+ 1 \\+ 12 = 27"):
        mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 2},
                               "call": {"query": [1] * 12 + [2, 4], "value": [1] * 12 + [2, 4]}})


def test_valid_initializer_arguments_round_trip() -> None:
    """Keras' own serialization of every initializer with arguments is accepted unchanged."""
    for table in ({"class_name": "RandomNormal", "config": {"seed": None, "mean": 0.0, "stddev": 0.05},
                   "module": "keras.initializers", "registered_name": None},
                  {"class_name": "RandomUniform", "config": {"seed": 3, "minval": -0.1, "maxval": 0.1}},
                  {"class_name": "GlorotUniform", "config": {"seed": None, "input_axes": None, "output_axes": None}},
                  {"class_name": "Constant", "config": {"value": 2}},
                  {"class_name": "Orthogonal", "config": {"gain": 0.5}}):
        spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4, "kernel_initializer": table},
                                      "call": {"query": [2, 5, 8], "value": [2, 7, 8]}})
        assert mhagen.Spec.from_toml(spec.to_toml()) == spec
        assert all(np.isfinite(w).all() for w in mhagen.init_weights(spec))
