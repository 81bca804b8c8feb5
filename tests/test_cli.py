"""The command line: verify, build, targets, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT
from mhagen.cli import main


def test_verify_passes_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "v.json"
    code = main(["verify", str(EXAMPLES / "cross_attention.toml"), "--target", "cpu", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["target"] == "cpu" and row["status"] == "pass" and row["max_abs"] < 1e-5
    assert "max abs err" in capsys.readouterr().out


def test_verify_fails_on_wrong_weights(tmp_path, capsys) -> None:
    """NaN weights never pass: they are refused before anything runs (and a clean run exits 0)."""
    import numpy as np

    import mhagen
    from mhagen.weights_io import save_weights_file

    spec = mhagen.Spec.load(EXAMPLES / "cross_attention.toml")
    names = mhagen.weights.weight_names(spec)
    weights = dict(zip(names, mhagen.init_weights(spec)))
    path = save_weights_file(tmp_path / "w.npz", weights)
    assert main(["verify", str(EXAMPLES / "cross_attention.toml"), "--weights", str(path)]) == 0
    # A NaN weight would poison the compiled output and the oracle alike: refused with its key named.
    weights["attention_output/bias"] = np.full_like(weights["attention_output/bias"], np.nan)
    save_weights_file(path, weights)
    capsys.readouterr()
    assert main(["verify", str(EXAMPLES / "cross_attention.toml"), "--weights", str(path)]) == 2
    assert "`attention_output/bias` holds nan" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["verify", "no/such/spec.toml"], "Spec file not found"),
    (["verify", str(EXAMPLES / "encoder.toml"), "--target", "tpu"], "expected one of"),
    (["verify", str(EXAMPLES / "encoder.toml"), "--target", "cuda-sm90"], "refused"),
    (["build", str(EXAMPLES / "encoder.toml"), "--target", "nope", "--out", "x"], "`target`"),
])
def test_errors_are_one_line(args, needle, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhagen: error:") and needle in err[0]


def test_bad_spec_is_one_line_without_traceback(tmp_path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text("[layer]\nnum_heads = 0\nkey_dim = 4\n[call]\nquery = [1, 2, 3]\nvalue = [1, 2, 3]\n")
    proc = subprocess.run([sys.executable, "-m", "mhagen.cli", "verify", str(spec)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mhagen: error: Received an invalid value for argument `num_heads`, "
                                   "expected a positive integer. Received: num_heads=0")
    assert "Traceback" not in proc.stderr


def test_targets_lists_every_file(capsys) -> None:
    assert main(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"cpu", "cpu-x86_64", "cpu-aarch64", "cpu-riscv64", "vmvx", "vulkan", "vulkan-ampere",
            "cuda-sm80", "cuda-sm89", "rocm-gfx942", "rocm-gfx1100", "metal"} <= set(rows)
    assert rows["cpu"]["runs"] and rows["cpu"]["compiles"]
    assert not rows["cpu-aarch64"]["runs"] and "aarch64" in rows["cpu-aarch64"]["run_reason"]
    assert not rows["cuda-sm90"]["compiles"] and "cuda-sm80" in rows["cuda-sm90"]["compile_reason"]
