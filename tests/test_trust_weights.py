"""Trust corpus, the weights family: invalid weights files, each refused cleanly.

Every case writes one bad `.npz` / `.safetensors` (or something that is not a weights file at
all) and runs `mhagen build SPEC --weights FILE --out DIR`: exit 2, one line naming the file or the
key, no traceback, nothing written, and `WeightsError` from the API. Archives that would inflate
to far more than the spec's weights (zip bombs, huge members) are refused from the archive's
directory and the `.npy` headers, with no more than their headers read.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mhagen
from corpus import refuses
from mhagen.weights import normalize_weights, weight_names
from mhagen.weights_io import MAX_ENTRIES, load_weights_file

LAYER = "[layer]\nnum_heads = 2\nkey_dim = 4\n\n[call]\nquery = [2, 5, 8]\nvalue = [2, 7, 8]\n"
SPECS = {"float32": LAYER, "float16": LAYER + 'dtype = "float16"\n'}
QK = "query/kernel"          # (8, 2, 4)


def _good(dtype: str = "float32") -> dict[str, np.ndarray]:
    spec = mhagen.Spec.from_toml(SPECS[dtype])
    return dict(zip(weight_names(spec), mhagen.init_weights(spec)))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _npy_lying(descr: str, shape: tuple[int, ...], data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy member whose header says `descr` `shape` whatever `data` really holds."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue() + data


def _zip(path: Path, members: list[tuple[str, bytes]], *, compress: int = zipfile.ZIP_STORED) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # duplicate names are on purpose
        with zipfile.ZipFile(path, "w", compression=compress) as archive:
            for name, data in members:
                archive.writestr(name, data)


def _npz(path: Path, arrays: dict[str, np.ndarray], *, extra: list[tuple[str, bytes]] = (),
         compress: int = zipfile.ZIP_STORED) -> None:
    _zip(path, [(f"{k}.npy", _npy(v)) for k, v in arrays.items()] + list(extra), compress=compress)


def _replace(arrays: dict[str, np.ndarray], key: str, value: Any) -> dict[str, np.ndarray]:
    return {**arrays, key: value}


def _without(arrays: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != key}


def _poke(value: float) -> np.ndarray:
    out = _good()[QK].copy()
    out[1, 0, 2] = value
    return out


def _poke64(value: float) -> np.ndarray:
    out = _good()[QK].astype(np.float64)
    out[1, 0, 2] = value
    return out


def _set_directory_size(path: Path, member: str, size: int) -> None:
    """Make the archive's central directory (and local header) claim `size` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, size_at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        at = data.find(signature)
        while at >= 0:
            if data[at + name_at: at + name_at + len(name)] == name:
                struct.pack_into("<I", data, at + size_at, size)
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))


