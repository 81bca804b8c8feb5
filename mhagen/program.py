"""Assembling the compiled program: JAX's exported functions + generated MLIR glue (jinja2).

JAX exports one module per shape bucket, with the weights as trailing arguments. This stage renames
each module's functions apart, and generates public entry points that load the weights from
`util.global`s and call them. The globals are either `#flow.parameter.named<"model"::"query/kernel">`
(weights read from a parameter archive at run time, so new weights need no recompile) or dense
constants (`inline`), shared by every bucket.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
import numpy as np

from .targets import data_dir

__all__ = ["strip_locations", "mlir_type", "Entry", "assemble", "render", "PARAMETER_SCOPE"]

PARAMETER_SCOPE = "model"
_MLIR_ELEMENT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int32": "i32",
                 "uint32": "ui32", "bool": "i1", "int8": "i8"}


def mlir_type(shape: Sequence[int], dtype: str) -> str:
    dims = "".join(f"{d}x" for d in shape)
    return f"tensor<{dims}{_MLIR_ELEMENT[dtype]}>"


def strip_locations(text: str) -> str:
    """Re-print an MLIR module without debug locations: smaller, and stable across source edits
    (the compile cache keys on this text)."""
    try:
        from jax._src.interpreters import mlir as jax_mlir
        from jax._src.lib.mlir import ir
    except ImportError:  # a JAX without these internals: keep the locations
        return text
    with jax_mlir.make_ir_context():
        module = ir.Module.parse(text)
        return module.operation.get_asm(enable_debug_info=False)


@dataclass(frozen=True)
class Entry:
    """One public entry point: its name, the JAX module text, and its argument/result types."""

    name: str
    module_text: str
    arg_types: tuple[str, ...]       # runtime inputs only
    result_types: tuple[str, ...]
    # (argument, result): the argument's buffer is the result's storage (IREE's `iree.abi.output`),
    # so the caller's device buffer is updated in place (a decoder's KV cache).
    output_args: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Global:
    symbol: str
    name: str
    type: str
    initializer: str


def _body(text: str, prefix: str) -> tuple[str, str]:
    """The functions inside a JAX module, every symbol prefixed; returns (body, impl name of main)."""
    start = text.index("\n", text.index("module @")) + 1  # the module line ends with its "{"
    end = text.rindex("}")
    body = text[start:end]
    names = re.findall(r"func\.func (?:public |private )?@([\w$.]+)\(", body)
    for name in sorted(set(names), key=len, reverse=True):
        body = re.sub(rf"@{re.escape(name)}(?=[(\s:,)])", f"@{prefix}{name}", body)
    body = body.replace(f"func.func public @{prefix}main(", f"func.func private @{prefix}main(")
    body = re.sub(r"\{jax\.result_info = \"[^\"]*\"\}", "", body)
    return body.rstrip(), f"{prefix}main"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(name: str, **context: object) -> str:
    """Render one of `templates/` (MLIR glue, a bundle's run.py and README)."""
    return _environment().get_template(name).render(**context)


def _dense(array: np.ndarray) -> str:
    return f'dense<"0x{np.ascontiguousarray(array).tobytes().hex().upper()}">'


def assemble(entries: Sequence[Entry], weights: Sequence[tuple[str, np.ndarray]], *,
             parameters: bool, description: str = "") -> str:
    """One MLIR module holding every entry point; weights as parameter or dense globals."""
    globals_ = []
    for i, (name, array) in enumerate(weights):
        dtype = "bfloat16" if array.dtype.name == "bfloat16" else str(array.dtype)
        type_ = mlir_type(array.shape, dtype)
        init = f'#flow.parameter.named<"{PARAMETER_SCOPE}"::"{name}">' if parameters else _dense(array)
        globals_.append(Global(f"w{i}", name, type_, init))
    functions = []
    for n, entry in enumerate(entries):
        body, impl = _body(entry.module_text, f"f{n}_")
        outputs = dict(entry.output_args)
        args = [{"ssa": f"a{i}", "type": t,
                 "attrs": f" {{iree.abi.output = {outputs[i]} : index}}" if i in outputs else ""}
                for i, t in enumerate(entry.arg_types)]
        functions.append({
            "name": entry.name, "body": body, "impl": impl, "args": args,
            "results": list(entry.result_types),
            "impl_arg_types": list(entry.arg_types) + [g.type for g in globals_],
        })
    return render(
        "module.mlir.j2", description=description, functions=functions, globals=globals_,
        weights_mode="parameters" if parameters else "inline")
