"""Stage 7, the bundle: one directory per build that deploys without JAX.

    DIR/program.mlir           the traced StableHLO program
    DIR/TARGET/module.vmfb     one compiled module per target
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .compile import check_dtype, compile_program
from .errors import BundleError, MhagenError
from .spec import Spec
from .targets import Target
from .trace import trace
from .weights import normalize_weights

__all__ = ["build_bundle"]


def build_bundle(spec: Spec, targets: list[Target], out: str | Path, *, weights: Any = None,
                 weights_mode: str = "inline", verify: bool = True, progress: bool = False) -> Path:
    """Trace once, compile per target, and write the bundle directory atomically."""
    out = Path(out)
    ws = normalize_weights(spec, weights)
    program = trace(spec, ws, weights_mode="inline")
    for target in targets:
        check_dtype(target, spec.call.dtype_policy.compute)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging."))
    try:
        (staging / "program.mlir").write_text(program.text)
        for target in targets:
            if progress:
                print(f"[{target.name}] compiling...", flush=True)
            compiled = compile_program(program.text, target)
            (staging / target.name).mkdir()
            (staging / target.name / "module.vmfb").write_bytes(compiled.vmfb)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_dir(staging: Path, out: Path) -> None:
    """Swap the finished staging directory into place; the old bundle is removed only after."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"Output path {out} exists and is not a directory")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
