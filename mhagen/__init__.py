"""mhagen: Keras MultiHeadAttention compiled ahead of time with IREE, for every hardware target,
and checked against an independent NumPy oracle.

    import mhagen
    spec = mhagen.Spec.load("examples/encoder.toml")
    weights = mhagen.init_weights(spec)
    layer = mhagen.build(spec, target="cpu", weights=weights)
    out = layer(query, value)
    ref = mhagen.reference(spec, weights, query, value)
"""

__version__ = "0.1.0"

from .errors import (BundleError, CallError, CompileError, MhagenError, MhagenRuntimeError, SpecError,
                     TargetError, VerifyError, WeightsError)
from .keras_io import weights_from_keras
from .oracle import reference
from .pipeline import build
from .runtime import CompiledLayer
from .runtime import load_bundle as load
from .spec import CallSpec, LayerSpec, Spec
from .weights import init_weights

__all__ = [
    "Spec", "LayerSpec", "CallSpec", "init_weights", "build", "load", "reference", "CompiledLayer",
    "MhagenError", "SpecError", "WeightsError", "TargetError", "CompileError", "CallError",
    "MhagenRuntimeError", "BundleError", "VerifyError", "weights_from_keras",
]
