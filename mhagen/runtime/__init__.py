"""The runtime: compiled modules in the IREE runtime, called with NumPy arrays.

It needs only NumPy and iree-base-runtime: this package is copied whole into every bundle as
`mhagen_runtime/`, so a deployed bundle runs without JAX and without mhagen. One module a concern:

    errors      the exception classes (mhagen's root error lives here)
    transfer    host <-> device copies that work on every driver, lavapipe included
    devices     which drivers have a device, one shared device per driver, module loading
    layer       `CompiledLayer`: argument checks, shape buckets, running a module
    decoder     `KVCache` and the decoder steps: prefill, decode, a cache kept on the device
    bundle      manifest validation, path and SHA-256 checks, `load_bundle`
    cli         `run.py` / `mhagen run`
    timing      `time_layer`: p50/p90/p99 and mean of the module alone (`run.py --bench`, `mhagen bench DIR`)

    layer = load_bundle("out/encoder", target="cpu")
    out = layer(query, value)              # np.ndarray (B, T, E)
"""

from .bundle import MANIFEST_VERSION, check_files, check_machine, load_bundle, read_manifest, sha256_file
from .cli import run_main
from .decoder import Decoder, KVCache
from .devices import (PARAMETER_SCOPE, Device, driver_status, host_arch, host_cpu_features, load_module,
                      parameter_index, runtime_version)
from .errors import BundleError, CallError, MhagenError, MhagenRuntimeError
from .layer import CompiledLayer, expand_mask_shape, free_dims, np_dtype
from .timing import Timing, time_layer
from .transfer import to_device, to_host

__all__ = ["CompiledLayer", "KVCache", "Decoder", "driver_status", "load_module", "load_bundle", "Device", "to_device", "to_host",
           "MANIFEST_VERSION", "PARAMETER_SCOPE", "parameter_index", "read_manifest", "check_files",
           "check_machine", "sha256_file", "run_main", "host_arch", "host_cpu_features", "runtime_version",
           "np_dtype", "expand_mask_shape", "free_dims", "Timing", "time_layer", "MhagenError", "CallError", "MhagenRuntimeError", "BundleError"]
