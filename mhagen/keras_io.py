"""Keras interop: the weights (and config) of a Keras 3 `MultiHeadAttention`, from a live layer or
its saved files, and the `mhagen import-keras` command that turns them into a spec plus weights.

    weights = mhagen.weights_from_keras("model.keras", layer="mha")    # get_weights() order
    spec = mhagen.Spec.from_keras_config(layer.get_config(), query_shape=(2, 8, 16),
                                         value_shape=(2, 4, 16))
    compiled = mhagen.build(spec, target="cpu", weights=weights)

Sources: a built layer (or a model holding one); a `.keras` archive, loaded through Keras itself
(with a fallback to reading the archive's `config.json` and `model.weights.h5` when Keras cannot
rebuild the model, e.g. for unregistered custom layers); a Keras 3 `.weights.h5` file and a legacy
tf.keras 2.x HDF5 file (names like `mha/query/kernel:0`), both read with h5py: the first carries no
architecture for Keras to rebuild, and Keras 3 does not read the second.

Keras and h5py are the optional extra `pip install mhagen[keras]`; nothing here imports them until
it is called.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MhagenError, SpecError, WeightsError, invalid

__all__ = ["KerasLayer", "read_keras", "weights_from_keras", "add_cli"]

# The projections in `layer.get_weights()` order (the gate only with use_gate=True).
_DENSES = ("query", "key", "gate", "value", "attention_output")
_REQUIRED = ("query/kernel", "key/kernel", "value/kernel", "attention_output/kernel")
_INSTALL_HINT = "pip install mhagen[keras]"


@dataclass(frozen=True)
class KerasLayer:
    """One MultiHeadAttention found in a Keras source.

    `config` is its `get_config()` dict, or None when the source holds weights only;
    `weights` maps `query/kernel`, `query/bias`, ... to arrays, in `get_weights()` order.
    """

    name: str
    source: str
    config: dict[str, Any] | None
    weights: dict[str, np.ndarray]


def weights_from_keras(obj: Any, *, layer: str | None = None) -> list[np.ndarray]:
    """Weights of a Keras MultiHeadAttention in `layer.get_weights()` order (what `build` takes).

    `obj`: a built `keras.layers.MultiHeadAttention`, a Keras model or layer holding one, or the
    path of a `.keras`, `.weights.h5` or legacy tf.keras `.h5` file. `layer` names the attention
    layer when there are several (the error lists them when it is missing).

        weights = weights_from_keras("model.keras", layer="mha")
        # [query/kernel (Dq, N, H), query/bias (N, H), key/kernel, key/bias, value/kernel, ...]
    """
    return list(read_keras(obj, layer=layer).weights.values())


def read_keras(obj: Any, *, layer: str | None = None) -> KerasLayer:
    """Find one MultiHeadAttention in `obj` (see `weights_from_keras`): name, config, weights."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise WeightsError(f"Keras file not found: {path}")
        if path.name.endswith(".keras"):
            return _from_keras_archive(path, layer)
        if path.suffix in (".h5", ".hdf5"):
            return _pick(_h5_layers(path), layer, str(path))
        raise WeightsError(f"Received an invalid value for argument `obj`, expected a .keras, "
                           f".weights.h5 or tf.keras .h5 file. Received: obj={str(path)!r}")
    return _from_live(obj, layer)


