"""The invalid-input corpus: each bad spec, call, target or file gets one clear line from the CLI
(exit 2, no traceback) and a `MhagenError` subclass from the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mhagen
from mhagen.cli import main

GOOD_LAYER = 'num_heads = 2\nkey_dim = 4\n'
GOOD_CALL = 'query = [2, 5, 8]\nvalue = [2, 7, 8]\n'


def _toml(layer: str = GOOD_LAYER, call: str = GOOD_CALL) -> str:
    return f"[layer]\n{layer}\n[call]\n{call}"


# name -> (spec text, API error class, text the one line must contain)
SPECS = {
    "zero_heads": (_toml(layer="num_heads = 0\nkey_dim = 4\n"), mhagen.SpecError,
                   "`num_heads`, expected a positive integer. Received: num_heads=0"),
    "negative_heads": (_toml(layer="num_heads = -2\nkey_dim = 4\n"), mhagen.SpecError, "num_heads=-2"),
    "float_key_dim": (_toml(layer="num_heads = 2\nkey_dim = 1.5\n"), mhagen.SpecError,
                      "`key_dim`, expected a positive integer. Received: key_dim=1.5"),
    "axes_out_of_range": (_toml(layer=GOOD_LAYER + "attention_axes = [3]\n"), mhagen.SpecError,
                          "`attention_axes`, expected distinct axes"),
    "axes_include_batch": (_toml(layer=GOOD_LAYER + "attention_axes = [0]\n"), mhagen.SpecError,
                           "other than batch (0) and features (2)"),
    "axes_include_features": (_toml(layer=GOOD_LAYER + "attention_axes = [-1]\n"), mhagen.SpecError,
                              "Received: attention_axes=[-1]"),
    "key_value_mismatch": (_toml(call=GOOD_CALL + "key = [2, 6, 8]\n"), mhagen.SpecError,
                           "All dimensions of `value` and `key`, except the last one, must be equal"),
    "mask_does_not_broadcast": (_toml(call=GOOD_CALL + "attention_mask = [3, 5, 7]\n"), mhagen.SpecError,
                                "`attention_mask`, expected a shape that broadcasts"),
    "unknown_initializer": (_toml(layer=GOOD_LAYER + 'kernel_initializer = "glorot_sideways"\n'),
                            mhagen.SpecError, "`kernel_initializer`, expected one of glorot_uniform"),
    "unknown_key": (_toml(layer=GOOD_LAYER + "num_head = 3\n"), mhagen.SpecError,
                    "Unknown key(s) ['num_head'] in [layer]"),
    "malformed_toml": ("[layer\nnum_heads = 2", mhagen.SpecError, "malformed TOML"),
    "missing_table": ("[layer]\n" + GOOD_LAYER, mhagen.SpecError, "Missing table [call]"),
    "bad_dtype": (_toml(call=GOOD_CALL + 'dtype = "float64"\n'), mhagen.SpecError,
                  "`dtype`, expected one of 'float32'"),
    "causal_two_axes": ("[layer]\nnum_heads = 1\nkey_dim = 2\n[call]\nquery = [1, 2, 3, 4]\n"
                        "value = [1, 2, 3, 4]\nuse_causal_mask = true\n", mhagen.SpecError,
                        "`use_causal_mask` masks along input axis 1"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_spec(name: str, tmp_path: Path, capsys) -> None:
    text, cls, needle = SPECS[name]
    path = tmp_path / "spec.toml"
    path.write_text(text)
    with pytest.raises(cls) as err:
        mhagen.Spec.load(path)
    assert isinstance(err.value, mhagen.MhagenError)
    for command in (["verify", str(path)], ["build", str(path), "--out", str(tmp_path / "o")]):
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mhagen: error:") and needle in lines[0], lines
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    spec = root / "spec.toml"
    spec.write_text(_toml(call=GOOD_CALL + "attention_mask = true\n"))
    assert main(["build", str(spec), "--target", "cpu", "--out", str(root / "bundle")]) == 0
    return spec, root / "bundle"


def _weights(spec_path: Path) -> dict[str, np.ndarray]:
    spec = mhagen.Spec.load(spec_path)
    return dict(zip(mhagen.weights.weight_names(spec), mhagen.init_weights(spec)))


@pytest.mark.parametrize("case", ["wrong_shape", "missing_entry", "corrupt", "wrong_suffix"])
def test_bad_weights_file(case: str, good, tmp_path: Path, capsys) -> None:
    from mhagen.weights_io import save_weights_file

    spec_path, _ = good
    w = _weights(spec_path)
    path = tmp_path / "w.npz"
    if case == "wrong_shape":
        w["key/kernel"] = np.zeros((8, 2, 5), np.float32)
        save_weights_file(path, w)
        needle = "`key/kernel` has shape (8, 2, 5), expected (8, 2, 4)"
    elif case == "missing_entry":
        del w["value/bias"]
        save_weights_file(path, w)
        needle = "missing ['value/bias']"
    elif case == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
        needle = "corrupt or unreadable"
    else:
        path = tmp_path / "w.pkl"
        path.write_bytes(b"x")
        needle = "expected a .npz or .safetensors file"
    assert main(["verify", str(spec_path), "--weights", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    with pytest.raises(mhagen.WeightsError):
        from mhagen.weights import normalize_weights
        from mhagen.weights_io import load_weights_file

        normalize_weights(mhagen.Spec.load(spec_path), load_weights_file(path))


@pytest.mark.parametrize("case", ["wrong_dtype", "wrong_rank", "wrong_shape", "mask_shape", "unknown_input",
                                  "missing_value"])
def test_bad_call(case: str, good, tmp_path: Path, capsys) -> None:
    _, bundle = good
    q = np.zeros((2, 5, 8), np.float32)
    v = np.zeros((2, 7, 8), np.float32)
    mask = None
    extra: list[str] = []
    needle, cls = "", mhagen.CallError
    if case == "wrong_dtype":
        q = q.astype(np.int32)
        needle = "`query` has dtype int32, expected float32"
    elif case == "wrong_rank":
        q = q[0]
        needle = "`query` has shape (5, 8), expected (*, 5, 8) (* = any batch)"
    elif case == "wrong_shape":
        v = np.zeros((2, 6, 8), np.float32)
        needle = "`value` has shape (2, 6, 8), expected (2, 7, 8)"
    elif case == "mask_shape":
        mask = np.ones((4, 7), bool)
        needle = "`attention_mask` has shape (4, 7), which does not broadcast to the declared mask (2, 5, 7)"
    elif case == "unknown_input":
        extra = ["--input", f"keys={tmp_path / 'q.npy'}"]
        needle = "`--input`, expected NAME=FILE.npy"
    else:
        needle = "Missing --input value=FILE.npy"
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "v.npy", v)
    args = ["run", str(bundle), "--input", f"query={tmp_path / 'q.npy'}", "--output", str(tmp_path / "o")]
    if case != "missing_value":
        args += ["--input", f"value={tmp_path / 'v.npy'}"]
    if mask is not None:
        np.save(tmp_path / "m.npy", mask)
        args += ["--input", f"attention_mask={tmp_path / 'm.npy'}"]
    assert main(args + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhagen run: error:") and needle in lines[0], lines
    if case not in ("unknown_input", "missing_value"):
        layer = mhagen.load(bundle, "cpu")
        with pytest.raises(cls, match="has (dtype|shape)"):
            layer(q, v, attention_mask=mask)


def test_unknown_target_everywhere(good, capsys) -> None:
    spec_path, bundle = good
    for args in (["verify", str(spec_path), "--targets", "cpu,gpu9000"],
                 ["build", str(spec_path), "--target", "gpu9000", "--out", "x"]):
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "expected one of" in line and "Received: target='gpu9000'" in line
    with pytest.raises(mhagen.TargetError):
        mhagen.build(spec_path, target="gpu9000")


def test_compile_past_the_time_limit_is_stopped(good, tmp_path: Path, monkeypatch, capsys) -> None:
    """A compile that does not finish is killed and reported, not waited on forever."""
    spec_path, _ = good
    monkeypatch.setenv("MHAGEN_CACHE_DIR", "off")
    monkeypatch.setenv("MHAGEN_COMPILE_TIMEOUT", "0.05")
    with pytest.raises(mhagen.CompileError, match=r"did not finish compiling for target `cpu` within 0.05 s"):
        mhagen.build(spec_path, target="cpu")
    assert main(["verify", str(spec_path), "--target", "cpu"]) == 1
    assert "compile failed" in capsys.readouterr().out
    monkeypatch.setenv("MHAGEN_COMPILE_TIMEOUT", "soon")
    assert main(["build", str(spec_path), "--target", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "mhagen: error: MHAGEN_COMPILE_TIMEOUT must be a number of seconds; got 'soon'"


def test_compile_failure_is_a_compile_error(good, tmp_path: Path, monkeypatch, capsys) -> None:
    spec_path, _ = good
    (tmp_path / "bad.toml").write_text('name = "bad-cpu"\nbackend = "llvm-cpu"\ndriver = "local-task"\n'
                                       'flags = ["--iree-llvmcpu-target-triple=nonsense-triple-xyz"]\n')
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path))
    monkeypatch.setenv("MHAGEN_CACHE_DIR", "off")
    with pytest.raises(mhagen.CompileError) as err:
        mhagen.build(spec_path, target="bad-cpu")
    assert err.value.diagnostics and "IREE_SAVE_TEMPS" in str(err.value)
    assert "--iree-llvmcpu-target-triple=nonsense-triple-xyz" in err.value.command
    assert main(["verify", str(spec_path), "--target", "bad-cpu"]) == 1  # reported as compile failed
    out = capsys.readouterr().out
    assert "compile failed" in out
    assert main(["build", str(spec_path), "--target", "bad-cpu", "--out", str(tmp_path / "o")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[0] == "mhagen: error: IREE failed to compile for target `bad-cpu` (llvm-cpu)"
    assert "IREE_SAVE_TEMPS" in err_lines[-1]
