"""Weights files: `.npz` and `.safetensors`, keyed by Keras weight path (`query/kernel`, ...).

A weights file is untrusted input. `load_weights_file` opens it without reading any array: the
keys, shapes, dtypes and sizes come from the archive's central directory and each array's own
header (`.npy` header, safetensors JSON header), and must agree with each other and with the file
before anything is inflated. The arrays are read one by one when asked for, so `normalize_weights`
checks every key and shape against the spec first: a zip bomb, a member that claims to be huge or
a header that lies is refused without being read. Nothing is ever unpickled.

    weights = load_weights_file("finetuned.npz")     # a Mapping: weights["query/kernel"] reads one
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WeightsError

__all__ = ["WeightsFile", "load_weights_file", "save_weights_file"]

SUFFIXES = (".npz", ".safetensors")
# A MultiHeadAttention has at most 10 weights; a file with far more members is not one of ours,
# and each member costs a header read.
MAX_ENTRIES = 256
# The largest `.npy` header numpy itself reads without `max_header_size`; safetensors caps its
# JSON header at 100 MB.
MAX_NPY_HEADER = 10_000
MAX_SAFETENSORS_HEADER = 100_000_000

# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, on first use).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class Entry:
    """One array of a weights file, as its headers declare it: shape (D, N, H), dtype, bytes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


class WeightsFile(Mapping[str, np.ndarray]):
    """A checked weights file: `entries` holds each key's declared shape and dtype, and
    `weights[key]` reads that one array (and checks it is what was declared)."""

    def __init__(self, path: Path, entries: dict[str, Entry], read: Callable[[str, Entry], np.ndarray],
                 identity: tuple[int, ...]):
        self.path = path
        self.entries = entries
        self._read = read
        self._identity = identity            # the file as it was when its headers were read

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if _identity(self.path) != self._identity:
            raise WeightsError(f"Weights file {self.path} changed since it was opened; load it again")
        try:
            array = self._read(key, entry)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
            raise WeightsError(f"Weights file {self.path} is corrupt or unreadable: array `{key}`: "
                               f"{_reason(exc)}") from None
        if array.shape != entry.shape or array.dtype != entry.dtype:
            raise WeightsError(f"Weights file {self.path} is corrupt: array `{key}` read as {array.dtype} "
                               f"{array.shape}, its header declares {entry.dtype} {entry.shape}")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"WeightsFile({str(self.path)!r}, {len(self)} arrays)"


def load_weights_file(path: str | Path) -> WeightsFile:
    """Open a `.npz` or `.safetensors` weights file: {key: array}, each array read when asked for.

    Raises `WeightsError` (one line, naming the file and the key) on a missing, foreign, corrupt or
    lying file: not a regular file, more than `MAX_ENTRIES` arrays, a member that is not a `.npy`
    array, pickled objects, a header whose shape x itemsize is not the stored size, safetensors
    offsets outside the file or overlapping.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise WeightsError(f"Weights file not found: {path}") from None
    except OSError as exc:
        raise WeightsError(f"Weights file {path} cannot be read: {_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise WeightsError(f"Weights file {path} is a directory, expected a .npz or .safetensors file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"Weights file {path}: expected a .npz or .safetensors file")
    if not stat.S_ISREG(st.st_mode):   # a FIFO or a device would block the read or never end
        raise WeightsError(f"Weights file {path} is not a regular file, expected a .npz or .safetensors file")
    identity = _identity(path)
    try:
        if suffix == ".npz":
            return WeightsFile(path, _npz_entries(path), lambda key, entry: _npz_read(path, key), identity)
        entries, data_start = _safetensors_entries(path, st.st_size)
        return WeightsFile(path, {k: e for k, (e, _) in entries.items()},
                           lambda key, entry: _safetensors_read(path, data_start, entries[key]), identity)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
        raise WeightsError(f"Weights file {path} is corrupt or unreadable: {_reason(exc)}") from None


# ---- .npz ---------------------------------------------------------------------------------------
def _npz_entries(path: Path) -> dict[str, Entry]:
    """Keys, shapes and dtypes of a `.npz`, from its central directory and each member's `.npy`
    header (the first bytes of each member are inflated; nothing else)."""
    entries: dict[str, Entry] = {}
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_ENTRIES:
            raise WeightsError(f"Weights file {path} holds {len(infos)} members, expected at most "
                               f"{MAX_ENTRIES} arrays")
        for info in infos:
            name = info.filename
            if info.is_dir() or not name.endswith(".npy") or len(name) == 4:
                raise WeightsError(f"Weights file {path}: member `{name}` is not a .npy array")
            if info.flag_bits & 0x1:
                raise WeightsError(f"Weights file {path}: member `{name}` is encrypted")
            key = name[:-4]
            if key in entries:
                raise WeightsError(f"Weights file {path} holds two members named `{name}`")
            with archive.open(info) as member:
                shape, dtype = _npy_header(member, path, key)
                header_size = member.tell()
            nbytes = math.prod(shape) * dtype.itemsize
            if header_size + nbytes != info.file_size:
                raise WeightsError(f"Weights file {path}: array `{key}` declares {dtype} {shape} "
                                   f"({nbytes} bytes after a {header_size}-byte header), but the "
                                   f"archive's directory says the member holds {info.file_size} bytes")
            entries[key] = Entry(shape, dtype, nbytes)
    return entries


def _npy_header(member: Any, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the `.npy` header at the start of `member`, reading no further.

    The header's length is checked before the header is read: numpy reads the length it is given
    first and checks `max_header_size` after, which on a zip member would inflate that much."""
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise WeightsError(f"Weights file {path}: array `{key}` has .npy format version {version}, "
                           f"expected 1.0, 2.0 or 3.0")
    length_field = member.read(2 if version == (1, 0) else 4)
    length = int.from_bytes(length_field, "little")
    if length > MAX_NPY_HEADER:
        raise WeightsError(f"Weights file {path}: array `{key}` has a {length}-byte .npy header, "
                           f"expected at most {MAX_NPY_HEADER}")
    header = io.BytesIO(fmt.magic(*version) + length_field + member.read(length))
    fmt.read_magic(header)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(header, max_header_size=MAX_NPY_HEADER)
    _check_declared(path, f"array `{key}`", shape, dtype)
    return tuple(shape), dtype