# ---- live Keras objects ---------------------------------------------------------------------------
def _keras() -> Any:
    """Import Keras, choosing the JAX backend (which mhagen depends on) unless one is chosen."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as exc:
        raise MhagenError(f"Reading Keras layers needs Keras 3 ({_INSTALL_HINT}); importing it "
                          f"failed: {exc}") from None
    return keras


def _from_live(obj: Any, name: str | None) -> KerasLayer:
    keras = _keras()
    if not isinstance(obj, keras.layers.Layer):
        raise WeightsError(f"Received an invalid value for argument `obj`, expected a Keras layer or "
                           f"model, or the path of a Keras file. Received: obj of type "
                           f"{type(obj).__name__}")
    found = [_live_layer(mha, f"<{type(obj).__name__} {obj.name}>") for mha in _mha_layers(keras, obj)]
    return _pick(found, name, f"{type(obj).__name__} `{obj.name}`")


def _mha_layers(keras: Any, root: Any) -> list[Any]:
    layers = root._flatten_layers(include_self=True, recursive=True)
    return [x for x in layers if isinstance(x, keras.layers.MultiHeadAttention)]


def _live_layer(mha: Any, source: str) -> KerasLayer:
    if not mha.built:
        raise WeightsError(f"MultiHeadAttention `{mha.name}` is not built, so it has no weights yet: "
                           "call it once on inputs (or call `build`) first")
    arrays = {_weight_key(v.path): np.asarray(a) for v, a in zip(mha.weights, mha.get_weights())}
    return KerasLayer(mha.name, source, mha.get_config(), _ordered(arrays, mha.name))


def _weight_key(path: str) -> str:
    """`mha/query/kernel` (Keras 3) and `model/mha/query/kernel:0` (tf.keras) -> `query/kernel`."""
    return "/".join(path.split(":")[0].split("/")[-2:])


def _ordered(arrays: Mapping[str, np.ndarray], layer: str) -> dict[str, np.ndarray]:
    """Check the weight set of one layer and put it in `get_weights()` order."""
    order = [f"{d}/{p}" for d in _DENSES for p in ("kernel", "bias")]
    missing = [n for n in _REQUIRED if n not in arrays]
    extra = sorted(set(arrays) - set(order))
    if missing or extra:
        raise WeightsError(f"MultiHeadAttention `{layer}` has weights {sorted(arrays)}: missing "
                           f"{missing}, unexpected {extra} (LoRA or quantized layers must be merged "
                           "or dequantized first)")
    kernels = [n for n in order if n in arrays and n.endswith("/kernel")]
    biases = [n for n in order if n in arrays and n.endswith("/bias")]
    if biases and len(biases) != len(kernels):
        raise WeightsError(f"MultiHeadAttention `{layer}` has biases {biases} for kernels {kernels}: "
                           "expected a bias for every projection or none (use_bias)")
    return {n: _float_array(arrays[n]) for n in order if n in arrays}


def _float_array(array: Any) -> np.ndarray:
    array = np.asarray(array)
    # bfloat16 weights (a bfloat16 policy) widen losslessly: npz cannot hold bfloat16.
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def _pick(found: Sequence[KerasLayer], name: str | None, source: str) -> KerasLayer:
    if not found:
        raise WeightsError(f"No MultiHeadAttention found in {source}")
    names = [f.name for f in found]
    if name is None:
        if len(found) > 1:
            raise WeightsError(f"{source} holds {len(found)} MultiHeadAttention layers {names}: "
                               "name one with `layer=` (--layer)")
        return found[0]
    matches = [f for f in found if f.name == name]
    if not matches:
        raise invalid("layer", f"the name of a MultiHeadAttention in {source}: one of {names}", name,
                      cls=WeightsError)
    return matches[0]


# ---- .keras archives ------------------------------------------------------------------------------
def _from_keras_archive(path: Path, name: str | None) -> KerasLayer:
    keras = _keras()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - e.g. an unregistered custom layer: read the files
        return _from_archive_files(path, name, reason=f"{type(exc).__name__}: {exc}")
    found = [_live_layer(mha, str(path)) for mha in _mha_layers(keras, model)]
    return _pick(found, name, str(path))


def _from_archive_files(path: Path, name: str | None, *, reason: str) -> KerasLayer:
    """Read `config.json` and `model.weights.h5` of a `.keras` zip without rebuilding the model."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise WeightsError(f"Keras could not load {path} ({reason}), and it is not a readable "
                           f".keras archive: {exc}") from None
    import io

    configs = {c["name"]: c for c in _mha_configs(config) if isinstance(c.get("name"), str)}
    layers = _h5_layers(io.BytesIO(weights), source=str(path))
    found = [KerasLayer(x.name, x.source, configs.get(x.name), x.weights) for x in layers]
    return _pick(found, name, str(path))


