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
import dataclasses
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MhagenError, SpecError, WeightsError, invalid

__all__ = ["KerasLayer", "CallSite", "read_keras", "weights_from_keras", "keras_reference", "add_cli"]

# The projections in `layer.get_weights()` order (the gate only with use_gate=True).
_DENSES = ("query", "key", "gate", "value", "attention_output")
_REQUIRED = ("query/kernel", "key/kernel", "value/kernel", "attention_output/kernel")
_INSTALL_HINT = "pip install mhagen[keras]"


@dataclass(frozen=True)
class KerasLayer:
    """One MultiHeadAttention found in a Keras source.

    `path` addresses it from the model's root through nested layers and models
    (`enc2/self_attention_layer`); `name` is its last component. `config` is its `get_config()`
    dict, or None when the source holds weights only; `weights` maps `query/kernel`,
    `query/bias`, ... to arrays, in `get_weights()` order. `keras2` is True when the source was
    written by tf.keras 2.x (`tf_keras`), whose masking differs (see KERAS_MHA.md).
    """

    name: str
    source: str
    config: dict[str, Any] | None
    weights: dict[str, np.ndarray]
    path: str = ""
    keras2: bool = False
    calls: tuple[CallSite, ...] = ()


@dataclass(frozen=True)
class CallSite:
    """How a functional model calls the layer (one per call, in Keras' node order): what a spec
    must declare to compute what the model computes. `other_masks` lists query/value/key masks,
    which mhagen's spec cannot express."""

    use_causal_mask: bool = False
    return_attention_scores: bool = False
    attention_mask: bool = False
    key: bool = False
    training: bool | None = None
    other_masks: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"use_causal_mask={self.use_causal_mask}",
                 f"return_attention_scores={self.return_attention_scores}",
                 f"attention_mask={'input' if self.attention_mask else None}",
                 f"key={'input' if self.key else None}", f"training={self.training}"]
        return ", ".join(parts + [f"{m}=input" for m in self.other_masks])


@dataclass(frozen=True)
class _Candidate:
    """A MultiHeadAttention found by its address; `load` reads it (and raises its own problems)
    only when it is the one asked for, so a broken neighbour cannot make the file unreadable."""

    path: str
    load: Callable[[], KerasLayer]
    aliases: tuple[str, ...] = ()
    positional: bool = False  # a file group path (`layers/multi_head_attention_1`), not layer names
    obj: Any = None  # the live layer, for candidates found in a live model


def weights_from_keras(obj: Any, *, layer: str | None = None) -> list[np.ndarray]:
    """Weights of a Keras MultiHeadAttention in `layer.get_weights()` order (what `build` takes).

    `obj`: a built `keras.layers.MultiHeadAttention` (Keras 3 or tf_keras), a model or layer
    holding one, the path of a `.keras`, `.weights.h5` or tf.keras `.h5` file, or a TF SavedModel
    directory. `layer` is the attention layer's path through nested layers and models
    (`enc2/self_attention_layer`), or any unambiguous tail of it (`self_attention_layer` when
    only one layer has that name); the error lists every candidate path otherwise.

        weights = weights_from_keras("model.keras", layer="enc2/self_attention_layer")
        # [query/kernel (Dq, N, H), query/bias (N, H), key/kernel, key/bias, value/kernel, ...]
    """
    return list(read_keras(obj, layer=layer).weights.values())


