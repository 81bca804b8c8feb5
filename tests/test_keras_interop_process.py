"""The Keras interop suite (tests/test_keras_interop.py) in a pytest process of its own.

It imports TensorFlow (tf_keras, keras_hub, and Keras 3's saving once the `interop` extra is
installed), and once TensorFlow is in a process, IREE's Vulkan driver on Mesa lavapipe segfaults
there; this process may open Vulkan, so the suite runs in a child with MHAGEN_TEST_TENSORFLOW=1
(tests/conftest.py keeps TensorFlow out of every other pytest process) and this test fails when
it fails. Its case table (case, source, target, max error or refusal) is printed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)  # measured 5.1 min cold, 3.3 warm on 2 loaded cores; its tests have 600 s each
def test_keras_interop_suite_in_its_own_process(tmp_path: Path) -> None:
    report = tmp_path / "cases.md"
    env = {**os.environ, "MHAGEN_TEST_TENSORFLOW": "1", "MHAGEN_INTEROP_REPORT": str(report),
           "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_keras_interop.py")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1750)
    print(done.stdout[-4000:])
    if report.is_file():
        print("| case | source | target | max error vs source (oracle) or refusal |\n|---|---|---|---|")
        print(report.read_text())
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def test_this_process_keeps_tensorflow_out(keras) -> None:
    """Keras 3 imports TensorFlow from get_config() and save() when it is installed; here it
    must not load (tests/conftest.py), or every Vulkan test after this one would crash."""
    layer = keras.layers.MultiHeadAttention(2, 4)
    layer.get_config()
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
