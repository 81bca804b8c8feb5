"""Used like Keras and like IREE's tools (issue 15, points 4-7): a verify after a build reuses its
compiled modules, tables that fit the terminal, a live spinner and "cached", a bundle timed with the
runtime alone, and signatures that show their free axes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mhagen
from conftest import EXAMPLES, make_spec
from mhagen.cli import main
from mhagen.targets import parse_targets


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(cache))
    return cache


def _width(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


# ---- the one compile of README command 1, reused by its verify (point 6) ------------------------
def test_verify_after_build_reads_the_cache(fresh_cache: Path, tmp_path: Path, capsys) -> None:
    spec = str(EXAMPLES / "cross_attention.toml")
    assert main(["build", spec, "--target", "cpu", "--out", str(tmp_path / "b")]) == 0
    built = capsys.readouterr().out
    assert "[1/1] cpu: compiled in" in built
    assert main(["verify", spec, "--target", "cpu", "--json", str(tmp_path / "v.json")]) == 0
    assert "cached" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "v.json").read_text())["results"]
    assert row["cached"] is True and row["status"] == "pass"
    assert main(["build", spec, "--target", "cpu", "--out", str(tmp_path / "b")]) == 0
    assert "[1/1] cpu: cached" in capsys.readouterr().out


# ---- tables that fit, rel err only with rtol (point 4) -------------------------------------------
def test_targets_table_fits_80_columns(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert _width(out) <= 80 and "cuda-sm80" in out and "--json shows all" in out
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["targets"]) == 0
    wide = capsys.readouterr().out
    assert "description" in wide and "--json shows all" not in wide and _width(wide) <= 200


def _fake_rows(spec, targets, weights=None, *, seed=0, on_progress=None, reference=None):
    """verify_matrix as `--targets all` answers it on this machine, without compiling."""
    from mhagen.targets import availability
    from mhagen.verify import TargetResult, shape_checks

    rows = []
    for t in targets:
        a = availability(t)
        row = TargetResult(t.name, compiled=a.compiles, size=123456, compile_seconds=61.5, reason="" if a.compiles
                           else a.compile_reason)
        if a.compiles and a.runs:
            row.ran, row.passed, row.max_abs, row.max_rel = True, True, 4.2e-7, 0.0142
            row.shapes = [c.label for c in shape_checks(spec)[0]]
        elif a.compiles:
            row.reason = a.run_reason
        rows.append(row)
    return rows


def test_verify_matrix_for_all_targets_fits_80_columns(monkeypatch, capsys) -> None:
    monkeypatch.setattr("mhagen.verify.verify_matrix", _fake_rows)
    monkeypatch.setenv("COLUMNS", "80")
    main(["verify", str(EXAMPLES / "encoder.toml"), "--targets", "all"])
    out = capsys.readouterr().out
    assert _width(out) <= 80
    assert all(t.name in out for t in parse_targets("all"))
    assert "not run: needs a" in out
    # float32's tolerance has rtol 0: no relative error next to "pass".
    assert "rel err" not in out and "0.0142" not in out and "pass: |err| <= 1e-05" in " ".join(out.split())


def test_verify_matrix_shows_rel_err_when_rtol(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr("mhagen.verify.verify_matrix", _fake_rows)
    spec = make_spec({"num_heads": 2, "key_dim": 4}, {"query": [2, 4, 8], "value": [2, 4, 8], "dtype": "float16"})
    path = tmp_path / "f16.toml"
    path.write_text(spec.to_toml())
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["verify", str(path), "--target", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "max rel err" in out and "0.0142" in out and "|err| <= 0.01 + 0.01 |expected|" in out


def test_spinner_shows_elapsed_time_then_one_line() -> None:
    from rich.console import Console

    from mhagen.progress import Steps

    buffer = io.StringIO()
    with Steps(Console(file=buffer, force_terminal=True, width=80)) as steps:
        steps.start("cpu: compiling (llvm-cpu)")
        steps._progress.refresh()
        steps.done("[1/1] cpu: cached, 40 KiB")
    text = buffer.getvalue()
    assert "cpu: compiling (llvm-cpu)" in text and "0:00:0" in text   # the live line, with elapsed time
    assert "[1/1] cpu: cached, 40 KiB" in text                          # markup-free, kept
    plain = io.StringIO()
    with Steps(Console(file=plain, width=80)) as steps:                # not a terminal: plain lines only
        steps.start("cpu: compiling (llvm-cpu)")
        steps.done("[1/1] cpu: compiled in 2.0 s, 40 KiB")
    assert plain.getvalue() == "[1/1] cpu: compiled in 2.0 s, 40 KiB\n"


# ---- a bundle timed with the runtime alone (point 5) ---------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from mhagen.bundle import build_bundle

    out = tmp_path_factory.mktemp("timing") / "encoder"
    build_bundle(mhagen.Spec.load(EXAMPLES / "encoder.toml"), parse_targets("cpu,vmvx"), out)
    return out


def test_time_layer_percentiles(bundle: Path) -> None:
    from mhagen.runtime.timing import time_layer

    timing = time_layer(mhagen.load(bundle, "cpu"), warmup=2, repeats=30)
    assert len(timing.times_ms) == 30 and timing.warmup == 2 and timing.function == "main"
    assert timing.min_ms <= timing.p50_ms <= timing.p90_ms <= timing.p99_ms <= timing.max_ms
    assert timing.inputs[0] == ("query", (2, 16, 32), "float32")
    assert "p50" in timing.summary() and "p99" in timing.summary()


def test_time_layer_refuses_a_chunked_batch(bundle: Path) -> None:
    import numpy as np

    from mhagen.runtime.timing import time_layer

    layer = mhagen.load(bundle, "cpu")
    x = np.zeros((3, 16, 32), np.float32)
    with pytest.raises(mhagen.CallError, match="give batch 2"):
        time_layer(layer, {"query": x, "value": x})


def test_bench_command_times_a_bundle(bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.json"
    assert main(["bench", str(bundle), "--target", "vmvx", "--repeats", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vmvx: function main" in printed and "p90" in printed
    data = json.loads(out.read_text())
    assert data["target"] == "vmvx" and data["calls"] == 5 and data["p50_ms"] > 0


def test_run_py_bench_needs_neither_jax_nor_mhagen(bundle: Path) -> None:
    """The bundle's run.py times itself with NumPy and iree-base-runtime only."""
    code = ("import sys, runpy; sys.modules['jax'] = sys.modules['mhagen'] = None; "
            f"sys.argv = ['run.py', '--target', 'cpu', '--bench', '--repeats', '7']; "
            f"runpy.run_path({str(bundle / 'run.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "7 timed calls" in proc.stdout and "p99" in proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["--bench", "--output", "x.npy"], "--bench times the module and writes no output"),
    (["--repeats", "3", "--output", "x.npy"], "--repeats goes with --bench"),
    ([], "the following arguments are required: --output"),
])
def test_run_bench_arguments_refused(bundle: Path, argv: list[str], needle: str, capsys) -> None:
    from corpus import refuses

    refuses(["run", str(bundle), *argv], capsys, needle=needle, watch=[bundle])


# ---- free axes in the signature (point 7) --------------------------------------------------------
def test_repr_shows_free_axes() -> None:
    from conftest import build_once

    dynamic = build_once(make_spec({"num_heads": 2, "key_dim": 4}, {
        "query": [2, 8, 8], "value": [2, 8, 8], "attention_mask": True,
        "dynamic": ["batch", "seq"], "max_batch": 2, "max_seq": 8}))
    assert repr(dynamic) == ("<CompiledLayer target=cpu query(<=2, <=8, 8), value(<=2, <=8, 8), "
                             "attention_mask(<=2, <=8, <=8)>")
    static = build_once(mhagen.Spec.load(EXAMPLES / "cross_attention.toml"))
    assert repr(static).startswith("<CompiledLayer target=cpu query(*, 12, 24), value(*, ")
    assert repr(static).endswith("; * = any batch, run 2 at a time>")
