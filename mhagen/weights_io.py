"""Weights files: `.npz` and `.safetensors`, keyed by Keras weight path (`query/kernel`, ...)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WeightsError

__all__ = ["load_weights_file", "save_weights_file"]


def load_weights_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read a weights file into {path: array}. Raises `WeightsError` on a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
        raise WeightsError(f"Weights file {path} is corrupt or unreadable: {exc}") from None
    raise WeightsError(f"Weights file {path}: expected a .npz or .safetensors file")


def save_weights_file(path: str | Path, weights: dict[str, Any]) -> Path:
    """Write {path: array} atomically as .npz or .safetensors (by suffix)."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        if path.suffix == ".npz":
            np.savez(tmp, **arrays)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, tmp)
        else:
            raise WeightsError(f"Weights file {path}: expected a .npz or .safetensors suffix")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
