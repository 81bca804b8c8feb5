"""Trust corpus, family `environment`: termination signals, bad settings in the environment,
outputs aimed into a bundle. Each ends cleanly: one line, the documented exit code, no litter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import refuses, tree_state

from mhagen.cli import main

SPEC = "[layer]\nnum_heads = 2\nkey_dim = 4\n[call]\nquery = [2, 3, 8]\nvalue = [2, 5, 8]\n"


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon"])
def test_bad_compile_timeout(value: str, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "s.toml").write_text(SPEC)
    monkeypatch.setenv("MHAGEN_CACHE_DIR", "off")
    monkeypatch.setenv("MHAGEN_COMPILE_TIMEOUT", value)
    refuses(["build", str(tmp_path / "s.toml"), "--target", "cpu", "--out", str(tmp_path / "o")], capsys,
            needle="MHAGEN_COMPILE_TIMEOUT must be a number of seconds", watch=[tmp_path])


@pytest.mark.parametrize("content", [b"\xff\xfe", b"name = [[[", b"x" * 10])
def test_bad_target_file(content: bytes, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.toml").write_bytes(content)
    (tmp_path / "s.toml").write_text(SPEC)
    monkeypatch.setenv("MHAGEN_TARGETS_PATH", str(tmp_path / "t"))
    refuses(["build", str(tmp_path / "s.toml"), "--target", "cpu", "--out", str(tmp_path / "o")], capsys,
            needle="is unreadable", watch=[tmp_path])


def test_run_output_not_into_a_bundle(tmp_path: Path, capsys) -> None:
    (tmp_path / "s.toml").write_text(SPEC)
    assert main(["build", str(tmp_path / "s.toml"), "--target", "cpu", "--out", str(tmp_path / "b")]) == 0
    np.save(tmp_path / "q.npy", np.ones((2, 3, 8), np.float32))
    np.save(tmp_path / "v.npy", np.ones((2, 5, 8), np.float32))
    args = ["run", str(tmp_path / "b"), "--input", f"query={tmp_path / 'q.npy'}", "--input",
            f"value={tmp_path / 'v.npy'}", "--output"]
    for output, needle in ((str(tmp_path / "b"), "is inside the bundle"),
                           (str(tmp_path / "b" / "cpu" / "o.npy"), "is inside the bundle"),
                           ("", "--output is empty")):
        refuses(args + [output], capsys, needle=needle, watch=[tmp_path / "b"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_termination_ends_like_ctrl_c(sig: int, tmp_path: Path) -> None:
    """A build stopped by SIGTERM/SIGHUP exits 130 with one line and leaves nothing beside --out."""
    (tmp_path / "s.toml").write_text(SPEC)
    env = {**os.environ, "MHAGEN_CACHE_DIR": "off", "MHAGEN_TEST_PAUSE_AT": "staging-created",
           "MHAGEN_TEST_PAUSE_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "mhagen.cli", "build", str(tmp_path / "s.toml"), "--target",
                             "cpu", "--out", str(tmp_path / "out" / "b")], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.startswith(".b.staging")
                                                  for p in (tmp_path / "out").glob(".*")):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("mhagen-test:")]
    assert "Traceback" not in err and lines == ["mhagen: interrupted"], err
    assert tree_state(tmp_path / "out") == {}
