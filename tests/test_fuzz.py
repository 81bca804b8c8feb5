"""`mhagen fuzz`: drawing (deterministic, always valid), running (real compiles and runs), shrinking
(on a real property and on a real IREE miscompile), reports, crashes, Ctrl-C and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from corpus import refuses
from mhagen.cli import main
from mhagen.fuzz import describe, fuzz, parse_budget
from mhagen.fuzz.case import Worker, calls, run_case, signature
from mhagen.fuzz.draw import LARGE_SCORES, draw_inputs, draw_spec, fuzz_dtypes
from mhagen.fuzz.report import write_reports, write_reproducer
from mhagen.fuzz.shrink import candidates, shrink
from mhagen.spec import DType, Spec
from mhagen.trace import input_signature
from mhagen.weights import init_weights

ALL_DTYPES = tuple(d.value for d in DType)
# Fields that hold times or depend on the compile cache's state, not on the seed.
TIMING = {"compile_seconds", "run_seconds", "cached", "seconds"}


def _draw(seed: int, count: int, dtypes: tuple[str, ...] = ALL_DTYPES) -> list[Spec]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(draw_spec(rng, dtypes))
        rng.integers(0, 1 << 31)          # the case seed, drawn after each spec as `fuzz` does
    return out


def test_same_seed_same_cases() -> None:
    first = [s.to_toml() for s in _draw(7, 20)]
    assert first == [s.to_toml() for s in _draw(7, 20)]
    assert first != [s.to_toml() for s in _draw(8, 20)]
    spec = _draw(7, 1)[0]
    a, b = draw_inputs(spec, 3, init_weights(spec)), draw_inputs(spec, 3, init_weights(spec))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_every_drawn_spec_is_valid_and_the_space_is_covered() -> None:
    """A property over 1500 specs (300 seeds): each validates, round-trips through TOML, and its drawn
    inputs fit its signature; together they cover every feature of the spec space."""
    seen: set[str] = set()
    large = masked_rows = 0
    for seed in range(300):
        for spec in _draw(seed, 5):
            assert Spec.from_toml(spec.to_toml()) == spec
            inputs = draw_inputs(spec, seed, init_weights(spec))
            sigs = {s.name: s for s in input_signature(spec)}
            assert {k: v.shape for k, v in inputs.items()} == {k: s.shape for k, s in sigs.items()}
            layer, call = spec.layer, spec.call
            seen |= {f"rank {len(call.query)}", call.dtype}
            seen |= {name for name, on in [
                ("axes", layer.attention_axes is not None), ("negative axes", any(a < 0 for a in layer.attention_axes or ())),
                ("value_dim", layer.value_dim is not None), ("output_shape", layer.output_shape is not None),
                ("no bias", not layer.use_bias), ("gate", layer.use_gate), ("window", layer.sliding_window is not None),
                ("keras2", layer.masking == "keras2"), ("dropout", spec.has_dropout), ("key", spec.has_key),
                ("causal", call.use_causal_mask), ("scores", call.return_attention_scores),
                ("mask", call.attention_mask is True), ("mask shape", isinstance(call.attention_mask, tuple)),
                ("dynamic batch", "batch" in call.dynamic), ("dynamic seq", "seq" in call.dynamic),
                ("initializer", layer.bias_initializer != "zeros")] if on}
            if "attention_mask" in inputs:
                keys = int(np.prod(inputs["attention_mask"].shape[-len(spec.geometry.attention_axes):]))
                masked_rows += int((~inputs["attention_mask"].reshape(-1, keys).any(axis=1)).any())
            scale = np.abs(inputs["query"].astype(np.float32)).max()
            large += bool(scale > 6)
    assert seen >= {"rank 3", "rank 4", "rank 5", *ALL_DTYPES, "axes", "negative axes", "value_dim",
                    "output_shape", "no bias", "gate", "window", "keras2", "dropout", "key", "causal",
                    "scores", "mask", "mask shape", "dynamic batch", "dynamic seq", "initializer"}
    assert masked_rows > 100 and large > 100, (masked_rows, large)


def test_large_magnitudes_reach_the_scores_they_aim_at() -> None:
    """With the query scaled, some score reaches past exp's overflow in float32 (88.7)."""
    for seed in range(200):
        spec = _draw(seed, 1, ("float32",))[0]
        weights = init_weights(spec)
        inputs = draw_inputs(spec, seed, weights)
        if np.abs(inputs["query"]).max() > 6 and spec.has_mask is False and not spec.layer.use_bias:
            q = np.tensordot(inputs["query"].astype(np.float64), weights[0], axes=([-1], [0]))
            k = np.tensordot(inputs.get("key", inputs["value"]).astype(np.float64), weights[1], axes=([-1], [0]))
            n, h = spec.layer.num_heads, spec.layer.key_dim
            scores = np.einsum("inh,jnh->nij", q.reshape(-1, n, h), k.reshape(-1, n, h)) / np.sqrt(h)
            assert np.abs(scores).max() == pytest.approx(LARGE_SCORES["float32"], rel=1e-3)
            return
    pytest.fail("no large-magnitude case without bias among 200 seeds")