def _safetensors(path: Path, header: Any, data: bytes, *, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _st_good() -> tuple[dict[str, Any], bytes]:
    """A valid safetensors header and data for the good float32 weights."""
    header, data = {}, b""
    for key, value in _good().items():
        raw = np.ascontiguousarray(value, "<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def _st_with(path: Path, change: Callable[[dict[str, Any]], None], data_change: Callable[[bytes], bytes] = lambda d: d) -> None:
    header, data = _st_good()
    change(header)
    _safetensors(path, header, data_change(data))


def _save_st(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path))


def _bomb(path: Path, shape: tuple[int, int], *, key: str = QK, **kw: Any) -> None:
    """A deflated member of zeros: `shape` float32 (64 MiB at (4096, 4096)) in about 64 KiB."""
    good = _good()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for k, v in good.items():
            if k != key:
                archive.writestr(f"{k}.npy", _npy(v))
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
            member.write(_npy_lying("<f4", shape, b""))
            zeros = bytes(1 << 20)
            for _ in range(shape[0] * shape[1] * 4 >> 20):
                member.write(zeros)


def _claimed_bomb(path: Path, shape: tuple[int, ...], *, lie_directory_by: int = 0) -> None:
    """A member whose header declares `shape` float32 with 64 bytes behind it; the directory is made
    to agree with the header (a consistent bomb) or to differ from it by `lie_directory_by`."""
    header = _npy_lying("<f4", shape, b"")
    _npz(path, _without(_good(), QK), extra=[(f"{QK}.npy", header + bytes(64))])
    size = len(header) + int(np.prod(shape)) * 4 + lie_directory_by
    _set_directory_size(path, f"{QK}.npy", size)


# name -> (writer(path), needle in the one line, spec dtype, suffix)
Writer = Callable[[Path], None]
CASES: dict[str, tuple[Writer, str | tuple[str, ...], str, str]] = {
    # ---- values -----------------------------------------------------------------------------------
    "nan": (lambda p: _npz(p, _replace(_good(), QK, _poke(np.nan))), ("`query/kernel` holds nan at [1, 0, 2]",), "float32", ".npz"),
    "inf": (lambda p: _npz(p, _replace(_good(), "value/bias", np.full((2, 4), np.inf, np.float32))),
            "`value/bias` holds inf at [0, 0] (8 non-finite", "float32", ".npz"),
    "minus_inf": (lambda p: _npz(p, _replace(_good(), QK, _poke(-np.inf))), "`query/kernel` holds -inf", "float32", ".npz"),
    "nan_in_float16_file": (lambda p: _npz(p, _replace(_good(), QK, _poke(np.nan).astype(np.float16))),
                            "`query/kernel` holds nan", "float32", ".npz"),
    "nan_safetensors": (lambda p: _save_st(p, _replace(_good(), "key/bias", np.full((2, 4), np.nan, np.float32))),
                        "`key/bias` holds nan", "float32", ".safetensors"),
    "nan_under_a_prefixed_key": (lambda p: _npz(p, {f"mha/{k}": (_poke(np.nan) if k == QK else v)
                                                    for k, v in _good().items()}),
                                 "`query/kernel` (key `mha/query/kernel`) holds nan", "float32", ".npz"),
    "overflows_float16": (lambda p: _npz(p, _replace(_good("float16"), QK, _poke(1e6).astype(np.float32))),
                          "`query/kernel` holds 1e+06 at [1, 0, 2], which overflows float16 (largest 65504)",
                          "float16", ".npz"),
    "overflows_float32_from_float64": (lambda p: _npz(p, _replace(_good(), QK, _poke64(1e300))),
                                       "which overflows float32", "float32", ".npz"),
    "integer_dtype": (lambda p: _npz(p, _replace(_good(), QK, np.zeros((8, 2, 4), np.int32))),
                      "`query/kernel` has dtype int32, expected a floating dtype", "float32", ".npz"),
    "complex_dtype": (lambda p: _npz(p, _replace(_good(), QK, np.zeros((8, 2, 4), np.complex64))),
                      "has dtype complex64, expected a floating dtype", "float32", ".npz"),
    "bool_safetensors": (lambda p: _save_st(p, _replace(_good(), QK, np.zeros((8, 2, 4), bool))),
                         "has dtype bool, expected a floating dtype", "float32", ".safetensors"),
    # ---- keys -------------------------------------------------------------------------------------
    "ambiguous_prefix": (lambda p: _npz(p, {**_good(), f"mha/{QK}": _good()[QK]}),
                         "Weights keys `mha/query/kernel`, `query/kernel` all name the weight `query/kernel`",
                         "float32", ".npz"),
    "ambiguous_tf_suffix": (lambda p: _npz(p, {**_good(), f"{QK}:0": _good()[QK]}),
                            "`query/kernel`, `query/kernel:0` all name the weight `query/kernel`", "float32", ".npz"),
    "ambiguous_safetensors": (lambda p: _save_st(p, {f"a/{k}": v for k, v in _good().items()} | {f"b/{QK}": _good()[QK]}),
                              "`a/query/kernel`, `b/query/kernel` all name", "float32", ".safetensors"),
    "missing_key": (lambda p: _npz(p, _without(_good(), "value/bias")), "missing ['value/bias']", "float32", ".npz"),
    "unexpected_key": (lambda p: _npz(p, {**_good(), "gate/kernel": np.zeros((8, 2, 4), np.float32)}),
                       "unexpected ['gate/kernel']", "float32", ".npz"),
    "wrong_shape": (lambda p: _npz(p, _replace(_good(), QK, np.zeros((8, 2, 5), np.float32))),
                    "`query/kernel` has shape (8, 2, 5), expected (8, 2, 4)", "float32", ".npz"),
    "duplicate_member": (lambda p: _npz(p, _good(), extra=[(f"{QK}.npy", _npy(_good()[QK]))]),
                         "holds two members named `query/kernel.npy`", "float32", ".npz"),
    "duplicate_safetensors_key": (lambda p: _safetensors(p, json.dumps(_st_good()[0])[:-1].encode() + b', "query/kernel": '
                                                         + json.dumps(_st_good()[0][QK]).encode() + b"}", _st_good()[1]),
                                  "names `query/kernel` twice", "float32", ".safetensors"),
    # ---- sizes: nothing inflated past the headers -----------------------------------------------------
    "bomb_compressible_member": (lambda p: _bomb(p, (4096, 4096)),
                                 "`query/kernel` has shape (4096, 4096), expected (8, 2, 4)", "float32", ".npz"),
    "bomb_compressible_extra_member": (lambda p: _bomb(p, (4096, 4096), key="junk"),
                                       "unexpected ['junk']", "float32", ".npz"),
    "bomb_claimed_1gib": (lambda p: _claimed_bomb(p, (16384, 16384)),
                          "`query/kernel` has shape (16384, 16384), expected (8, 2, 4)", "float32", ".npz"),
    "directory_claims_more_than_header": (lambda p: _claimed_bomb(p, (8, 2, 4), lie_directory_by=3 << 30),
                                          "array `query/kernel` declares float32 (8, 2, 4) (256 bytes after a 128-byte header)",
                                          "float32", ".npz"),
    "header_claims_more_than_member": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", _npy_lying("<f4", (8, 2, 400), _good()[QK].tobytes()))]),
        "declares float32 (8, 2, 400) (25600 bytes", "float32", ".npz"),
    "header_claims_less_than_member": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", _npy_lying("<f4", (8, 2, 2), _good()[QK].tobytes()))]),
        "the archive's directory says the member holds", "float32", ".npz"),
    "header_claims_other_dtype": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", _npy_lying("<f8", (8, 2, 4), _good()[QK].tobytes()))]),
        "declares float64 (8, 2, 4) (512 bytes", "float32", ".npz"),
    "header_negative_dim": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", _npy_lying("<f4", (-8, 2, 4), b""))]),
        "array `query/kernel` declares shape (-8, 2, 4), expected non-negative integer dimensions", "float32", ".npz"),
    "header_version_9": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", b"\x93NUMPY\x09\x00" + _npy(_good()[QK])[8:])]),
        "array `query/kernel` has .npy format version (9, 0), expected 1.0, 2.0 or 3.0", "float32", ".npz"),
    "header_length_past_limit": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", _npy_lying("<f4", (8, 2, 4), b"", version=(2, 0))[:8] + struct.pack("<I", 1 << 30))]),
        "array `query/kernel` has a 1073741824-byte .npy header, expected at most 10000", "float32", ".npz"),
    "header_length_bomb": (lambda p: _zip(p, [(f"{k}.npy", _npy(v)) for k, v in _without(_good(), QK).items()] + [
        (f"{QK}.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 30) + b" " * (32 << 20))], compress=zipfile.ZIP_DEFLATED),
        "has a 1073741824-byte .npy header", "float32", ".npz"),
    "too_many_members": (lambda p: _npz(p, {**_good(), **{f"x{i}": np.zeros(1, np.float32) for i in range(MAX_ENTRIES)}}),
                         f"members, expected at most {MAX_ENTRIES} arrays", "float32", ".npz"),
    # ---- no pickle, numbers only ------------------------------------------------------------------
    "pickled_object_array": (lambda p: _npz(p, _replace(_good(), QK, np.array([[[{"x": 1}] * 4] * 2] * 8, dtype=object))),
                             "array `query/kernel` holds Python objects (dtype object), which would need unpickling",
                             "float32", ".npz"),
    "raw_pickle_member": (lambda p: _npz(p, _without(_good(), QK), extra=[
        (f"{QK}.npy", b"\x80\x04\x95" + bytes(40) + b".")]), "corrupt or unreadable", "float32", ".npz"),
    "structured_dtype": (lambda p: _npz(p, _replace(_good(), QK, np.zeros((8, 2, 4), [("a", "<f4")]))),
                         "has dtype [('a', '<f4')], expected a numeric array", "float32", ".npz"),
    "string_dtype": (lambda p: _npz(p, _replace(_good(), QK, np.full((8, 2, 4), "x"))),
                     "has dtype <U1, expected a numeric array", "float32", ".npz"),
    "non_npy_member": (lambda p: _npz(p, _good(), extra=[("notes.txt", b"hello")]),
                       "member `notes.txt` is not a .npy array", "float32", ".npz"),
    "directory_member": (lambda p: _npz(p, _good(), extra=[("sub/", b"")]), "member `sub/` is not a .npy array",
                         "float32", ".npz"),
    # ---- broken archives ----------------------------------------------------------------------------
    "truncated_npz": (lambda p: (_npz(p, _good()), os.truncate(p, p.stat().st_size // 2)),
                      "is corrupt or unreadable", "float32", ".npz"),
    "empty_npz": (lambda p: p.write_bytes(b""), "is corrupt or unreadable", "float32", ".npz"),
    "not_a_zip": (lambda p: p.write_bytes(b"PK\x03\x04 definitely not a zip"), "is corrupt or unreadable", "float32", ".npz"),
    "bad_crc": (lambda p: (_npz(p, _good()), _flip_last_data_byte(p, QK)), "Bad CRC-32 for file 'query/kernel.npy'",
                "float32", ".npz"),
    "bad_deflate_stream": (lambda p: (_npz(p, _good(), compress=zipfile.ZIP_DEFLATED), _scramble_member(p, "value/bias")),
                           "corrupt or unreadable", "float32", ".npz"),
    "encrypted_member": (lambda p: (_npz(p, _good()), _set_flag(p, 0x1)), "member `query/kernel.npy` is encrypted",
                         "float32", ".npz"),
    # ---- not a weights file -----------------------------------------------------------------------------
    "wrong_suffix": (lambda p: p.write_bytes(b"x"), "expected a .npz or .safetensors file", "float32", ".pkl"),
    "no_suffix": (lambda p: _npz(p, _good()), "expected a .npz or .safetensors file", "float32", ""),
    "npy_not_npz": (lambda p: p.write_bytes(_npy(_good()[QK])), "expected a .npz or .safetensors file", "float32", ".npy"),
    "directory": (lambda p: p.mkdir(), "is a directory, expected a .npz or .safetensors file", "float32", ".npz"),
    "fifo": (lambda p: os.mkfifo(p), "is not a regular file", "float32", ".npz"),
    "missing": (lambda p: None, "Weights file not found", "float32", ".npz"),
    "dangling_symlink": (lambda p: p.symlink_to(p.parent / "nowhere.npz"), "Weights file not found", "float32", ".npz"),
    # ---- safetensors headers ------------------------------------------------------------------------
    "st_too_short": (lambda p: p.write_bytes(b"\x10\x00"), "too short for a safetensors header", "float32", ".safetensors"),
    "st_header_longer_than_file": (lambda p: _safetensors(p, _st_good()[0], _st_good()[1], length=1 << 40),
                                   "its safetensors header claims 1099511627776 bytes", "float32", ".safetensors"),
    "st_header_not_json": (lambda p: _safetensors(p, b"{not json", b""), "is corrupt or unreadable", "float32", ".safetensors"),
    "st_header_a_list": (lambda p: _safetensors(p, [1, 2], b""), "header is not a JSON object", "float32", ".safetensors"),
    "st_offsets_past_the_data": (lambda p: _st_with(p, lambda h: h["value/bias"].update(data_offsets=[10_000, 10_032])),
                                 "tensor `value/bias` declares float32 (2, 4) (32 bytes) at data_offsets [10000, 10032]",
                                 "float32", ".safetensors"),
    "st_offsets_wrong_size": (lambda p: _st_with(p, lambda h: h[QK].update(data_offsets=[0, 200])),
                              "tensor `query/kernel` declares float32 (8, 2, 4) (256 bytes) at data_offsets [0, 200]",
                              "float32", ".safetensors"),
    "st_offsets_reversed": (lambda p: _st_with(p, lambda h: h[QK].update(data_offsets=[256, 0])), "data_offsets [256, 0]",
                            "float32", ".safetensors"),
    "st_offsets_not_ints": (lambda p: _st_with(p, lambda h: h[QK].update(data_offsets=[0.0, 256.0])),
                            "data_offsets [0.0, 256.0]", "float32", ".safetensors"),
    "st_overlap": (lambda p: _st_with(p, lambda h: h["query/bias"].update(data_offsets=[8, 40])), "overlap",
                   "float32", ".safetensors"),
    "st_truncated": (lambda p: _st_with(p, lambda h: None, lambda d: d[:-50]), "within the", "float32", ".safetensors"),
    "st_huge_shape": (lambda p: _st_with(p, lambda h: h[QK].update(shape=[1 << 20, 1 << 20, 1 << 20])),
                      "declares float32 (1048576, 1048576, 1048576)", "float32", ".safetensors"),
    "st_negative_shape": (lambda p: _st_with(p, lambda h: h[QK].update(shape=[-8, 2, 4])),
                          "tensor `query/kernel` declares shape [-8, 2, 4], expected non-negative integer dimensions", "float32", ".safetensors"),
    "st_shape_not_a_list": (lambda p: _st_with(p, lambda h: h[QK].update(shape="8,2,4")), "expected a list of dimensions",
                            "float32", ".safetensors"),
    "st_unknown_dtype": (lambda p: _st_with(p, lambda h: h[QK].update(dtype="F8_E4M3")), "has dtype 'F8_E4M3', expected one of",
                         "float32", ".safetensors"),
    "st_extra_field": (lambda p: _st_with(p, lambda h: h[QK].update(pickle="cos\nsystem")),
                       "is not described by exactly dtype, shape and data_offsets", "float32", ".safetensors"),
    "st_npz_inside": (lambda p: _npz(p, _good()), "is corrupt", "float32", ".safetensors"),
}


def _flip_last_data_byte(path: Path, key: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def _scramble_member(path: Path, key: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start: start + info.compress_size] = bytes([0xFF]) * info.compress_size
    path.write_bytes(bytes(data))


def _set_flag(path: Path, flag: int) -> None:
    """Set a general-purpose flag bit on every entry (central directory and local headers)."""
    data = bytearray(path.read_bytes())
    for signature, at_flag in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):
        at = data.find(signature)
        while at >= 0:
            data[at + at_flag] |= flag
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))


@pytest.fixture()
def inflated(monkeypatch) -> list[int]:
    """The bytes `zipfile` hands out of members while the test runs (decompressed)."""
    counted: list[int] = []
    real_read = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        out = real_read(self, n)
        counted.append(len(out))
        return out

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return counted


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_weights_file_refused(name: str, tmp_path: Path, monkeypatch, capsys, inflated: list[int]) -> None:
    write, needle, dtype, suffix = CASES[name]
    monkeypatch.setenv("MHAGEN_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    spec = work / "spec.toml"
    spec.write_text(SPECS[dtype])
    path = work / f"weights{suffix}"
    write(path)
    inflated.clear()
    needles = (needle,) if isinstance(needle, str) else needle
    refuses(["build", str(spec), "--target", "cpu", "--weights", str(path), "--out", str(work / "out")],
            capsys, needle=needles, watch=[work], max_lines=1)
    assert sum(inflated) < 64 << 10, f"{sum(inflated)} bytes inflated before refusing"
    with pytest.raises(mhagen.WeightsError):
        normalize_weights(mhagen.Spec.from_toml(SPECS[dtype]), load_weights_file(path))
    assert not (tmp_path / "cache").exists()          # refused before anything was compiled


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


# ---- what passes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_good_files_load_lazily_and_match(suffix: str, tmp_path: Path, inflated: list[int]) -> None:
    good = _good()
    path = tmp_path / f"w{suffix}"
    mhagen.weights_io.save_weights_file(path, {f"mha/{k}:0": v for k, v in good.items()})
    weights = load_weights_file(path)
    assert sorted(weights) == sorted(f"mha/{k}:0" for k in good)
    assert weights.entries[f"mha/{QK}:0"].shape == (8, 2, 4)
    spec = mhagen.Spec.from_toml(SPECS["float32"])
    for got, want in zip(normalize_weights(spec, weights), good.values()):
        np.testing.assert_array_equal(got, want)


def test_float16_file_for_a_float32_spec_and_deflated_npz_are_fine(tmp_path: Path) -> None:
    good = _good()
    _npz(tmp_path / "w.npz", {k: v.astype(np.float16) for k, v in good.items()}, compress=zipfile.ZIP_DEFLATED)
    spec = mhagen.Spec.from_toml(SPECS["float32"])
    got = normalize_weights(spec, load_weights_file(tmp_path / "w.npz"))
    assert all(g.dtype == np.float32 for g in got)


def test_file_changed_after_opening_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    _npz(path, _good())
    weights = load_weights_file(path)
    _npz(path, _replace(_good(), QK, _good()[QK] * 2))
    os.utime(path, ns=(1, 1))
    with pytest.raises(mhagen.WeightsError, match="changed since it was opened"):
        weights[QK]


def test_api_dicts_with_bad_values_or_keys_are_refused() -> None:
    spec = mhagen.Spec.from_toml(SPECS["float16"])
    good = _good("float16")
    cases = {
        "nan": (_replace(good, "key/bias", np.full((2, 4), np.nan, np.float32)), "`key/bias` holds nan"),
        "overflow": (_replace(good, "key/bias", np.full((2, 4), 7e4, np.float32)), "overflows float16"),
        "ambiguous": ({**good, f"layer/{QK}": good[QK]}, "`layer/query/kernel`, `query/kernel` all name"),
        "non_string_key": ({**good, 3: good[QK]}, "Received a weights key 3 of type int"),
    }
    for weights, needle in cases.values():
        with pytest.raises(mhagen.WeightsError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
            normalize_weights(spec, weights)
        assert "\n" not in str(err.value)
    with pytest.raises(mhagen.WeightsError, match=r"`attention_output/bias` holds inf"):
        normalize_weights(spec, [*list(good.values())[:-1], np.full((8,), np.inf)])


def test_initializer_that_draws_nan_never_reaches_the_compiler(monkeypatch) -> None:
    """Defence behind the spec's own checks: whatever an initializer draws is checked too."""
    import mhagen.weights

    spec = mhagen.Spec.from_toml(SPECS["float16"])
    real = mhagen.weights._draw
    monkeypatch.setattr(mhagen.weights, "_draw", lambda init, name, shape, rng: (
        np.full(shape, np.nan) if name == "key/bias" else real(init, name, shape, rng)))
    with pytest.raises(mhagen.SpecError, match=r"`bias_initializer`, expected an initializer that draws finite "
                                               r"float16 values \(for `key/bias` it drew nan at \[0, 0\]"):
        mhagen.init_weights(spec)
    monkeypatch.setattr(mhagen.weights, "_draw", lambda init, name, shape, rng: np.full(shape, 1e5))
    with pytest.raises(mhagen.SpecError, match=r"`kernel_initializer`.*drew 100000 at \[0, 0, 0\], which overflows "
                                               r"float16"):
        mhagen.build(spec, target="cpu")