def read_keras(obj: Any, *, layer: str | None = None) -> KerasLayer:
    """Find one MultiHeadAttention in `obj` (see `weights_from_keras`): path, config, weights."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.is_dir():
            return _isolated(path, layer) if _tf_would_load() else _from_saved_model(path, layer)
        if not path.is_file():
            raise WeightsError(f"Keras file not found: {path}")
        if path.name.endswith(".keras"):
            return _isolated(path, layer) if _tf_would_load() else _from_keras_archive(path, layer)
        if path.suffix in (".h5", ".hdf5"):
            return _pick(_h5_candidates(path), layer, str(path), _h5_model_config(path))
        raise WeightsError(f"Received an invalid value for argument `obj`, expected a .keras, "
                           f".weights.h5 or tf.keras .h5 file, or a SavedModel directory. "
                           f"Received: obj={str(path)!r}")
    return _from_live(obj, layer)


# ---- TensorFlow kept out of this process -----------------------------------------------------------
# Keras' load_model (and tf_keras, keras_hub) import TensorFlow when it is installed, and once
# TensorFlow is in a process, IREE's Vulkan driver on Mesa lavapipe segfaults in its first
# dispatch (`iree/runtime/function.py` `_invoke`; `import tensorflow` alone is enough): lavapipe's
# libLLVM-15 binds `llvm::raw_svector_ostream::write_impl` and friends to the LLVM copy that
# libtensorflow_framework.so.2 exports, and crashes in `initAsmInfo` (gdb backtrace). Files that
# need Keras or tf_keras to read are therefore read in a child process, unless TensorFlow is
# already imported here (then the caller has chosen it) or MHAGEN_KERAS_IN_PROCESS=1.
_IN_PROCESS_ENV = "MHAGEN_KERAS_IN_PROCESS"


def _tf_would_load() -> bool:
    import importlib.util

    if os.environ.get(_IN_PROCESS_ENV) == "1" or "tensorflow" in sys.modules:
        return False
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def _isolated(path: Path, layer: str | None) -> KerasLayer:
    """`read_keras(path, layer=layer)` in a child process, so TensorFlow never loads here."""
    return _in_child("read_keras", path.resolve(), layer=layer)


def _in_child(function: str, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` of this module run in a child process (TensorFlow may load
    there); its MhagenError is raised here, any other failure comes back as one line."""
    import pickle
    import subprocess
    import tempfile

    env = {**os.environ, _IN_PROCESS_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = "import sys; from mhagen.keras_io import _child; _child(*sys.argv[1:])"
    with tempfile.TemporaryDirectory(prefix="mhagen-keras-") as tmp:
        request, answer = Path(tmp) / "request.pickle", Path(tmp) / "answer.pickle"
        request.write_bytes(pickle.dumps((function, args, kwargs)))
        done = subprocess.run([sys.executable, "-c", code, str(request), str(answer)],
                              capture_output=True, env=env, check=False)
        data = answer.read_bytes() if answer.is_file() else b""
    try:
        status, payload = pickle.loads(data)  # our own child's answer, not the file's bytes
    except Exception:  # noqa: BLE001 - the child died before answering
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise WeightsError(f"Reading {args[0] if args else function} in a child process failed (exit "
                           f"{done.returncode}): {lines[-1] if lines else 'no message'}") from None
    if status == "error":
        raise payload
    return payload


def _child(request: str, answer: str) -> None:
    import pickle

    try:
        function, args, kwargs = pickle.loads(Path(request).read_bytes())  # written by _in_child
        result: tuple[str, Any] = ("ok", globals()[function](*args, **kwargs))
    except MhagenError as exc:
        result = ("error", exc)
    except Exception as exc:  # noqa: BLE001 - reported to the parent in one line
        result = ("error", WeightsError(f"{type(exc).__name__}: {exc}"))
    Path(answer).write_bytes(pickle.dumps(result))


def _pick(found: Sequence[_Candidate], name: str | None, source: str, model_config: Any = None) -> KerasLayer:
    """The one candidate `name` addresses: its full path, or a tail of it that no other path has.
    Never a guess: an ambiguous or unknown name lists every candidate path. The call sites come
    from `model_config`'s functional graph where it has one."""
    layer = _address(found, name, source)
    calls = _call_sites(model_config, layer.path) if model_config is not None else ()
    if layer.keras2 and layer.config is not None:
        layer = dataclasses.replace(layer, config=_keras2_config(layer.config, layer.path))
    return dataclasses.replace(layer, calls=calls) if calls else layer


def _keras2_config(config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A tf.keras 2.x config as a spec must read it: its masked softmax (`masking = "keras2"`).
    Its negative attention_axes count on the projected tensor, not the input as Keras 3's do:
    refused rather than silently moved by one axis."""
    axes = config.get("attention_axes")
    axes = [axes] if isinstance(axes, int) else list(axes or [])
    if any(isinstance(a, int) and a < 0 for a in axes):
        raise WeightsError(f"tf.keras 2.x layer `{path}` has negative attention_axes {axes}, which count on "
                           "the projected tensor there (not the input as in Keras 3): pass --config with "
                           "positive axes")
    return {**config, "masking": "keras2"}


def _address(found: Sequence[_Candidate], name: str | None, source: str) -> KerasLayer:
    return _select(found, name, source).load()


def _select(found: Sequence[_Candidate], name: str | None, source: str) -> _Candidate:
    if not found:
        raise WeightsError(f"No MultiHeadAttention found in {source}")
    paths = [f.path for f in found]
    if name is None:
        if len(found) > 1:
            raise WeightsError(f"{source} holds {len(found)} MultiHeadAttention layers {paths}: "
                               "name one by its path with `layer=` (--layer)")
        return found[0]
    name = name.strip("/")
    exact = [f for f in found if name == f.path or name in f.aliases]
    # A positional group path is matched whole only: its tail `multi_head_attention` names a
    # position in model.layers, which is not the layer of that name.
    tails = [f for f in found if not f.positional
             and any(p.endswith("/" + name) for p in (f.path, *f.aliases))]
    matches = exact or tails
    if len(matches) > 1:
        raise WeightsError(f"`{name}` names {len(matches)} MultiHeadAttention layers in {source}: "
                           f"{[f.path for f in matches]}; pass the full path (--layer "
                           f"{matches[0].path})")
    if not matches:
        note = ""
        if any(f.positional for f in found):
            note = (" (this file names its weight groups by class and position in model.layers, not "
                    "by layer name: import the .keras or .h5 model file, or pass a group path)")
        raise invalid("layer", f"the path of a MultiHeadAttention in {source}: one of {paths}{note}",
                      name, cls=WeightsError)
    return matches[0]


def _is_mha(layer: Any) -> bool:
    """Keras 3, tf_keras and keras_hub's CachedMultiHeadAttention alike."""
    return any(c.__name__ == "MultiHeadAttention" for c in type(layer).__mro__)


def _is_keras2(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in ("tf_keras", "tensorflow")


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
    if not _is_keras2(obj):
        keras = _keras()
        ok = isinstance(obj, keras.layers.Layer)
    else:
        ok = hasattr(obj, "_flatten_layers")
    if not ok:
        raise WeightsError(f"Received an invalid value for argument `obj`, expected a Keras layer or "
                           f"model, or the path of a Keras file. Received: obj of type "
                           f"{type(obj).__name__}")
    return _pick(_live_candidates(obj, f"<{type(obj).__name__} {obj.name}>"), name,
                 f"{type(obj).__name__} `{obj.name}`", _live_config(obj))


def _live_config(model: Any) -> Any:
    """A functional model's serialized form (`{"class_name", "config"}`), else None."""
    if not hasattr(model, "get_config") or _is_mha(model):
        return None
    try:
        return {"class_name": type(model).__name__, "config": model.get_config()}
    except Exception:  # noqa: BLE001 - subclassed models need not implement get_config
        return None


def _live_candidates(root: Any, source: str) -> list[_Candidate]:
    """Every MultiHeadAttention under `root`, addressed by the names from the root down (the
    root's own name left out, unless it is the attention layer itself). A layer reached by
    several paths (shared) is one candidate with aliases."""
    found: dict[int, _Candidate] = {}

    def visit(layer: Any, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            path = f"{prefix}{child.name}"
            if _is_mha(child):
                if id(child) in found:
                    old = found[id(child)]
                    found[id(child)] = _Candidate(old.path, old.load, (*old.aliases, path), obj=child)
                else:
                    found[id(child)] = _Candidate(path, lambda c=child, p=path: _live_layer(c, source, p),
                                                  obj=child)
            else:
                visit(child, f"{path}/")

    if _is_mha(root):
        return [_Candidate(root.name, lambda: _live_layer(root, source, root.name), obj=root)]
    visit(root, "")
    return list(found.values())


def _live_layer(mha: Any, source: str, path: str) -> KerasLayer:
    if not mha.built:
        raise WeightsError(f"MultiHeadAttention `{path}` is not built, so it has no weights yet: "
                           "call it once on inputs (or call `build`) first")
    arrays = {_weight_key(getattr(v, "path", None) or v.name): np.asarray(a)
              for v, a in zip(mha.weights, mha.get_weights())}
    return KerasLayer(mha.name, source, _clean_config(mha.get_config()), _ordered(arrays, path),
                      path, _is_keras2(mha))


def _clean_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """TOML has no null: tf_keras configs hold `query_shape = [None, 6, 16]`. None inside lists
    is dropped (the call shapes come from the spec, never from these build-time keys)."""
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if hasattr(value, "as_list") and not isinstance(value, (str, bytes)):
            value = value.as_list() if getattr(value, "rank", 0) is not None else []  # TensorShape
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value if v is not None]
        return value

    return None if config is None else clean(dict(config))


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


def _check_config(layer: KerasLayer) -> KerasLayer:
    """A config paired with weights read from a file must fit them: the pairing is refused, not
    trusted, when the file's structure and the config disagree."""
    config, w = layer.config, layer.weights
    if config is None:
        return layer
    n, h = config.get("num_heads"), config.get("key_dim")
    hv = config.get("value_dim") or h
    got = {"query/kernel": w["query/kernel"].shape[1:], "value/kernel": w["value/kernel"].shape[1:]}
    want = {"query/kernel": (n, h), "value/kernel": (n, hv)}
    bias = bool(config.get("use_bias", True))
    gate = bool(config.get("use_gate", False))
    if got != want or bias != ("query/bias" in w) or gate != ("gate/kernel" in w):
        raise WeightsError(
            f"The config and the weights found for `{layer.path}` in {layer.source} disagree "
            f"(config: num_heads={n}, key_dim={h}, value_dim={hv}, use_bias={bias}, use_gate={gate}; "
            f"weights: {', '.join(f'{k} {tuple(a.shape)}' for k, a in w.items())}): they cannot be "
            "matched with certainty")
    return layer


# ---- SavedModel directories (tf.keras 2.x) --------------------------------------------------------
def _from_saved_model(path: Path, name: str | None) -> KerasLayer:
    if not (path / "saved_model.pb").is_file():
        raise WeightsError(f"{path} is a directory but not a TF SavedModel (no saved_model.pb); "
                           "expected a .keras, .weights.h5 or .h5 file, or a SavedModel directory")
    try:
        import tf_keras
    except ImportError as exc:
        raise WeightsError(f"{path} is a TF SavedModel directory: reading it needs TensorFlow and "
                           f"tf_keras (pip install tensorflow tf-keras), or re-save the model as .keras "
                           f"or .h5 ({exc})") from None
    try:
        model = tf_keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001 - TF's loaders raise many types
        raise WeightsError(f"tf_keras could not load the SavedModel {path}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return _pick(_live_candidates(model, str(path)), name, str(path), _live_config(model))


# ---- .keras archives ------------------------------------------------------------------------------
def _from_keras_archive(path: Path, name: str | None) -> KerasLayer:
    """Keras 3 archives are loaded through Keras (keras_hub imported first when the model uses
    it); tf_keras archives, and those Keras cannot rebuild, are read file by file."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in archive.namelist() else {}
            weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise WeightsError(f"{path} is not a readable .keras archive: {exc}") from None
    version = str(metadata.get("keras_version", "3"))
    if version.startswith("2."):  # tf_keras: Keras 3 would misread or refuse it
        return _from_archive_files(path, name, config, weights, keras2=True)
    keras = _keras()
    if "keras_hub" in json.dumps(config):
        try:
            import keras_hub  # noqa: F401 - registers its layers for deserialization
        except ImportError:
            pass
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception:  # noqa: BLE001 - e.g. an unregistered custom layer: read the files
        return _from_archive_files(path, name, config, weights, keras2=False)
    return _pick(_live_candidates(model, str(path)), name, str(path), config)


def _from_archive_files(path: Path, name: str | None, config: Any, weights: bytes, *,
                        keras2: bool) -> KerasLayer:
    """Read `config.json` and `model.weights.h5` of a `.keras` zip without rebuilding the model."""
    import io

    found = _h5_candidates(io.BytesIO(weights), source=str(path), model_config=config, keras2=keras2)
    return _pick(found, name, str(path), config)


def _config_layers(config: Any) -> list[dict[str, Any]]:
    """The serialized layers of a model config, in `model.layers` order (a Sequential's config
    lists an InputLayer that `model.layers` does not hold)."""
    if not isinstance(config, Mapping):
        return []
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, Mapping) else None
    if not isinstance(layers, list):
        return []
    layers = [x for x in layers if isinstance(x, Mapping)]
    if config.get("class_name") == "Sequential":
        layers = [x for x in layers if x.get("class_name") != "InputLayer"]
    return layers


def _layer_name(serialized: Mapping[str, Any]) -> str:
    inner = serialized.get("config")
    name = inner.get("name") if isinstance(inner, Mapping) else None
    return str(name if name is not None else serialized.get("name", "?"))


def _mha_configs(config: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every MultiHeadAttention config in a serialized model, by its path from the root."""
    out: dict[str, dict[str, Any]] = {}
    for layer in _config_layers(config):
        path = f"{prefix}{_layer_name(layer)}"
        if "MultiHeadAttention" in str(layer.get("class_name")) and isinstance(layer.get("config"), Mapping):
            out[path] = dict(layer["config"])
        else:
            out.update(_mha_configs(layer, f"{path}/"))
    return out


def _snake(name: str) -> str:
    """Keras' `to_snake_case` (how saving_lib names a layer's group after its class)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
    return name if not name.startswith("_") else "private" + name


def _positional_names(config: Any) -> dict[str, str]:
    """saving_lib's group names for `model.layers` (class name in snake case, `_1`, `_2`, ... for
    repeats) mapped to the layers' own names: how a `.weights.h5` without stored names (tf_keras)
    is matched to the model."""
    used: dict[str, int] = {}
    out: dict[str, str] = {}
    for layer in _config_layers(config):
        base = _snake(str(layer.get("class_name", "")).split(">")[-1])
        if base in used:
            used[base] += 1
            group = f"{base}_{used[base]}"
        else:
            used[base] = 0
            group = base
        out[group] = _layer_name(layer)
    return out


# ---- call sites in the functional graph ---------------------------------------------------------
_MASKS = ("query_mask", "value_mask", "key_mask")


def _layer_node(config: Any, path: str) -> Mapping[str, Any] | None:
    """The serialized layer at `path` in a model config (through nested functional models)."""
    node = config
    for part in path.split("/"):
        node = next((x for x in _config_layers(node) if _layer_name(x) == part), None)
        if node is None:
            return None
    return node


def _call_sites(config: Any, path: str) -> tuple[CallSite, ...]:
    """Each call of the layer as the graph records it: Keras 3 nodes `{"args": [...], "kwargs":
    {...}}` (query, value, key positional), tf_keras nodes `[[inbound, node, tensor, kwargs]]`."""
    node = _layer_node(config, path)
    inbound = node.get("inbound_nodes") if isinstance(node, Mapping) else None
    if not isinstance(inbound, list):
        return ()
    out = []
    for call in inbound:
        if isinstance(call, Mapping):  # Keras 3
            args = list(call.get("args") or [])
            kwargs = dict(call.get("kwargs") or {})
            names = ("query", "value", "key", "query_mask", "value_mask", "key_mask", "attention_mask")
            kwargs.update({n: a for n, a in zip(names, args) if n not in ("query", "value")})
        elif isinstance(call, list) and call and isinstance(call[0], list):  # tf_keras
            kwargs = dict(call[0][3]) if len(call[0]) > 3 and isinstance(call[0][3], Mapping) else {}
            for n, entry in zip(("value", "key"), call[1:]):
                kwargs[n] = entry
        else:
            continue
        training = kwargs.get("training")
        out.append(CallSite(
            use_causal_mask=bool(kwargs.get("use_causal_mask")),
            return_attention_scores=bool(kwargs.get("return_attention_scores")),
            attention_mask=kwargs.get("attention_mask") is not None,
            key=kwargs.get("key") is not None,
            training=None if training is None else bool(training),
            other_masks=tuple(m for m in _MASKS if kwargs.get(m) is not None),
        ))
    return tuple(out)


# ---- HDF5 files: Keras 3 / tf_keras .weights.h5 and legacy tf.keras 2.x .h5 ----------------------
def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise MhagenError(f"Reading HDF5 weights needs h5py ({_INSTALL_HINT}): {exc}") from None
    return h5py


def _h5_candidates(file: Any, *, source: str | None = None, model_config: Any = None,
                   keras2: bool | None = None) -> list[_Candidate]:
    """Every MultiHeadAttention in an HDF5 weights file, in either layout. The arrays are read
    while the file is open; pairing and checks happen when a candidate is picked."""
    h5py = _h5py()
    source = source or str(file)
    try:
        with h5py.File(file, "r") as f:
            if "layers" in f or "vars" in f:  # saving_lib layout (Keras 3, tf_keras >= 2.13)
                return _saving_lib_candidates(h5py, f, source, model_config, keras2)
            return _legacy_candidates(h5py, f, source)
    except OSError as exc:
        raise WeightsError(f"{source} is not a readable HDF5 weights file: {exc}") from None


def _h5_model_config(file: Any) -> Any:
    """The `model_config` a whole-model tf.keras `.h5` carries, else None."""
    try:
        with _h5py().File(file, "r") as f:
            text = _h5_str(f.attrs.get("model_config"))
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _h5_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value else None


def _saving_lib_candidates(h5py: Any, f: Any, source: str, model_config: Any,
                           keras2: bool | None) -> list[_Candidate]:
    """`layers/<group>/{query_dense,key_dense,...}/vars/{0,1}`. Each group's `vars` carries the
    layer's name (Keras >= 3.10) and then the path is made of those names. Without them
    (tf_keras), groups are named by class and position in `model.layers`: mapped to layer names
    through the model config when there is one, else addressed by the group path itself
    (`layers/multi_head_attention_1`), which is never mistaken for a layer name."""
    required = {"query", "key", "value", "attention_output"}
    groups: list[Any] = []
    f.visititems(lambda _, obj: groups.append(obj) if isinstance(obj, h5py.Group)
                 and required <= {_dense_name(c) for c in obj} else None)
    configs = _mha_configs(model_config) if model_config is not None else {}
    positions = _positional_names(model_config) if model_config is not None else {}
    named = [g for g in groups if "vars" in g and _h5_str(g["vars"].attrs.get("name"))]
    if keras2 is None:
        keras2 = not named and groups != []  # only tf_keras writes no names
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
        parts = group.name.strip("/").split("/")
        names: list[str | None] = []  # the layers' own names; `layers` groups are model.layers lists
        node = f
        for part in parts:
            node = node[part]
            if part != "layers":
                names.append(_h5_str(node["vars"].attrs.get("name")) if "vars" in node else None)
        positional = False
        if parts and parts[0] == "layers" and names and all(n is not None for n in names):
            path = "/".join(n for n in names if n)
        elif parts and parts[0] == "layers" and len(parts) == 2 and parts[1] in positions:
            path = positions[parts[1]]
        else:
            path, positional = "/".join(parts), True  # the file's own group path: no name to trust
        config = configs.get(path)
        out.append(_Candidate(path, lambda a=arrays, p=path, c=config: _check_config(KerasLayer(
            p.rsplit("/", 1)[-1], source, _clean_config(c), _ordered(a, p), p, bool(keras2))),
            positional=positional))
    return out


def _dense_name(child: str) -> str | None:
    """`query_dense` / `_query_dense` -> `query`; `output_dense` -> `attention_output`."""
    base = child.lstrip("_")
    if not base.endswith("_dense"):
        return None
    base = base[: -len("_dense")]
    base = "attention_output" if base == "output" else base
    return base if base in _DENSES else None


_LEGACY_NAME = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<dense>" + "|".join(_DENSES)
                          + r")/(?P<part>kernel|bias)(?::\d+)?$")


def _legacy_candidates(h5py: Any, f: Any, source: str) -> list[_Candidate]:
    """tf.keras 2.x HDF5 (`save_weights("w.h5")` or a whole-model `.h5`, weights under
    `model_weights/`): one group per entry of `layer_names`, each listing its datasets in
    `weight_names` (`mha/query/kernel:0`). A layer holds an attention layer where its weight
    names end in `<prefix>/query/kernel` etc. for all four projections; a Dense layer that is
    merely named `query` elsewhere is not one."""
    root = f["model_weights"] if "model_weights" in f else f
    config_json = _h5_str(f.attrs.get("model_config"))
    configs = _mha_configs(json.loads(config_json)) if config_json else {}
    layer_names = [_h5_str(n) for n in root.attrs.get("layer_names", [])]
    out = []
    for layer in layer_names:
        if not layer or layer not in root:
            continue
        group = root[layer]
        by_prefix: dict[str, dict[str, Any]] = {}
        for weight in (_h5_str(n) for n in group.attrs.get("weight_names", [])):
            match = _LEGACY_NAME.match(weight or "")
            if match and weight in group and isinstance(group[weight], h5py.Dataset):
                arrays = by_prefix.setdefault(match["prefix"] or "", {})
                key = f"{match['dense']}/{match['part']}"
                arrays[key] = None if key in arrays else _h5_array(group[weight])  # None: twice
        for prefix, arrays in by_prefix.items():
            if not {f"{d}/kernel" for d in _DENSES if d != "gate"} <= set(arrays):
                continue
            inner = prefix.split("/")[-1] if prefix else ""
            path = layer if inner in ("", layer) else f"{layer}/{inner}"
            out.append(_Candidate(path, lambda a=arrays, p=path: _legacy_layer(a, p, source, configs.get(p))))
    return out


def _legacy_layer(arrays: Mapping[str, Any], path: str, source: str,
                  config: dict[str, Any] | None) -> KerasLayer:
    twice = sorted(k for k, v in arrays.items() if v is None)
    if twice:
        raise WeightsError(f"{source} holds {twice} more than once for `{path}`: the weights cannot "
                           "be matched to one layer with certainty")
    return _check_config(KerasLayer(path.rsplit("/", 1)[-1], source, _clean_config(config),
                                    _ordered(arrays, path), path, True))


def _h5_array(dataset: Any) -> np.ndarray:
    if dataset.attrs.get("dtype") == "bfloat16":  # how Keras 3 marks bfloat16 variables
        import ml_dtypes

        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    return np.asarray(dataset[()])


# ---- the source model's own output ----------------------------------------------------------------
def keras_reference(obj: Any, *, layer: str, spec: Any, call: int | None = None, seed: int = 0) -> Any:
    """What the MultiHeadAttention at path `layer` in `obj` itself computes on
    `random_inputs(spec, seed)` (query (B, T, E), value (B, S, E), key, attention_mask (B, T, S)),
    called as the model calls it: the arguments Keras recorded for call `call` of the layer in the
    functional graph (use_causal_mask, return_attention_scores, training, which inputs it passes),
    else those the spec declares (a layer called inside another layer's `call` has no record).
    The model is loaded by the library that wrote it (tf_keras for tf.keras 2.x files), in a
    child process when that would import TensorFlow here. Returns a `verify.SourceReference`;
    weights-only files hold no model to run and are refused.

        ref = keras_reference("model.keras", layer="enc2/self_attention_layer", spec=spec)
        ref.outputs[0]      # (B, T, E), what Keras computed
    """
    from .verify import SourceReference, random_inputs

    if isinstance(obj, (str, os.PathLike)) and _tf_would_load():
        return _in_child("keras_reference", Path(obj).resolve(), layer=layer, spec=spec, call=call, seed=seed)
    source = str(obj) if isinstance(obj, (str, os.PathLike)) else f"{type(obj).__name__} `{obj.name}`"
    model = _load_model(Path(obj)) if isinstance(obj, (str, os.PathLike)) else obj
    found = _select(_live_candidates(model, source), layer, source)
    inputs = {k: v for k, v in random_inputs(spec, seed).items() if k != "dropout_key"}
    arguments = _call_arguments(found.obj, found.path, spec, call, inputs)
    try:
        result = found.obj(**arguments)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types; one line back
        text = str(exc).strip().splitlines()
        raise WeightsError(f"calling `{found.path}` of {source} failed: {type(exc).__name__}: "
                           f"{text[0] if text else ''}") from None
    outputs = [np.asarray(x, dtype=np.float32) for x in (result if isinstance(result, (tuple, list)) else [result])]
    return SourceReference(inputs, outputs, f"{Path(source).name if isinstance(obj, (str, os.PathLike)) else source}"
                                            f" `{found.path}`")


def _load_model(path: Path) -> Any:
    """The model in a Keras file, loaded by the library that wrote it."""
    version, has_model = "3", True
    if path.is_dir():
        version = "2."  # SavedModel: tf.keras 2.x (Keras 3 does not load it)
    elif path.name.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
                uses_hub = "keras_hub" in archive.read("config.json").decode(errors="replace")
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise WeightsError(f"{path} is not a readable .keras archive: {exc}") from None
        version = str(metadata.get("keras_version", "3"))
        if uses_hub:
            try:
                import keras_hub  # noqa: F401 - registers its layers for deserialization
            except ImportError:
                pass
    elif path.suffix in (".h5", ".hdf5"):
        try:
            with _h5py().File(path, "r") as f:
                has_model = bool(_h5_str(f.attrs.get("model_config")))
                version = _h5_str(f.attrs.get("keras_version")) or "2."
        except OSError as exc:
            raise WeightsError(f"{path} is not a readable HDF5 file: {exc}") from None
    if not has_model:
        raise WeightsError(f"{path} holds weights only: there is no model to run for a reference output")
    try:
        if version.startswith("2."):
            try:
                import tf_keras
            except ImportError as exc:
                raise WeightsError(f"{path} was written by tf.keras {version}: running it needs TensorFlow "
                                   f"and tf_keras (pip install tensorflow tf-keras) ({exc})") from None
            return tf_keras.models.load_model(str(path), compile=False)
        return _keras().saving.load_model(path, compile=False)
    except MhagenError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras' loaders raise many types
        text = str(exc).strip().splitlines()
        raise WeightsError(f"Keras could not load {path} to run it: {type(exc).__name__}: "
                           f"{text[0] if text else ''}") from None


def _call_arguments(layer: Any, path: str, spec: Any, call: int | None,
                    inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Keyword arguments for `layer(...)`: Keras' own record of call `call` with each symbolic
    input replaced by the array of that name, else the call the spec declares."""
    import inspect

    nodes = [n for n in getattr(layer, "_inbound_nodes", []) if _node_arguments(n) is not None]
    if not nodes:
        # keras_hub's CachedMultiHeadAttention takes neither flag: passed only where set.
        accepted = inspect.signature(layer.call).parameters
        flags = {"use_causal_mask": spec.call.use_causal_mask,
                 "return_attention_scores": spec.call.return_attention_scores}
        for flag, value in flags.items():
            if value and flag not in accepted:
                raise WeightsError(f"`{path}` ({type(layer).__name__}) takes no `{flag}`, which the spec sets")
        flags["training"] = False
        return {**inputs, **{k: v for k, v in flags.items() if k in accepted}}
    if not 0 <= (call or 0) < len(nodes):
        raise invalid("call", f"a call index of `{path}`: 0 to {len(nodes) - 1}", call, cls=WeightsError)
    args, kwargs = _node_arguments(nodes[call or 0])
    bound = inspect.signature(layer.call).bind_partial(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name, value in bound.items():
        if type(value).__name__ != "KerasTensor":
            out[name] = value
        elif name in inputs:
            out[name] = inputs[name]
        else:
            raise WeightsError(f"call {call or 0} of `{path}` passes `{name}`, which the spec has no input "
                               f"for: a reference needs a spec that declares it")
    out.setdefault("training", False)
    return out


def _node_arguments(node: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A call node's (args, kwargs): Keras 3 keeps them in `node.arguments`, tf_keras in
    `node.call_args` / `node.call_kwargs`; None for an input node."""
    if getattr(node, "is_input", False):
        return None
    if hasattr(node, "arguments") and hasattr(node.arguments, "args"):
        return tuple(node.arguments.args), dict(node.arguments.kwargs)
    if hasattr(node, "call_args"):
        return tuple(node.call_args), dict(node.call_kwargs or {})
    return None


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


def _call_from_graph(found: KerasLayer, args: argparse.Namespace) -> CallSite | None:
    """The call site the spec must follow (None where the source records none), with every flag
    that contradicts it refused: the model, not the flags, says how the layer is called."""
    calls = found.calls
    if args.call is not None and not 0 <= args.call < len(calls):
        raise invalid("--call", f"a call index of `{found.path}`: 0 to {len(calls) - 1}" if calls
                      else f"nothing: {found.source} records no call of `{found.path}`", args.call)
    if not calls:
        return None
    if args.call is None and len(set(calls)) > 1:
        listed = "; ".join(f"[{i}] {c.describe()}" for i, c in enumerate(calls))
        raise WeightsError(f"`{found.path}` is called {len(calls)} times with different arguments "
                           f"({listed}): choose one with --call N")
    call = calls[args.call or 0]
    where = f"call {args.call or 0} of `{found.path}`"
    if call.other_masks:
        raise WeightsError(f"{where} passes {', '.join(call.other_masks)}, which a spec cannot declare: "
                           "pass the combined mask as attention_mask instead")
    for flag, given, recorded in (("--causal", args.causal, call.use_causal_mask),
                                  ("--scores", args.scores, call.return_attention_scores),
                                  ("--attention-mask", args.attention_mask is not None, call.attention_mask)):
        if given and not recorded:
            raise WeightsError(f"{flag} contradicts {where}, which is made without it "
                               f"({call.describe()})")
    if call.key and args.key_shape is None:
        raise WeightsError(f"{where} passes a separate key: give its shape with --key-shape")
    if args.key_shape is not None and not call.key:
        raise WeightsError(f"--key-shape contradicts {where}, which passes no separate key")
    return call


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
    config = _clean_config(_config_arg(args.config)) or found.config
    if config is not None and found.keras2:
        config = _keras2_config(config, found.path)
    if config is None:
        raise SpecError(f"{args.file} holds weights only, no config for `{found.path}`: pass --config "
                        f"CONFIG.json (the layer's get_config() as JSON), or import the .keras file")
    key_shape = _shape_arg("--key-shape", args.key_shape)
    call = _call_from_graph(found, args)
    if call is not None:
        print(f"call {args.call or 0} of `{found.path}` in the model: {call.describe()}")
    query_shape = _shape_arg("--query-shape", args.query_shape) or ()
    value_shape = _shape_arg("--value-shape", args.value_shape) or ()
    decoder_self = (args.cache_max_length is not None and tuple(query_shape[:2]) == tuple(value_shape[:2]))
    if decoder_self:
        print(f"decoder build (cache_max_length = {args.cache_max_length}): self-attention, causal as "
              "keras_hub's generation masks it")
    spec = Spec.from_keras_config(
        config,
        query_shape=query_shape,
        value_shape=value_shape,
        key_shape=key_shape,
        dtype=args.dtype,
        attention_mask=_mask_arg(args.attention_mask) or (
            call is not None and call.attention_mask and args.cache_max_length is None),
        use_causal_mask=args.causal or decoder_self or (call is not None and call.use_causal_mask),
        return_attention_scores=args.scores or (call is not None and call.return_attention_scores),
        training=bool(call is not None and call.training),
        cache_max_length=args.cache_max_length,
    )
    normalize_weights(spec, found.weights)  # the shapes must fit the spec before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(spec.to_toml(), encoding="utf-8")
    save_weights_file(weights_path, found.weights)
    print(f"layer `{found.path}` from {found.source}: {len(found.weights)} weights, "
          f"dtype {spec.call.dtype}")
    print(f"wrote {out}")
    print(f"wrote {weights_path}")
    if decoder_self and not (call is not None and call.use_causal_mask):
        # The model calls the layer without the causal mask a decoder step applies: its output is
        # not what this spec computes, so it is no reference for it.
        out.with_suffix(".keras-ref.npz").unlink(missing_ok=True)
        print(f"no Keras reference output written: the model calls `{found.path}` without a causal mask, "
              "which a decoder build (cache_max_length) applies")
    else:
        _write_reference(args, found, spec, out.with_suffix(".keras-ref.npz"))
    if spec.layer.masking == "keras2":
        print('masking = "keras2": tf.keras 2.x gives a query row with every key masked the mean of the values')
    ignored = spec.ignored_keys
    if ignored:
        print(f"kept in the spec, not used for inference: {', '.join(sorted(ignored))}")
    print(f"next: mhagen verify {out} --target cpu", file=sys.stderr)
    return 0


def _write_reference(args: argparse.Namespace, found: KerasLayer, spec: Any, path: Path) -> None:
    """SPEC.keras-ref.npz: the source model's own output on verify's inputs, which `mhagen verify`
    compares every target with besides the oracle. A stale one is removed first, so verify never
    compares with another import's model."""
    path.unlink(missing_ok=True)
    why = ""
    if spec.has_dropout:
        why = "the spec draws dropout (training with a rate > 0), which no two runs share"
    elif found.config is None:
        why = f"{found.source} holds weights only, no model to run"
    if not why:
        try:
            reference = keras_reference(args.file, layer=found.path, spec=spec, call=args.call)
        except MhagenError as exc:
            why = str(exc)
        else:
            reference.save(path)
            print(f"wrote {path} ({reference.source}'s own output, which `mhagen verify` also compares with)")
            return
    print(f"no Keras reference output written: {why}")


def add_cli(subparsers: Any) -> None:
    """Register `mhagen import-keras`."""
    p = subparsers.add_parser(
        "import-keras", help="write a spec and its weights file from a Keras MultiHeadAttention",
        description="Read a MultiHeadAttention from a .keras, .weights.h5 or tf.keras .h5 file and "
        "write SPEC.toml plus SPEC.npz (or .safetensors), which `mhagen build/verify SPEC` pick up.")
    p.add_argument("file", help=".keras model, a .weights.h5 / tf.keras .h5 file, or a SavedModel directory")
    p.add_argument("--layer", metavar="PATH",
                   help="path of the MultiHeadAttention through nested layers and models, e.g. "
                   "enc2/self_attention_layer, or an unambiguous tail of it (needed when there are several)")
    p.add_argument("--query-shape", required=True, help="full query shape, e.g. 2,8,16")
    p.add_argument("--value-shape", required=True, help="full value shape, e.g. 2,4,16")
    p.add_argument("--key-shape", help="full key shape when the key differs from the value")
    p.add_argument("--attention-mask", nargs="?", const="true", metavar="SHAPE",
                   help="declare a mask input: (B, T, S) alone, or an explicit shape such as 2,2,8,4")
    p.add_argument("--call", type=int, metavar="N",
                   help="which call of the layer the spec follows, 0-based in Keras' node order "
                   "(needed when a functional model calls it several times with different arguments)")
    p.add_argument("--causal", action="store_true", help="use_causal_mask=True")
    p.add_argument("--cache-max-length", type=int, metavar="S", default=None,
                   help="a decoder build with a (B, 2, S, N, H) KV cache (keras_hub's CachedMultiHeadAttention): "
                   "self-attention (value shaped like query, causal) or cross-attention over a static cache "
                   "(value (B, S, D))")
    p.add_argument("--scores", action="store_true", help="return_attention_scores=True")
    p.add_argument("--dtype", help="call dtype (default: the layer's dtype policy)")
    p.add_argument("--config", help="the layer's get_config() as JSON (for weights-only files)")
    p.add_argument("--format", choices=["npz", "safetensors"], default="npz",
                   help="weights file format (default npz)")
    p.add_argument("--out", required=True, help="spec file to write (SPEC.toml); weights go beside it")
    p.set_defaults(func=_cmd_import_keras)