def test_fuzz_dtypes_follow_the_targets() -> None:
    from mhagen.targets import parse_targets

    assert fuzz_dtypes(parse_targets("vmvx,vulkan")) == ("float32",)
    assert set(fuzz_dtypes(parse_targets("vulkan,vulkan-ampere"))) == {"float32", "float16", "mixed_float16"}


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("45", 45), ("1.5m", 90)])
def test_budget(text: str, seconds: float) -> None:
    assert parse_budget(text) == seconds


# -- shrinking ---------------------------------------------------------------------------------------

def test_shrink_keeps_exactly_what_a_property_needs() -> None:
    """The checker is a real property of the spec (no compile): the shrinker must turn everything
    else off and make every size 1, keeping two heads and the gate."""
    def fails(spec: Spec) -> bool:
        return spec.layer.num_heads >= 2 and spec.layer.use_gate

    start = next(s for s in _draw(11, 200) if fails(s) and len(s.call.query) == 5 and s.has_mask)
    smallest, tries, minimal = shrink(start, fails, max_tries=1000)
    assert minimal and fails(smallest) and tries > 0
    assert smallest.layer.num_heads == 2 and smallest.layer.use_gate and smallest.layer.key_dim == 1
    assert smallest.geometry.query_shape == (1, 1, 1) and smallest.geometry.value_shape == (1, 1, 1)
    assert not smallest.has_mask and not smallest.has_key and not smallest.call.dynamic
    assert smallest.call.dtype == "float32" and smallest.layer.output_shape is None
    for data in candidates(smallest):       # minimal: no valid simplification still fails
        try:
            simpler = Spec.from_dict(data)
        except Exception:
            continue
        assert not fails(simpler) or simpler == smallest