def _mha_configs(node: Any) -> Iterator[dict[str, Any]]:
    """Every MultiHeadAttention `config` dict in a serialized Keras model, however deeply nested."""
    if isinstance(node, Mapping):
        if node.get("class_name") == "MultiHeadAttention" and isinstance(node.get("config"), Mapping):
            yield dict(node["config"])
        for value in node.values():
            yield from _mha_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mha_configs(value)


# ---- HDF5 files: Keras 3 .weights.h5 and legacy tf.keras 2.x -------------------------------------
_LEGACY_NAME = re.compile(r"^(?P<prefix>.+)/(?P<dense>" + "|".join(_DENSES) + r")/(?P<part>kernel|bias):\d+$")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise MhagenError(f"Reading HDF5 weights needs h5py ({_INSTALL_HINT}): {exc}") from None
    return h5py


def _h5_layers(file: Any, *, source: str | None = None) -> list[KerasLayer]:
    """Every MultiHeadAttention in an HDF5 weights file, in either layout."""
    h5py = _h5py()
    source = source or str(file)
    try:
        with h5py.File(file, "r") as f:
            return _keras3_layers(h5py, f, source) + _legacy_layers(h5py, f, source)
    except OSError as exc:
        raise WeightsError(f"{source} is not a readable HDF5 weights file: {exc}") from None


def _keras3_layers(h5py: Any, f: Any, source: str) -> list[KerasLayer]:
    """Keras 3 layout: `layers/<object>/{query_dense,key_dense,...}/vars/{0,1}`; the layer's own
    `vars` group carries its name (Keras >= 3.10), else the object path names it."""
    required = {"query", "key", "value", "attention_output"}
    groups: list[Any] = []
    f.visititems(lambda _, obj: groups.append(obj) if isinstance(obj, h5py.Group)
                 and required <= {_dense_name(c) for c in obj} else None)
    out = []
    for group in groups:
        arrays: dict[str, np.ndarray] = {}
        for child in group:
            dense = _dense_name(child)
            if dense is None or "vars" not in group[child]:
                continue
            variables = group[child]["vars"]
            for index, part in (("0", "kernel"), ("1", "bias")):
                if index in variables:
                    arrays[f"{dense}/{part}"] = _h5_array(variables[index])
        own = group["vars"].attrs.get("name") if "vars" in group else None
        if isinstance(own, bytes):
            own = own.decode()
        name = str(own) if own else group.name.rsplit("/", 1)[-1]
        out.append(KerasLayer(name, source, None, _ordered(arrays, name)))
    return out


def _dense_name(child: str) -> str | None:
    """`query_dense` / `_query_dense` -> `query`; `output_dense` -> `attention_output`."""
    base = child.lstrip("_")
    if not base.endswith("_dense"):
        return None
    base = base[: -len("_dense")]
    base = "attention_output" if base == "output" else base
    return base if base in _DENSES else None


def _legacy_layers(h5py: Any, f: Any, source: str) -> list[KerasLayer]:
    """tf.keras 2.x layout: datasets named `.../<layer>/query/kernel:0` (under `model_weights/`
    for a whole-model file); the component before `query` names the layer."""
    by_prefix: dict[str, dict[str, np.ndarray]] = {}

    def visit(path: str, obj: Any) -> None:
        match = _LEGACY_NAME.match(path)
        if match and isinstance(obj, h5py.Dataset):
            key = f"{match['dense']}/{match['part']}"
            by_prefix.setdefault(match["prefix"], {})[key] = _h5_array(obj)

    f.visititems(visit)
    out = []
    for prefix, arrays in by_prefix.items():
        name = prefix.rsplit("/", 1)[-1]
        out.append(KerasLayer(name, source, None, _ordered(arrays, name)))
    return out


def _h5_array(dataset: Any) -> np.ndarray:
    if dataset.attrs.get("dtype") == "bfloat16":  # how Keras 3 marks bfloat16 variables
        import ml_dtypes

        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    return np.asarray(dataset[()])


