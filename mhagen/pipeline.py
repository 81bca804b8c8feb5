"""The driver: spec -> weights -> trace -> compile -> load, one named stage after another.

    layer = build("examples/encoder.toml", target="cpu")
    out = layer(query, value)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .budget import check as check_budget
from .compile import check_dtype, compile_program
from .runtime import CompiledLayer, parameter_index
from .spec import Spec
from .targets import Target, get_target
from .trace import WeightsMode, trace
from .weights import normalize_weights, weight_names

__all__ = ["build", "as_spec"]


def as_spec(spec: Spec | str | Path) -> Spec:
    return spec if isinstance(spec, Spec) else Spec.load(spec)


def build(
    spec: Spec | str | Path,
    target: str | Target = "cpu",
    weights: Any = None,
    *,
    weights_mode: str | WeightsMode = "inline",
) -> CompiledLayer:
    """Compile `spec` for `target` and load it: returns a callable `CompiledLayer`.

    `weights`: a list in `layer.get_weights()` order, a dict keyed by weight path, or None for
    `init_weights(spec)`. `weights_mode="inline"` bakes them into the module as constants;
    `"parameters"` keeps them out of the module, in a parameter index the runtime reads.

        layer = build(spec, target="cpu", weights=init_weights(spec))
        out = layer(query, value)            # (B, T, E)
    """
    spec = as_spec(spec)
    tgt = get_target(target)
    check_dtype(tgt, spec.call.dtype_policy.compute)
    check_budget(spec, weights_mode=weights_mode, verify=False)
    ws = normalize_weights(spec, weights)
    program = trace(spec, ws, weights_mode=weights_mode)
    compiled = compile_program(program.text, tgt)
    parameters = None
    if program.weights_mode is WeightsMode.PARAMETERS:
        parameters = parameter_index(dict(zip(weight_names(spec), ws)))
    return CompiledLayer(program.interface, compiled.vmfb, tgt, stablehlo=program.text,
                         parameters=parameters, spec=spec, compile_seconds=compiled.seconds)