@pytest.fixture()
def data_tiling_target(tmp_path, monkeypatch):
    """llvm-cpu with `--iree-opt-data-tiling`: IREE 3.13 miscompiles degenerate 5-D attention with
    it (README, CPU flags: |err| 0.33 on `degenerate_5d_two_axes`); a real miscompile to shrink."""
    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "cpu-opt-data-tiling.toml").write_text(
        'name = "cpu-opt-data-tiling"\nbackend = "llvm-cpu"\ndriver = "local-task"\narch = "host"\n'
        'flags = ["--iree-llvmcpu-target-cpu=host", "--iree-opt-data-tiling"]\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(folder))
    return "cpu-opt-data-tiling"


@pytest.mark.slow  # 1.5-5 min (283 s on a loaded machine): about 15 compiles of small 5-D layers
def test_shrink_a_real_miscompile_and_replay_it(data_tiling_target: str, tmp_path: Path) -> None:
    start = Spec.from_dict({"layer": {"num_heads": 3, "key_dim": 3, "use_bias": False, "use_gate": True,
                                      "attention_axes": [2, 3]},
                            "call": {"query": [1, 1, 2, 2, 1], "value": [1, 1, 1, 2, 2]}})
    first = run_case(start.to_dict(), data_tiling_target, 0)
    assert first["status"] == "failed" and first["kind"] == "mismatch", first
    assert run_case(start.to_dict(), "cpu", 0)["status"] == "passed"
    last = {}

    def fails(spec: Spec) -> bool:
        got = run_case(spec.to_dict(), data_tiling_target, 0)
        last[spec.to_toml()] = got
        return got["status"] == "failed" and signature(got) == signature(first)

    smallest, tries, _ = shrink(start, fails, max_tries=25)
    assert fails(smallest) and not smallest.layer.use_gate and smallest.layer.num_heads <= 2, smallest.to_toml()
    assert run_case(smallest.to_dict(), "cpu", 0)["status"] == "passed"
    folder = tmp_path / "failures" / "case-0001-cpu-opt-data-tiling"
    info = write_reproducer(smallest.to_dict(), data_tiling_target, 0, last[smallest.to_toml()], str(folder),
                            {"case_id": "case-0001", "seed": 0, "tries": tries, "minimal": True,
                             "original": start.to_dict()})
    assert info["reproduced"] is True, info           # iree-compile + iree-run-module, as the README says
    readme = (folder / "README.md").read_text()
    assert "iree-compile program.mlir --iree-input-type=stablehlo" in readme and "--iree-opt-data-tiling" in readme
    assert "iree-run-module --device=local-task --module=module.vmfb --function=main" in readme
    assert {"spec.toml", "program.mlir", "expected_0.npy", "actual_0.npy", "module.vmfb"} <= {p.name for p in folder.iterdir()}
    # The reports of a run with that failure: junit names it as a <failure>.
    run = {"tool": "mhagen fuzz", "seed": 0, "targets": [data_tiling_target], "stopped": "1 cases", "seconds": 1.0,
           "cases": [{"id": "case-0001", "spec": start.to_dict(), "seed": 0, "results": {data_tiling_target: first}}],
           "failures": [{"case": "case-0001", "target": data_tiling_target, "kind": "mismatch",
                         "message": first["message"], "spec": smallest.to_dict(), "spec_toml": smallest.to_toml(),
                         "tries": tries, "minimal": True, "folder": "failures/case-0001-cpu-opt-data-tiling",
                         "replay": info["replay"]}]}
    write_reports(tmp_path, run)
    failure = ET.parse(tmp_path / "junit.xml").getroot().find(".//testcase/failure")
    assert failure is not None and first["message"] in failure.get("message")
    assert "| cpu-opt-data-tiling | 0 | 1 | 0 | 0 |" in (tmp_path / "summary.md").read_text()


# -- running -----------------------------------------------------------------------------------------

def test_a_crash_is_a_result_and_the_worker_comes_back() -> None:
    """A job that kills its process (SIGABRT, as a driver's assertion would) is answered as a crash;
    the next job runs in a fresh child."""
    with Worker(timeout=60) as worker:
        first = worker(os.getpid)
        crashed = worker(os.abort)
        assert crashed["kind"] == "crash" and "SIGABRT" in crashed["message"], crashed
        assert worker(os.getpid) not in (first, os.getpid())


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_run_writes_reports_and_is_deterministic(tmp_path: Path, capsys) -> None:
    """Two cases on cpu and vmvx, twice with the same seed: exit 0, one JUnit testcase per case x
    target, and the same results.json but for timings. Seed 1's first cases are float32, rank 3."""
    argv = ["fuzz", "--targets", "cpu,vmvx", "--cases", "2", "--seed", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "case-0001" in out and "case-0002" in out and "passed" in out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert _strip(a) == _strip(b)
    assert [c["id"] for c in a["cases"]] == ["case-0001", "case-0002"] and a["stopped"] == "2 cases"
    assert a["summary"]["cpu"]["passed"] == 2 and a["failures"] == []
    suite = ET.parse(tmp_path / "a" / "junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4 and {c.get("name") for c in cases} == {"cpu", "vmvx"}
    assert suite.get("tests") == "4" and suite.get("failures") == "0"
    assert "| cpu | 2 | 0 | 0 | 0 |" in (tmp_path / "a" / "summary.md").read_text()
    # An earlier fuzz output may be reused as --out.
    assert main([*argv[:4], "1", "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    # The targets of each case on a local process pool (as on a Ray cluster): the same results.
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "results.json").read_text())
    assert _strip(c) == _strip(b)


def test_calls_are_the_buckets_of_a_dynamic_spec() -> None:
    spec = Spec.from_dict({"layer": {"num_heads": 1, "key_dim": 2},
                           "call": {"query": [1, 3, 4], "value": [1, 3, 4], "dynamic": ["seq"], "max_seq": 12}})
    assert [c.label for c in calls(spec)] == ["(1, 1, 4) padded", "(1, 8, 4)", "(1, 12, 4)"]
    assert describe(spec) == "q(1, 3, 4) v(1, 3, 4) 1x2 dynamic seq float32"


def test_ctrl_c_writes_the_reports_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "mhagen.cli", "fuzz", "--targets", "cpu", "--budget", "1h",
                              "--seed", "1", "--out", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if "case-0001" in line:
                break
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=120) == 130
    finally:
        child.kill()
    run = json.loads((out / "results.json").read_text())
    assert run["stopped"] == "interrupted" and len(run["cases"]) >= 1
    ET.parse(out / "junit.xml")


# -- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--budget", "10x"], "--budget"), (["--budget", "0"], "--budget"), (["--budget", "-5m"], "--budget"),
    (["--cases", "0"], "--cases"), (["--shrink-budget", "soon"], "--shrink-budget"),
    (["--jobs", "0"], "--jobs"), (["--jobs", "2", "--ray", "auto"], "--jobs and --ray"),
    (["--ray", "nohost:notaport"], "--ray"),
    (["--job-timeout", "0"], "--job-timeout"), (["--job-timeout", "nan"], "--job-timeout"), (["--seed", "-1"], "--seed"), (["--shrink-tries", "-1"], "--shrink-tries"),
])
def test_bad_arguments_are_refused(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    refuses(["fuzz", "--targets", "cpu", "--out", str(tmp_path / "o"), *extra], capsys, needle=needle,
            watch=[tmp_path])


def test_unknown_target_and_foreign_out_are_refused(tmp_path: Path, capsys) -> None:
    refuses(["fuzz", "--targets", "cpu,vulkn", "--cases", "1", "--out", str(tmp_path / "o")], capsys,
            needle="vulkn", watch=[tmp_path])
    (tmp_path / "mine.txt").write_text("keep me")
    refuses(["fuzz", "--targets", "cpu", "--cases", "1", "--out", str(tmp_path)], capsys,
            needle="--out", watch=[tmp_path])
    refuses(["fuzz", "--targets", "cpu", "--cases", "1", "--out", str(tmp_path / "mine.txt")], capsys,
            needle="a file", watch=[tmp_path])
    refuses(["fuzz", "--cases", "1", "--out", str(tmp_path / "o")], capsys, needle="--targets", watch=[tmp_path])
