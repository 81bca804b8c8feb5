"""Trust corpus, family `bundles`: tampered, linked, malformed and failed bundles are refused.

Every case mutates a copy of a real bundle and runs it through `mhagen run` and `mhagen.load`:
exit 2 with one line naming the problem, a `BundleError` from the API, nothing written to the
output folder, and no file from outside the bundle loaded. The cases cover every file kind, paths
with `..` or absolute paths, symlinks in any component, FIFOs and folders where files belong, and
a malformed manifest field by field.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from corpus import refuses

import mhagen
from mhagen.cli import main

SPEC = "[layer]\nnum_heads = 2\nkey_dim = 4\nseed = 1\n[call]\nquery = [2, 3, 8]\nvalue = [2, 5, 8]\n"
OTHER = "[layer]\nnum_heads = 2\nkey_dim = 6\nseed = 2\n[call]\nquery = [2, 3, 8]\nvalue = [2, 5, 8]\n"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("trust_bundles")
    for name, text in (("good", SPEC), ("other", OTHER)):
        (root / f"{name}.toml").write_text(text)
        assert main(["build", str(root / f"{name}.toml"), "--target", "cpu", "--out", str(root / name)]) == 0
    np.save(root / "q.npy", np.ones((2, 3, 8), np.float32))
    np.save(root / "v.npy", np.ones((2, 5, 8), np.float32))
    return root / "good", root / "other", root


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _save(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def _edit(fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        m = _manifest(b)
        fn(m)
        _save(b, m)
    return mutate


def _flip(rel: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        data = bytearray((b / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (b / rel).write_bytes(bytes(data))
    return mutate


def _truncate(rel: str) -> Callable[[Path, Path], None]:
    return lambda b, o: (b / rel).write_bytes((b / rel).read_bytes()[:-16])


def _delete(rel: str) -> Callable[[Path, Path], None]:
    return lambda b, o: (b / rel).unlink()


def _append(rel: str, text: str) -> Callable[[Path, Path], None]:
    return lambda b, o: (b / rel).write_text((b / rel).read_text() + text)


def _replace_with_other(rel: str) -> Callable[[Path, Path], None]:
    return lambda b, o: shutil.copyfile(o / rel, b / rel)


def _point(field: str, value: str, *, rehash_from: str | None = None) -> Callable[[Path, Path], None]:
    """Point a manifest path field at `value`, listing it in `files` with the right hash of the
    other bundle's file, so only the path rule can refuse it."""
    def mutate(b: Path, other: Path) -> None:
        m = _manifest(b)
        real = value.replace("{other}", str(other)).replace("{other_rel}", os.path.relpath(other, b))
        if field == "module":
            m["targets"][0]["module"] = real
        elif field == "weights":
            m["weights"]["file"] = real
        else:
            m[field] = real
        src = other / (rehash_from or "cpu/module.vmfb")
        m["files"][real] = {"sha256": mhagen.runtime.sha256_file(src), "size": src.stat().st_size}
        _save(b, m)
    return mutate


def _symlink(rel: str, target_rel: str, *, rehash: bool = True) -> Callable[[Path, Path], None]:
    """Replace `rel` by a symlink to the other bundle's `target_rel` (hashes updated to match)."""
    def mutate(b: Path, other: Path) -> None:
        path = b / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.symlink_to(other / target_rel)
        if rehash and rel != "manifest.json":
            m = _manifest(b)
            for name in list(m["files"]):
                if name == rel or name.startswith(rel + "/"):
                    src = other / target_rel / name[len(rel) + 1:] if name != rel else other / target_rel
                    if src.is_file():
                        m["files"][name] = {"sha256": mhagen.runtime.sha256_file(src), "size": src.stat().st_size}
            _save(b, m)
    return mutate


