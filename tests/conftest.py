"""Shared fixtures: compiled layers are built once per session (and the compile cache is
content-addressed, so a rerun with unchanged programs skips IREE entirely)."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# TensorFlow never loads in a pytest process that may open Vulkan: once it is imported, IREE's
# Vulkan driver on Mesa lavapipe segfaults in that process (lavapipe's LLVM binds TensorFlow's
# LLVM symbols), and with the `interop` extra installed Keras 3 imports it from any get_config()
# or save (keras.src.utils.module_utils.tensorflow). Marked absent, Keras runs as where
# TensorFlow is not installed. Tests that need TensorFlow (tests/test_keras_interop.py) run in a
# pytest process of their own, which sets MHAGEN_TEST_TENSORFLOW=1.
TENSORFLOW_ALLOWED = os.environ.get("MHAGEN_TEST_TENSORFLOW") == "1"
if not TENSORFLOW_ALLOWED:
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

import mhagen  # noqa: E402 - after the TensorFlow guard

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def make_spec(layer: dict, call: dict) -> mhagen.Spec:
    return mhagen.Spec.from_dict({"layer": layer, "call": call})


@functools.lru_cache(maxsize=None)
def _build_cached(spec_toml: str, target: str) -> mhagen.CompiledLayer:
    spec = mhagen.Spec.from_toml(spec_toml)
    return mhagen.build(spec, target=target, weights=mhagen.init_weights(spec))


def build_once(spec: mhagen.Spec, target: str = "cpu") -> mhagen.CompiledLayer:
    """Compile and load each (spec, target) once per test session."""
    return _build_cached(spec.to_toml(), target)


def unit_inputs(spec: mhagen.Spec, seed: int = 0) -> dict[str, np.ndarray]:
    from mhagen.verify import random_inputs

    return random_inputs(spec, seed)


def vulkan_available() -> tuple[bool, str]:
    from mhagen.runtime import driver_status

    return driver_status("vulkan")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


def _opens_vulkan(item) -> bool:
    path = Path(str(item.fspath))
    return "vulkan" in item.nodeid.lower() or "vulkan" in _module_text(path)


@functools.lru_cache(maxsize=None)
def _module_text(path: Path) -> str:
    return path.read_text().lower()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that may open a Vulkan device run last. Once IREE has a device on Mesa's lavapipe,
    two of its threads poll for the rest of the process (measured: 0.5-0.75 of a core while the
    process is idle, and it stays after the layers and the device cache are gone), which slowed
    every test after the first Vulkan one; at the end they only slow each other."""
    items.sort(key=_opens_vulkan)


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on JAX (skipped where Keras is not installed or runs another backend)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"these tests run Keras on JAX; KERAS_BACKEND is {keras.backend.backend()}")
    return keras
