"""`mhagen run` writes bfloat16 outputs as float32 (issue 14, point 10): NumPy has no bfloat16,
and a bfloat16 .npy reads back as `|V2` bytes without ml_dtypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mhagen.runtime.cli import _write_outputs


def test_bfloat16_output_is_written_as_exact_float32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([[1.0, -2.5, 3.140625, 1e-30, np.inf, 65280.0]], dtype=ml_dtypes.bfloat16)
    scores = np.ones((2, 2), np.float32)
    _write_outputs([tmp_path / "output.npy", tmp_path / "scores.npy"], [values, scores])
    got = np.load(tmp_path / "output.npy", allow_pickle=False)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32))  # exact: every bfloat16 fits float32
    assert np.load(tmp_path / "scores.npy").dtype == np.float32
    err = capsys.readouterr().err
    assert err == "output.npy: bfloat16 output written as float32 (exact)\n"
