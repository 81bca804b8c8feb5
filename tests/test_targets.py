"""Targets as data, and the verify matrix: every example on every target (run where possible)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mhagen
from conftest import EXAMPLES, vulkan_available
from mhagen.targets import all_targets, availability, compile_flags, get_target, parse_targets
from mhagen.verify import verify_matrix

RUN_HERE = ("cpu", "cpu-x86_64", "cpu-x86_64-v3", "vmvx", "vulkan")


def test_compile_flags_are_pure_data() -> None:
    cpu = compile_flags(get_target("cpu"))
    assert cpu[0] == "--iree-hal-target-backends=llvm-cpu" and "--iree-llvmcpu-target-cpu=host" in cpu
    assert "--iree-rocdl-enable-buffer-instructions=false" in compile_flags(get_target("rocm-gfx942"))
    assert compile_flags(get_target("vulkan")) == ["--iree-hal-target-backends=vulkan-spirv"]
    assert "--iree-cuda-target=sm_80" in compile_flags(get_target("cuda-sm80"))


def test_unknown_target_lists_valid_ones() -> None:
    with pytest.raises(mhagen.TargetError, match="expected one of .*cpu.*vulkan.*Received: target='tpu'"):
        get_target("tpu")


def test_sm90_refused_before_compiling() -> None:
    with pytest.raises(mhagen.TargetError, match="sm_90.*cuda-sm80"):
        get_target("cuda-sm90")
    assert "cuda-sm90" not in [t.name for t in parse_targets("all")]


def test_user_adds_a_target_by_adding_a_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "mine.toml").write_text(
        'name = "cpu-mine"\ndescription = "my CPU"\nbackend = "llvm-cpu"\ndriver = "local-sync"\n'
        'flags = ["--iree-llvmcpu-target-cpu=host"]\narch = "host"\n')
    (tmp_path / "hopper.toml").write_text(
        'name = "cuda-hopper"\nbackend = "cuda"\ndriver = "cuda"\nflags = ["--iree-cuda-target=sm_90a"]\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path))
    assert availability(get_target("cpu-mine")).runs
    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    (row,) = verify_matrix(spec, [get_target("cpu-mine")])
    assert row.status == "pass"
    with pytest.raises(mhagen.TargetError, match="cannot compile with `--iree-cuda-target=sm_90a`"):
        get_target("cuda-hopper")


def test_tuning_spec_is_part_of_the_target(tmp_path, monkeypatch) -> None:
    """A target's tuning spec goes to the compiler by path and into the cache key by content, on
    the CPUs it is for; a host without those features builds without it."""
    import mhagen.targets
    from mhagen.compile import _cache_key

    cpu = get_target("cpu")
    assert cpu.tuning_spec and cpu.tuning_spec.endswith("x86-avx512-f32.mlir")
    monkeypatch.setattr(mhagen.targets, "host_cpu_features", lambda: frozenset({"avx2", "avx512f"}))
    assert f"--iree-codegen-tuning-spec-path={cpu.tuning_spec}" in compile_flags(cpu)
    assert "--mlir-disable-threading" in compile_flags(cpu)     # IREE 3.13 deadlock, see targets.py
    assert "--mlir-disable-threading" not in compile_flags(get_target("cpu-x86_64"))
    assert cpu.to_dict()["tuning_spec"] == "x86-avx512-f32.mlir"
    assert len(cpu.to_dict()["tuning_spec_sha256"]) == 64
    with_spec = _cache_key(cpu, [], "module {}")
    monkeypatch.setattr(mhagen.targets, "host_cpu_features", lambda: frozenset({"avx2"}))
    assert not any("tuning-spec" in f or "disable-threading" in f for f in compile_flags(cpu))
    assert "tuning_spec" not in cpu.to_dict()
    assert _cache_key(cpu, [], "module {}") != with_spec
    spec_text = open(cpu.tuning_spec).read()
    for name, content in (("a", spec_text), ("b", spec_text), ("c", spec_text + "// changed\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "t.mlir").write_text(content)
        (tmp_path / name / "t.toml").write_text(
            f'name = "cpu-{name}"\nbackend = "llvm-cpu"\ndriver = "local-task"\n'
            'flags = ["--iree-llvmcpu-target-cpu=host"]\ntuning_spec = "t.mlir"\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", os.pathsep.join(str(tmp_path / n) for n in "abc"))
    keys = {n: _cache_key(t, [], "module {}")
            for n, t in ((n, get_target(f"cpu-{n}")) for n in "abc")}
    assert keys["a"] == keys["b"] != keys["c"]        # same content, other path: same module
    (tmp_path / "d.toml").write_text('name = "cpu-d"\nbackend = "llvm-cpu"\ndriver = "local-task"\n'
                                     'tuning_spec = "missing.mlir"\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path))
    with pytest.raises(mhagen.TargetError, match="tuning_spec 'missing.mlir' is not a file"):
        all_targets()


def test_host_cpu_is_part_of_the_cache_key(monkeypatch) -> None:
    """`target-cpu=host` code from one CPU is never served to another from a shared cache."""
    import mhagen.compile as compile_mod

    def key(target: str, features: str) -> str:
        monkeypatch.setattr(compile_mod, "host_cpu_features", lambda: frozenset(features.split()))
        return compile_mod._cache_key(get_target(target), [], "module {}")

    assert key("cpu", "sse2 avx2") != key("cpu", "sse2 avx2 avx512f")
    assert key("cpu", "sse2 avx2") == key("cpu", "avx2 sse2")
    assert key("cpu-x86_64-v3", "sse2 avx2") == key("cpu-x86_64-v3", "sse2 avx2 avx512f")


def test_target_file_with_unknown_key_is_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "bad.toml").write_text('name = "bad"\nbackend = "llvm-cpu"\ndriver = "local-task"\nflag = []\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path))
    with pytest.raises(mhagen.TargetError, match="unknown key"):
        all_targets()


@pytest.mark.parametrize("line", ['tuning_spec_cpu_features = "avx512f"', 'cpu_features = [1]',
                                  'dtype_cpu_features = { bfloat16 = "avx512_bf16" }',
                                  'dtype_cpu_features = ["avx512_bf16"]'])
def test_target_file_cpu_features_must_be_lists(tmp_path, monkeypatch, line: str) -> None:
    (tmp_path / "bad.toml").write_text(f'name = "bad"\nbackend = "llvm-cpu"\ndriver = "local-task"\n{line}\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path))
    with pytest.raises(mhagen.TargetError, match="must (be a list of CPU feature names|map dtype names)"):
        all_targets()


@pytest.mark.slow  # 50-95 s each from a cold cache: every target compiled
@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def test_example_verify_matrix(example: str) -> None:
    """Every example: compiles for every target; passes on every target that can run here."""
    spec = mhagen.Spec.load(EXAMPLES / f"{example}.toml")
    rows = {r.target: r for r in verify_matrix(spec, parse_targets("all"))}
    for name, row in rows.items():
        assert row.compiled, f"{name}: {row.reason}"
        can_run = availability(get_target(name)).runs
        if can_run:
            assert row.status == "pass", f"{name}: {row.message or row.reason}"
            assert row.max_abs is not None and row.max_abs < 1e-5
        else:
            assert row.status == "compiled, not run" and row.reason
    for name in ("cpu", "cpu-x86_64", "vmvx"):
        assert rows[name].status == "pass"


def test_vulkan_runs_for_real() -> None:
    ok, reason = vulkan_available()
    if not ok:
        pytest.skip(f"no Vulkan device: {reason}")
    spec = mhagen.Spec.load(EXAMPLES / "causal_decoder.toml")
    weights = mhagen.init_weights(spec)
    layer = mhagen.build(spec, target="vulkan", weights=weights)
    from mhagen.verify import random_inputs

    inputs = random_inputs(spec, seed=3)
    out, scores = layer(**inputs)
    ref_out, ref_scores = mhagen.reference(spec, weights, **inputs)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
