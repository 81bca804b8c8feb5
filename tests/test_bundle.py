"""Deployment bundles: layout, manifest, parameter-archive weights, shape buckets, refusals, atomicity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import venv
from pathlib import Path

import numpy as np
import pytest

import mhagen
from conftest import EXAMPLES, make_spec, vulkan_available
from mhagen.bundle import build_bundle
from mhagen.cli import main
from mhagen.targets import get_target, parse_targets
from mhagen.verify import random_inputs

SPEC = EXAMPLES / "causal_decoder.toml"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "decoder"
    targets = "cpu,vmvx,cpu-aarch64,cuda-sm80" + (",vulkan" if vulkan_available()[0] else "")
    assert main(["build", str(SPEC), "--targets", targets, "--out", str(out)]) == 0
    return out


def _oracle(spec, inputs, weights=None):
    weights = mhagen.init_weights(spec) if weights is None else weights
    return mhagen.reference(spec, weights, **inputs)


def test_layout_and_manifest(bundle: Path) -> None:
    names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"program.mlir", "weights.irpa", "manifest.json", "run.py", "README.md", "mhagen_runtime/__init__.py", "mhagen_runtime/bundle.py",
            "cpu/module.vmfb", "vmvx/module.vmfb", "cpu-aarch64/module.vmfb", "cuda-sm80/module.vmfb"} <= names
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["spec"] == mhagen.Spec.load(SPEC).to_dict()
    assert [s["name"] for s in m["interface"]["inputs"]] == ["query", "value", "attention_mask"]
    assert [s["name"] for s in m["interface"]["outputs"]] == ["output", "scores"]
    assert m["iree"]["compiler_version"].startswith("3.13") and m["jax_version"]
    assert set(m["files"]) == names - {"manifest.json"}
    targets = {t["name"]: t for t in m["targets"]}
    assert targets["cpu"]["verify"]["status"] == "pass"
    assert targets["cpu-aarch64"]["verify"]["status"] == "compiled, not run"
    assert targets["cuda-sm80"]["flags"] == ["--iree-cuda-target=sm_80"]
    # The weights live outside the code: the program names them as parameters.
    program = (bundle / "program.mlir").read_text()
    assert '#flow.parameter.named<"model"::"query/kernel">' in program
    assert "iree-run-module" in (bundle / "README.md").read_text()


@pytest.mark.parametrize("target", ["cpu", "vmvx", "vulkan"])
def test_load_matches_oracle(bundle: Path, target: str) -> None:
    if target == "vulkan" and not vulkan_available()[0]:
        pytest.skip(f"no Vulkan device: {vulkan_available()[1]}")
    layer = mhagen.load(bundle, target=target)
    spec = mhagen.Spec.load(SPEC)
    inputs = random_inputs(spec, seed=4)
    for got, want in zip(layer(**inputs), _oracle(spec, inputs)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_mhagen_run_and_run_py(bundle: Path, tmp_path: Path) -> None:
    spec = mhagen.Spec.load(SPEC)
    inputs = random_inputs(spec, seed=5)
    args = []
    for name in ("query", "value", "attention_mask"):
        np.save(tmp_path / f"{name}.npy", inputs[name])
        args += ["--input", f"{name}={tmp_path / name}.npy"]
    assert main(["run", str(bundle), "--target", "cpu", *args, "--output", str(tmp_path / "a")]) == 0
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), "--target", "vmvx", *args,
                           "--output", str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    want_out, want_scores = _oracle(spec, inputs)
    for d in ("a", "b"):
        np.testing.assert_allclose(np.load(tmp_path / d / "output.npy"), want_out, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / d / "scores.npy"), want_scores, atol=1e-5)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def test_refuses_tampered_truncated_missing(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    data = (b / "cpu" / "module.vmfb").read_bytes()
    (b / "cpu" / "module.vmfb").write_bytes(data[: len(data) // 2])
    with pytest.raises(mhagen.BundleError, match="cpu/module.vmfb does not match its SHA-256"):
        mhagen.load(b, target="cpu")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (b / "cpu" / "module.vmfb").write_bytes(bytes(flipped))
    with pytest.raises(mhagen.BundleError, match="SHA-256"):
        mhagen.load(b, target="cpu")
    (b / "cpu" / "module.vmfb").write_bytes(data)   # every listed file is checked on load
    irpa = (b / "weights.irpa").read_bytes()
    (b / "weights.irpa").write_bytes(irpa[:-8])
    with pytest.raises(mhagen.BundleError, match="weights.irpa does not match"):
        mhagen.load(b, target="vmvx")
    with pytest.raises(mhagen.BundleError, match="has no target `metal`; it holds: cpu, cpu-aarch64"):
        mhagen.load(bundle, target="metal")
    with pytest.raises(mhagen.BundleError, match="compiled for aarch64 CPUs; this machine is x86_64"):
        mhagen.load(bundle, target="cpu-aarch64")
    with pytest.raises(mhagen.BundleError, match="not a bundle"):
        mhagen.load(tmp_path, target="cpu")


def test_refuses_module_for_another_cpu_and_another_runtime(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    cpu = next(t for t in m["targets"] if t["name"] == "cpu")
    cpu["cpu_features"] = cpu["cpu_features"] + ["avx512_vp2intersect_imaginary"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(mhagen.BundleError, match="which this CPU lacks; use a portable target"):
        mhagen.load(b, target="cpu")
    m["iree"]["compiler_version"] = "2.9.0"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(mhagen.BundleError, match="compiled by IREE 2.9.0"):
        mhagen.load(b, target="vmvx")


def test_run_errors_are_one_line(bundle: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "q.npy", np.zeros((3, 11, 32), np.float32))
    code = main(["run", str(bundle), "--input", f"query={tmp_path / 'q.npy'}",
                 "--input", f"value={tmp_path / 'q.npy'}", "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mhagen run: error: `query` has shape (3, 11, 32), expected (*, 10, 32) (* = any batch)"]


def test_new_weights_need_no_recompile(tmp_path: Path) -> None:
    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    rng = np.random.default_rng(9)
    w1 = mhagen.init_weights(spec)
    w2 = [rng.standard_normal(a.shape).astype(np.float32) * 0.3 for a in w1]
    targets = [get_target("cpu")]
    build_bundle(spec, targets, tmp_path / "b1", weights=w1)
    build_bundle(spec, targets, tmp_path / "b2", weights=w2)
    m2 = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert m2["targets"][0]["cached"] is True  # same program: the module came from the cache
    assert (tmp_path / "b1" / "cpu" / "module.vmfb").read_bytes() == (tmp_path / "b2" / "cpu" / "module.vmfb").read_bytes()
    inputs = random_inputs(spec, seed=1)
    np.testing.assert_allclose(mhagen.load(tmp_path / "b2", "cpu")(**inputs), _oracle(spec, inputs, w2), atol=1e-5)


def test_inline_weights(tmp_path: Path) -> None:
    out = tmp_path / "inline"
    assert main(["build", str(EXAMPLES / "cross_attention.toml"), "--target", "cpu", "--weights", "inline",
                 "--out", str(out)]) == 0
    assert not (out / "weights.irpa").exists()
    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    inputs = random_inputs(spec, seed=2)
    np.testing.assert_allclose(mhagen.load(out, "cpu")(**inputs), _oracle(spec, inputs), atol=1e-5)


@pytest.mark.slow  # 60-70 s: a 16-bucket module, twice
@pytest.mark.parametrize("mode", ["parameters", "inline"])
def test_dynamic_batch_and_seq(tmp_path: Path, mode: str) -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 4, "seed": 3},
                     {"query": [2, 8, 8], "value": [2, 8, 8], "attention_mask": True, "use_causal_mask": True,
                      "return_attention_scores": True, "dynamic": ["batch", "seq"], "max_batch": 4,
                      "max_seq": 16})
    build_bundle(spec, [get_target("cpu")], tmp_path / "dyn", weights_mode=mode)
    layer = mhagen.load(tmp_path / "dyn", "cpu")
    assert len(layer.interface["functions"]) == 3 * 2  # batch 1, 2, 4 x seq 8, 16
    weights = mhagen.init_weights(spec)
    rng = np.random.default_rng(0)
    for b, t in [(1, 3), (3, 16), (4, 9)]:
        q = rng.standard_normal((b, t, 8)).astype(np.float32)
        mask = rng.random((b, t, t)) < 0.7
        static = spec.replace(call={"query": [b, t, 8], "value": [b, t, 8], "dynamic": [], "max_batch": None,
                                    "max_seq": None})
        out, scores = layer(q, q, attention_mask=mask)
        want_out, want_scores = mhagen.reference(static, weights, q, q, attention_mask=mask)
        assert out.shape == (b, t, 8) and scores.shape == (b, 2, t, t)
        np.testing.assert_allclose(out, want_out, atol=1e-5)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    with pytest.raises(mhagen.CallError, match="larger than this build's max_batch 4"):
        layer(np.zeros((5, 4, 8), np.float32), np.zeros((5, 4, 8), np.float32))
    with pytest.raises(mhagen.CallError, match="expected \\(\\*, \\*, 8\\)"):
        layer(np.zeros((2, 4, 7), np.float32), np.zeros((2, 4, 7), np.float32))
    # Empty calls keep their empty axes, as Keras does: no rows in, no rows out.
    out, scores = layer(np.zeros((2, 0, 8), np.float32), np.zeros((2, 0, 8), np.float32))
    assert out.shape == (2, 0, 8) and scores.shape == (2, 2, 0, 0)
    out, scores = layer(np.zeros((0, 5, 8), np.float32), np.zeros((0, 5, 8), np.float32))
    assert out.shape == (0, 5, 8) and scores.shape == (0, 2, 5, 5)


@pytest.mark.slow  # 26 s
def test_dynamic_cross_attention_pads_keys_under_the_mask(tmp_path: Path) -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 4}, {"query": [2, 5, 8], "value": [2, 7, 6],
                                                      "dynamic": ["seq"], "max_seq": 16})
    layer = mhagen.build(spec, "cpu")
    weights = mhagen.init_weights(spec)
    rng = np.random.default_rng(1)
    for t, s in [(2, 11), (9, 3), (16, 16)]:
        q = rng.standard_normal((2, t, 8)).astype(np.float32)
        v = rng.standard_normal((2, s, 6)).astype(np.float32)
        static = spec.replace(call={"query": [2, t, 8], "value": [2, s, 6], "dynamic": [], "max_seq": None})
        np.testing.assert_allclose(layer(q, v), mhagen.reference(static, weights, q, v), atol=1e-5)


def test_failed_build_leaves_nothing_and_keeps_old_bundle(tmp_path: Path, monkeypatch) -> None:
    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    out = tmp_path / "b"
    build_bundle(spec, [get_target("cpu")], out)
    before = (out / "manifest.json").read_text()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "broken.toml").write_text(
        'name = "broken"\nbackend = "llvm-cpu"\ndriver = "local-task"\n'
        'flags = ["--iree-llvmcpu-target-triple=not-a-real-triple-xyz"]\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path / "t"))
    with pytest.raises(mhagen.CompileError):
        build_bundle(spec, [get_target("cpu"), get_target("broken")], out)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == []  # no lock, no staging
    mhagen.load(out, "cpu")


def test_concurrent_builds_into_one_directory(tmp_path: Path) -> None:
    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    out = tmp_path / "shared"
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            w = [np.random.default_rng(seed).standard_normal(a.shape).astype(np.float32) * 0.2
                 for a in mhagen.init_weights(spec)]
            build_bundle(spec, [get_target("cpu")], out, weights=w, verify=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    mhagen.load(out, "cpu")  # a complete bundle whose hashes all check
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared.")] == []


@pytest.mark.slow  # 70 s: makes a virtual environment
def test_bundle_runs_in_a_venv_with_only_runtime_and_numpy(bundle: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "iree-base-runtime==3.13.*"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"cannot install iree-base-runtime into a fresh venv here: {pip.stderr.strip()[-200:]}")
    # A bundle that serves any batch size up to 4, copied where there is no JAX and no mhagen.
    spec = mhagen.Spec.load(SPEC).replace(call={"dynamic": ["batch"], "max_batch": 4})
    deployed = tmp_path / "deployed"
    build_bundle(spec, [get_target("cpu")], deployed)
    weights = mhagen.init_weights(spec)
    for batch in (1, 3):
        static = spec.replace(call={"query": [batch, 10, 32], "value": [batch, 10, 32], "dynamic": [],
                                    "max_batch": None})
        inputs = random_inputs(static, seed=batch)
        args = []
        for name in ("query", "value", "attention_mask"):
            np.save(tmp_path / f"{name}{batch}.npy", inputs[name])
            args += ["--input", f"{name}={tmp_path / name}{batch}.npy"]
        proc = subprocess.run([str(py), str(deployed / "run.py"), "--target", "cpu", *args, "--output",
                               str(tmp_path / f"o{batch}")], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        want_out, want_scores = mhagen.reference(static, weights, **inputs)
        np.testing.assert_allclose(np.load(tmp_path / f"o{batch}" / "output.npy"), want_out, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"o{batch}" / "scores.npy"), want_scores, atol=1e-5)
    check = subprocess.run([str(py), "-c", "import jax"], capture_output=True)
    assert check.returncode != 0  # no JAX there
    data = (deployed / "cpu" / "module.vmfb").read_bytes()
    (deployed / "cpu" / "module.vmfb").write_bytes(data[:100])
    proc = subprocess.run([str(py), str(deployed / "run.py"), "--target", "cpu", *args, "--output",
                           str(tmp_path / "o2")], capture_output=True, text=True)
    assert proc.returncode == 2 and "SHA-256" in proc.stderr and "Traceback" not in proc.stderr