# ---- the import-keras command ---------------------------------------------------------------------
def _shape_arg(flag: str, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(d) for d in value.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise invalid(flag, "comma-separated positive integers such as 2,8,16", value)
    return dims


def _mask_arg(value: str | None) -> bool | tuple[int, ...]:
    if value is None:
        return False
    if value.lower() == "true":
        return True
    return _shape_arg("--attention-mask", value) or False


def _config_arg(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"Keras config file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"Keras config file {path} is not readable JSON: {exc}") from None
    if isinstance(config, Mapping) and isinstance(config.get("config"), Mapping) and "class_name" in config:
        config = config["config"]  # a serialized layer ({"class_name": ..., "config": {...}})
    if not isinstance(config, Mapping):
        raise invalid("--config", "a JSON object: the layer's get_config()", type(config).__name__)
    return dict(config)


def _cmd_import_keras(args: argparse.Namespace) -> int:
    from .spec import Spec
    from .weights import normalize_weights
    from .weights_io import save_weights_file

    out = Path(args.out)
    if out.suffix != ".toml":
        raise invalid("--out", "a spec file name ending in .toml", args.out)
    weights_path = out.with_suffix(f".{args.format}")
    other = out.with_suffix(".safetensors" if args.format == "npz" else ".npz")
    if args.format == "safetensors" and other.exists():
        # `mhagen build` looks for SPEC.npz before SPEC.safetensors: a stale .npz would win.
        raise WeightsError(f"{other} exists and `mhagen build {out}` would load it before "
                           f"{weights_path.name}: remove it, or write --format npz")
    found = read_keras(args.file, layer=args.layer)
    config = _config_arg(args.config) or found.config
    if config is None:
        raise SpecError(f"{args.file} holds weights only, no layer config: pass --config CONFIG.json "
                        f"(the layer's get_config() as JSON), or import the .keras file")
    spec = Spec.from_keras_config(
        config,
        query_shape=_shape_arg("--query-shape", args.query_shape) or (),
        value_shape=_shape_arg("--value-shape", args.value_shape) or (),
        key_shape=_shape_arg("--key-shape", args.key_shape),
        dtype=args.dtype,
        attention_mask=_mask_arg(args.attention_mask),
        use_causal_mask=args.causal,
        return_attention_scores=args.scores,
    )
    normalize_weights(spec, found.weights)  # the shapes must fit the spec before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(spec.to_toml(), encoding="utf-8")
    save_weights_file(weights_path, found.weights)
    print(f"layer `{found.name}` from {found.source}: {len(found.weights)} weights, "
          f"dtype {spec.call.dtype}")
    print(f"wrote {out}")
    print(f"wrote {weights_path}")
    ignored = spec.ignored_keys
    if ignored:
        print(f"kept in the spec, not used for inference: {', '.join(sorted(ignored))}")
    print(f"next: mhagen verify {out} --target cpu", file=sys.stderr)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `mhagen import-keras`."""
    p = subparsers.add_parser(
        "import-keras", help="write a spec and its weights file from a Keras MultiHeadAttention",
        description="Read a MultiHeadAttention from a .keras, .weights.h5 or tf.keras .h5 file and "
        "write SPEC.toml plus SPEC.npz (or .safetensors), which `mhagen build/verify SPEC` pick up.")
    p.add_argument("file", help=".keras model, or a .weights.h5 / tf.keras .h5 weights file")
    p.add_argument("--layer", help="name of the MultiHeadAttention layer (needed when there are several)")
    p.add_argument("--query-shape", required=True, help="full query shape, e.g. 2,8,16")
    p.add_argument("--value-shape", required=True, help="full value shape, e.g. 2,4,16")
    p.add_argument("--key-shape", help="full key shape when the key differs from the value")
    p.add_argument("--attention-mask", nargs="?", const="true", metavar="SHAPE",
                   help="declare a mask input: (B, T, S) alone, or an explicit shape such as 2,2,8,4")
    p.add_argument("--causal", action="store_true", help="use_causal_mask=True")
    p.add_argument("--scores", action="store_true", help="return_attention_scores=True")
    p.add_argument("--dtype", help="call dtype (default: the layer's dtype policy)")
    p.add_argument("--config", help="the layer's get_config() as JSON (for weights-only files)")
    p.add_argument("--format", choices=["npz", "safetensors"], default="npz",
                   help="weights file format (default npz)")
    p.add_argument("--out", required=True, help="spec file to write (SPEC.toml); weights go beside it")
    p.set_defaults(func=_cmd_import_keras)