def _fifo(rel: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        (b / rel).unlink()
        os.mkfifo(b / rel)
    return mutate


def _dir(rel: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        (b / rel).unlink()
        (b / rel).mkdir()
    return mutate


def _write_manifest(text: str | bytes) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (b / "manifest.json").write_bytes(data)
    return mutate


def _set(path: str | tuple, value) -> Callable[[Path, Path], None]:
    """Set a manifest field, dotted or as a tuple of keys (list indices as numbers); `...` deletes it."""
    def fn(m: dict) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        node = m
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value
    return _edit(fn)


HASH = "does not match its SHA-256"
OUTSIDE = "points outside the bundle"
MALFORMED = "is malformed"

# name -> (mutation, text the one error line must contain)
CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    # every file kind, tampered, truncated, missing or swapped for another bundle's
    "module_bitflip": (_flip("cpu/module.vmfb"), HASH),
    "module_truncated": (_truncate("cpu/module.vmfb"), HASH),
    "module_missing": (_delete("cpu/module.vmfb"), "cpu/module.vmfb is missing"),
    "module_from_other_bundle": (_replace_with_other("cpu/module.vmfb"), HASH),
    "weights_bitflip": (_flip("weights.irpa"), HASH),
    "weights_truncated": (_truncate("weights.irpa"), HASH),
    "weights_missing": (_delete("weights.irpa"), "weights.irpa is missing"),
    "weights_from_other_bundle": (_replace_with_other("weights.irpa"), HASH),
    "program_modified": (_append("program.mlir", "\n// edited\n"), HASH),
    "program_missing": (_delete("program.mlir"), "program.mlir is missing"),
    "run_py_modified": (_append("run.py", "\nimport os\n"), HASH),
    "readme_modified": (_append("README.md", "\nedited\n"), HASH),
    "runtime_init_modified": (_append("mhagen_runtime/__init__.py", "\nX = 1\n"), HASH),
    "runtime_layer_modified": (_append("mhagen_runtime/layer.py", "\nX = 1\n"), HASH),
    "runtime_bundle_missing": (_delete("mhagen_runtime/bundle.py"), "mhagen_runtime/bundle.py is missing"),
    # paths that leave the bundle, even with a matching hash
    "module_absolute_path": (_point("module", "{other}/cpu/module.vmfb"), OUTSIDE),
    "module_dotdot_path": (_point("module", "{other_rel}/cpu/module.vmfb"), OUTSIDE),
    "module_dotdot_inside": (_point("module", "cpu/../cpu/module.vmfb"), OUTSIDE),
    "module_dot_path": (_point("module", "./cpu/module.vmfb"), OUTSIDE),
    "module_backslash_path": (_point("module", "cpu\\module.vmfb"), OUTSIDE),
    "module_empty_path": (_set("targets.0.module", ""), "must be a relative path"),
    "module_path_number": (_set("targets.0.module", 7), "must be a relative path"),
    "module_drive_path": (_point("module", "C:/x/module.vmfb"), OUTSIDE),
    "weights_absolute_path": (_point("weights", "{other}/weights.irpa", rehash_from="weights.irpa"), OUTSIDE),
    "weights_dotdot_path": (_point("weights", "{other_rel}/weights.irpa", rehash_from="weights.irpa"), OUTSIDE),
    "program_dotdot_path": (_point("program", "../program.mlir", rehash_from="program.mlir"), OUTSIDE),
    "files_key_absolute": (_set(("files", "/etc/hostname"), {"sha256": "0" * 64, "size": 1}), OUTSIDE),
    "files_key_dotdot": (_set(("files", "a/../../x"), {"sha256": "0" * 64, "size": 1}), OUTSIDE),
    # symlinks in any component, hashes made to match
    "module_symlink_to_other": (_symlink("cpu/module.vmfb", "cpu/module.vmfb"), "is a symlink"),
    "weights_symlink_to_other": (_symlink("weights.irpa", "weights.irpa"), "is a symlink"),
    "target_dir_symlink": (_symlink("cpu", "cpu"), "is a symlink"),
    "runtime_dir_symlink": (_symlink("mhagen_runtime", "mhagen_runtime"), "is a symlink"),
    "program_symlink": (_symlink("program.mlir", "program.mlir"), "is a symlink"),
    "manifest_symlink": (_symlink("manifest.json", "manifest.json"), "is a symlink"),
    # special files where regular files belong (a FIFO would block a reader forever)
    "module_fifo": (_fifo("cpu/module.vmfb"), "is not a regular file"),
    "weights_fifo": (_fifo("weights.irpa"), "is not a regular file"),
    "manifest_fifo": (_fifo("manifest.json"), "is not a regular file"),
    "module_directory": (_dir("cpu/module.vmfb"), "is not a regular file"),
    "manifest_directory": (_dir("manifest.json"), "is not a regular file"),
    "manifest_missing": (_delete("manifest.json"), "manifest.json is missing"),
    # malformed manifests
    "manifest_not_json": (_write_manifest("{ not json"), "not valid JSON"),
    "manifest_empty": (_write_manifest(""), "not valid JSON"),
    "manifest_binary": (_write_manifest(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "manifest_list": (_write_manifest("[1, 2, 3]"), "not an mhagen bundle manifest"),
    "manifest_deep_nesting": (_write_manifest("[" * 200000 + "]" * 200000), "not valid JSON"),
    "manifest_huge": (_write_manifest(b" " * (17 << 20) + b"{}"), "more than the"),
    "manifest_wrong_format": (_set("format", "keras"), "not an mhagen bundle manifest"),
    "manifest_wrong_version": (_set("version", 99), "manifest version 99"),
    "manifest_no_interface": (_set("interface", ...), "interface must be an object"),
    "manifest_interface_list": (_set("interface", []), "interface must be an object"),
    "manifest_no_functions": (_set("interface.functions", ...), "interface.functions must be a non-empty list"),
    "manifest_empty_functions": (_set("interface.functions", []), "interface.functions must be a non-empty list"),
    "manifest_function_name_bad": (_set("interface.functions.0.name", "main; rm"), "a function name"),
    "manifest_function_inputs_str": (_set("interface.functions.0.inputs", "query"), "must be a non-empty list"),
    "manifest_input_name_unknown": (_set("interface.inputs.0.name", "evil"), "interface.inputs[0].name"),
    "manifest_input_shape_strings": (_set("interface.inputs.0.shape", ["2", "3"]), "interface.inputs[0].shape"),
    "manifest_input_shape_negative": (_set("interface.inputs.0.shape", [-2, 3, 8]), "non-negative integers"),
    "manifest_input_shape_huge": (_set("interface.inputs.0.shape", [2**62, 3, 8]), "non-negative integers"),
    "manifest_input_dtype_bad": (_set("interface.inputs.0.dtype", "object"), "interface.inputs[0].dtype"),
    "manifest_no_outputs": (_set("interface.outputs", []), "interface.outputs must be a non-empty list"),
    "manifest_compute_dtype_bad": (_set("interface.compute_dtype", "float64"), "interface.compute_dtype"),
    "manifest_dynamic_bad": (_set("interface.dynamic", ["heads"]), "interface.dynamic"),
    "manifest_dynamic_no_max": (_set("interface.dynamic", ["batch"]), "interface.max_batch"),
    "manifest_mask_list": (_set("interface.mask", [1, 2]), "interface.mask must be an object"),
    "manifest_dropout_seed_negative": (_set("interface.dropout", {"seed": -1, "rate": 0.1}), "dropout.seed"),
    "manifest_no_files": (_set("files", ...), "files must be a non-empty object"),
    "manifest_files_list": (_set("files", ["cpu/module.vmfb"]), "files must be a non-empty object"),
    "manifest_hash_not_hex": (_set(("files", "cpu/module.vmfb", "sha256"), "xyz"), "64 lowercase hex digits"),
    "manifest_size_string": (_set(("files", "cpu/module.vmfb", "size"), "12"), "a non-negative integer"),
    "manifest_module_unlisted": (_set(("files", "cpu/module.vmfb"), ...), "a file listed (with its hash) in files"),
    "manifest_no_targets": (_set("targets", []), "targets must be a non-empty list"),
    "manifest_targets_object": (_set("targets", {"cpu": {}}), "targets must be a non-empty list"),
    "manifest_target_no_module": (_set("targets.0.module", ...), "targets[0].module"),
    "manifest_target_name_number": (_set("targets.0.name", 3), "targets[0].name must be a target name"),
    "manifest_target_name_path": (_set("targets.0.name", "../cpu"), "targets[0].name must be a target name"),
    "manifest_target_no_driver": (_set("targets.0.driver", ...), "targets[0].driver"),
    "manifest_target_features_str": (_set("targets.0.cpu_features", "avx2"), "cpu_features must be a list"),
    "manifest_duplicate_target": (_edit(lambda m: m["targets"].append(dict(m["targets"][0]))), "must be unique"),
    "manifest_no_iree": (_set("iree", ...), "iree must be an object"),
    "manifest_weights_mode_bad": (_set("weights_mode", "pickle"), "weights_mode"),
    "manifest_weights_no_file": (_set("weights.file", ...), "weights.file"),
    # targets that must not run
    "target_verify_failed": (_set("targets.0.verify", {"status": "FAIL", "passed": False, "message": "x"}),
                             "failed its verify when built"),
    "target_not_runnable": (_set("targets.0.runnable", False), "failed its verify when built"),
    "target_other_arch": (_edit(lambda m: m["targets"][0].update(arch="aarch64")), "compiled for aarch64 CPUs"),
    "target_other_cpu": (_edit(lambda m: m["targets"][0]["cpu_features"].append("avx512_imaginary")),
                         "which this CPU lacks"),
    "iree_other_version": (_set("iree.compiler_version", "2.9.0"), "compiled by IREE 2.9.0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_bundle_is_refused(case: str, bundles, tmp_path: Path, capsys) -> None:
    good, other, root = bundles
    b = tmp_path / "bundle"
    shutil.copytree(good, b, symlinks=True)
    mutate, needle = CASES[case]
    mutate(b, other)
    outs = tmp_path / "outs"
    outs.mkdir()
    argv = ["run", str(b), "--target", "cpu", "--input", f"query={root / 'q.npy'}",
            "--input", f"value={root / 'v.npy'}", "--output", str(outs / "result")]
    refuses(argv, capsys, needle=needle, watch=[outs, other])
    with pytest.raises(mhagen.BundleError, match=None) as err:
        mhagen.load(b, target="cpu")
    assert needle in str(err.value)


def test_failed_target_runs_only_when_asked(bundles, tmp_path: Path, capsys) -> None:
    good, other, root = bundles
    b = tmp_path / "bundle"
    shutil.copytree(good, b)
    _set("targets.0.verify", {"status": "FAIL", "passed": False, "message": "outputs[0][0, 0, 0]: x"})(b, other)
    argv = ["run", str(b), "--target", "cpu", "--input", f"query={root / 'q.npy'}",
            "--input", f"value={root / 'v.npy'}", "--output", str(tmp_path / "out.npy")]
    assert main(argv + ["--allow-failed"]) == 0
    assert np.load(tmp_path / "out.npy").shape == (2, 3, 8)
    layer = mhagen.load(b, target="cpu", allow_failed=True)
    assert layer(np.ones((2, 3, 8), np.float32), np.ones((2, 5, 8), np.float32)).shape == (2, 3, 8)


def test_bundle_path_not_a_bundle(bundles, tmp_path: Path, capsys) -> None:
    good, other, root = bundles
    (tmp_path / "file").write_text("x")
    for path, needle in ((tmp_path / "file", "Bundle directory not found"),
                         (tmp_path / "missing", "Bundle directory not found"),
                         (tmp_path, "manifest.json is missing")):
        refuses(["run", str(path), "--input", f"query={root / 'q.npy'}", "--input", f"value={root / 'v.npy'}",
                 "--output", str(tmp_path / "o")], capsys, needle=needle, watch=[root])
        assert not (tmp_path / "o").exists()


def test_target_auto_takes_the_first_runnable_target(bundles, tmp_path: Path, capsys) -> None:
    """`auto` walks GPUs first, then the CPU; a failed or foreign target is passed over."""
    good, other, root = bundles
    b = tmp_path / "bundle"
    shutil.copytree(good, b)
    layer = mhagen.load(b, target="auto")
    assert layer.target_name == "cpu"
    m = _manifest(b)
    cuda = dict(m["targets"][0], name="cuda-sm80", driver="cuda", arch="any", cpu_features=[])
    m["targets"].insert(0, cuda)
    _save(b, m)
    assert mhagen.load(b, target="auto").target_name == "cpu"     # no CUDA device here
    argv = ["run", str(b), "--target", "auto", "--input", f"query={root / 'q.npy'}",
            "--input", f"value={root / 'v.npy'}", "--output", str(tmp_path / "o.npy")]
    assert main(argv) == 0 and "ran `cpu`" in capsys.readouterr().out
    _set("targets.1.verify", {"status": "FAIL", "passed": False})(b, other)
    with pytest.raises(mhagen.BundleError, match="no target of this bundle runs on this machine"):
        mhagen.load(b, target="auto")


def _plant(rel: str, text: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, other: Path) -> None:
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_text(text)
    return mutate


CODE_CASES = {
    "shadow_numpy_py": (_plant("numpy.py", "print('PWNED')\nraise SystemExit(0)\n"), "numpy.py is code"),
    "shadow_hashlib_py": (_plant("hashlib.py", "print('PWNED')\n"), "hashlib.py is code"),
    "forged_pyc": (_plant("mhagen_runtime/__pycache__/errors.cpython-311.pyc", "x"), "errors.cpython-311.pyc is code"),
    "extra_runtime_module": (_plant("mhagen_runtime/evil.py", "print('PWNED')\n"), "mhagen_runtime/evil.py is code"),
    "pth_file": (_plant("x.pth", "import os\n"), "x.pth is code"),
}


@pytest.mark.parametrize("case", sorted(CODE_CASES))
def test_planted_code_is_refused_and_never_runs(case: str, bundles, tmp_path: Path, capsys) -> None:
    """Code the manifest does not list: refused by load and `mhagen run`; the bundle's own run.py
    never imports it (its folder is off the import path and no bytecode is read)."""
    import subprocess
    import sys

    good, other, root = bundles
    b = tmp_path / "bundle"
    shutil.copytree(good, b)
    mutate, needle = CODE_CASES[case]
    mutate(b, other)
    refuses(["run", str(b), "--input", f"query={root / 'q.npy'}", "--input", f"value={root / 'v.npy'}",
             "--output", str(tmp_path / "o.npy")], capsys, needle=needle, watch=[b])
    proc = subprocess.run([sys.executable, str(b / "run.py"), "--target", "cpu", "--input", f"query={root / 'q.npy'}",
                           "--input", f"value={root / 'v.npy'}", "--output", str(tmp_path / "o.npy")],
                          capture_output=True, text=True, timeout=300)
    assert "PWNED" not in proc.stdout + proc.stderr
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