def _check_declared(path: Path, what: str, shape: Any, dtype: np.dtype) -> None:
    """`what` (e.g. "array `query/kernel`") declares numbers, no Python objects, a sane shape."""
    if dtype.hasobject:
        raise WeightsError(f"Weights file {path}: {what} holds Python objects (dtype {dtype}), "
                           f"which would need unpickling; expected a numeric array")
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise WeightsError(f"Weights file {path}: {what} has dtype {dtype}, expected a numeric array")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise WeightsError(f"Weights file {path}: {what} declares shape {shape}, expected "
                           f"non-negative integer dimensions")


def _npz_read(path: Path, key: str) -> np.ndarray:
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        array = np.lib.format.read_array(member, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
        if member.read(1):               # also makes zipfile check the member's CRC-32
            raise WeightsError(f"Weights file {path} is corrupt: array `{key}` has bytes past its data")
    return array


# ---- .safetensors -------------------------------------------------------------------------------
def _safetensors_entries(path: Path, size: int) -> tuple[dict[str, tuple[Entry, tuple[int, int]]], int]:
    """Keys, shapes, dtypes and byte ranges from the JSON header, checked against the file size:
    every range inside the data, sized shape x itemsize, none overlapping."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"Weights file {path} is corrupt: {size} bytes, too short for a "
                               f"safetensors header")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise WeightsError(f"Weights file {path} is corrupt: its safetensors header claims "
                               f"{header_size} bytes, the file holds {size - 8} after the length")
        header = json.loads(f.read(header_size), object_pairs_hook=lambda pairs: _unique(path, pairs))
    if not isinstance(header, dict):
        raise WeightsError(f"Weights file {path} is corrupt: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_ENTRIES:
        raise WeightsError(f"Weights file {path} holds {len(header)} tensors, expected at most "
                           f"{MAX_ENTRIES} arrays")
    data_size = size - 8 - header_size
    entries: dict[str, tuple[Entry, tuple[int, int]]] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"Weights file {path}: tensor `{key}` is not described by exactly "
                               f"dtype, shape and data_offsets")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"Weights file {path}: tensor `{key}` has dtype {info['dtype']!r}, "
                               f"expected one of {sorted(_SAFETENSORS_DTYPES)}")
        dtype = _np_dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list):
            raise WeightsError(f"Weights file {path}: tensor `{key}` declares shape {shape!r}, "
                               f"expected a list of dimensions")
        _check_declared(path, f"tensor `{key}`", shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size and offsets[1] - offsets[0] == nbytes):
            raise WeightsError(f"Weights file {path}: tensor `{key}` declares {dtype} {tuple(shape)} "
                               f"({nbytes} bytes) at data_offsets {offsets!r}, expected a range of "
                               f"that many bytes within the {data_size} bytes of data")
        entries[key] = (Entry(tuple(shape), dtype, nbytes), (offsets[0], offsets[1]))
    spans = sorted((span, key) for key, (_, span) in entries.items() if span[1] > span[0])
    for (previous, first), (span, second) in zip(spans, spans[1:]):
        if span[0] < previous[1]:
            raise WeightsError(f"Weights file {path}: tensors `{first}` and `{second}` overlap "
                               f"(data_offsets {list(previous)} and {list(span)})")
    return entries, 8 + header_size


def _safetensors_read(path: Path, data_start: int, described: tuple[Entry, tuple[int, int]]) -> np.ndarray:
    entry, (begin, end) = described
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        data = f.read(end - begin)
    if len(data) != end - begin:
        raise WeightsError(f"Weights file {path} is corrupt: it ended inside a tensor")
    return np.frombuffer(data, dtype=entry.dtype.newbyteorder("<")).astype(entry.dtype).reshape(entry.shape)


# ---- helpers -------------------------------------------------------------------------------------
def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _unique(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (json would keep the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WeightsError(f"Weights file {path}: its safetensors header names `{key}` twice")
        out[key] = value
    return out


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What tells a replaced or rewritten file from the one that was opened."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _reason(exc: BaseException) -> str:
    """An exception as one short line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


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
