"""The driver: spec -> weights -> trace -> compile -> load, one named stage after another.

    layer = build("examples/encoder.toml", target="cpu")
    out = layer(query, value)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .budget import check as check_budget
from .compile import check_supported, compile_program
from .errors import TargetError
from .runtime import CompiledLayer, parameter_index
from .spec import Spec
from .targets import Target, availability, get_target
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
    verify: bool = True,
) -> CompiledLayer:
    """Compile `spec` for `target`, load it, and check it against the NumPy oracle: returns a
    callable `CompiledLayer`.

    `weights`: a list in `layer.get_weights()` order, a dict keyed by weight path, or None for
    `init_weights(spec)`. `weights_mode="inline"` bakes them into the module as constants;
    `"parameters"` keeps them out of the module, in a parameter index the runtime reads.
    `verify=True` runs the loaded layer at every size `mhagen verify` checks (seeded inputs) and
    raises `VerifyError` naming the first disagreement, so no caller gets a wrong layer without
    asking; `verify=False` skips it (`layer.verified` then says False).

        layer = build(spec, target="cpu", weights=init_weights(spec))
        out = layer(query, value)            # (B, T, E)
    """
    spec = as_spec(spec)
    tgt = get_target(target)
    check_supported(tgt, spec)
    avail = availability(tgt)
    if not avail.runs:     # e.g. a GPU profile whose subgroup size this device does not have
        raise TargetError(f"Target `{tgt.name}` cannot run on this machine: {avail.run_reason}; "
                          "`mhagen build --out DIR` compiles it into a bundle for a machine that can")
    check_budget(spec, weights_mode=weights_mode, verify=verify)
    ws = normalize_weights(spec, weights)
    program = trace(spec, ws, weights_mode=weights_mode)
    compiled = compile_program(program.text, tgt)
    parameters = None
    if program.weights_mode is WeightsMode.PARAMETERS:
        parameters = parameter_index(dict(zip(weight_names(spec), ws)))
    layer = CompiledLayer(program.interface, compiled.vmfb, tgt, stablehlo=program.text,
                          parameters=parameters, spec=spec, compile_seconds=compiled.seconds)
    if verify:
        _verify(layer, spec, ws)
    return layer


def _verify(layer: CompiledLayer, spec: Spec, weights: list[Any]) -> None:
    """Check a freshly built layer against the oracle; `VerifyError` on the first disagreement."""
    from .errors import VerifyError
    from .verify import check_layer, shape_checks

    checks, _ = shape_checks(spec)
    failed = [c for c in check_layer(layer, checks, weights) if not c.passed]
    if failed:
        raise VerifyError(f"the `{layer.target_name}` build disagrees with the NumPy oracle: "
                          f"{failed[0].message} (build with verify=False to get it anyway)")
    layer.verified = True
