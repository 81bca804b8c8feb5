"""Trust corpus, families `inputs` and `cli`: bad call-time inputs and bad command lines.

`inputs`: .npy files that lie about their size, hold pickles, are FIFOs or folders, or have the
wrong dtype, rank or shape, and bad `--input`/`--output` arguments, through `mhagen run`.
`cli`: conflicting, empty or repeated target options, unreadable specs and weights, unwritable
reports. Each is refused with exit 2 and one line; nothing is written.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from corpus import refuses

from mhagen.cli import main

SPEC = ("[layer]\nnum_heads = 2\nkey_dim = 4\n[call]\nquery = [2, 3, 8]\nvalue = [2, 5, 8]\n"
        "attention_mask = true\nreturn_attention_scores = true\n")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trust_calls")
    (root / "spec.toml").write_text(SPEC)
    assert main(["build", str(root / "spec.toml"), "--target", "cpu", "--out", str(root / "b")]) == 0
    np.save(root / "q.npy", np.ones((2, 3, 8), np.float32))
    np.save(root / "v.npy", np.ones((2, 5, 8), np.float32))
    return root / "b", root


def _npy_with_header(path: Path, header: str, data: bytes = b"") -> Path:
    """A .npy file with a hand-written header (padded as the format wants)."""
    h = header.encode("latin1")
    pad = 64 - (10 + len(h) + 1) % 64
    path.write_bytes(b"\x93NUMPY\x01\x00" + (len(h) + pad + 1).to_bytes(2, "little") + h + b" " * pad + b"\n" + data)
    return path


def _query(kind: str, d: Path) -> tuple[str, str]:
    """Write a bad `query` input of `kind`; returns (path, text the error must contain)."""
    p = d / "q_bad.npy"
    if kind == "empty_file":
        p.write_bytes(b"")
        return str(p), "not a .npy file"
    if kind == "text_file":
        p.write_text("1 2 3")
        return str(p), "not a .npy file"
    if kind == "header_more_than_data":
        _npy_with_header(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 8), }", b"\0" * 40)
        return str(p), "but the file holds 40 bytes"
    if kind == "header_less_than_data":
        _npy_with_header(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 8), }", b"\0" * 400)
        return str(p), "but the file holds 400 bytes"
    if kind == "header_terabyte":
        _npy_with_header(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000, 8), }",
                         b"\0" * 64)
        return str(p), "32000000000000 bytes"
    if kind == "header_negative_dim":
        _npy_with_header(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3, 8), }", b"\0" * 8)
        return str(p), "not a .npy file"
    if kind == "header_garbage":
        _npy_with_header(p, "{'descr': __import__('os'), }")
        return str(p), "not a .npy file"
    if kind == "bad_magic_version":
        p.write_bytes(b"\x93NUMPY\x09\x00" + b"\0" * 100)
        return str(p), "not a .npy file"
    if kind == "pickled_objects":
        np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return str(p), "never loaded"
    if kind == "fifo":
        os.mkfifo(p)
        return str(p), "not a regular file"
    if kind == "directory":
        p.mkdir()
        return str(p), "not a regular file"
    if kind == "missing":
        return str(d / "nope.npy"), "No such file"
    if kind == "int_dtype":
        np.save(p, np.ones((2, 3, 8), np.int32))
        return str(p), "`query` has dtype int32, expected float32"
    if kind == "string_dtype":
        np.save(p, np.array([["abc"] * 8] * 3 * 2).reshape(2, 3, 8))
        return str(p), "`query` has dtype <U3"
    if kind == "bool_dtype":
        np.save(p, np.ones((2, 3, 8), bool))
        return str(p), "`query` has dtype bool"
    if kind == "complex_dtype":
        np.save(p, np.ones((2, 3, 8), np.complex64))
        return str(p), "`query` has dtype complex64"
    if kind == "wrong_shape":
        np.save(p, np.ones((2, 4, 8), np.float32))
        return str(p), "`query` has shape (2, 4, 8), expected (2, 3, 8)"
    if kind == "wrong_rank":
        np.save(p, np.ones((3, 8), np.float32))
        return str(p), "`query` has shape (3, 8)"
    if kind == "scalar":
        np.save(p, np.float32(1))
        return str(p), "`query` has shape ()"
    if kind == "batch_other_lengths":
        np.save(p, np.ones((1, 4, 8), np.float32))
        return str(p), "`query` has shape (1, 4, 8), expected (*, 3, 8) (* = any batch)"
    raise AssertionError(kind)


QUERY_KINDS = ["empty_file", "text_file", "header_more_than_data", "header_less_than_data", "header_terabyte",
               "header_negative_dim", "header_garbage", "bad_magic_version", "pickled_objects", "fifo",
               "directory", "missing", "int_dtype", "string_dtype", "bool_dtype", "complex_dtype",
               "wrong_shape", "wrong_rank", "scalar", "batch_other_lengths"]


@pytest.mark.parametrize("kind", QUERY_KINDS)
def test_bad_input_file(kind: str, bundle, tmp_path: Path, capsys) -> None:
    b, root = bundle
    query, needle = _query(kind, tmp_path)
    outs = tmp_path / "outs"
    outs.mkdir()
    refuses(["run", str(b), "--input", f"query={query}", "--input", f"value={root / 'v.npy'}",
             "--output", str(outs / "r")], capsys, needle=needle, watch=[outs, b])


def _arg_cases(root: Path, d: Path) -> dict[str, tuple[list[str], str]]:
    q, v = f"query={root / 'q.npy'}", f"value={root / 'v.npy'}"
    np.save(d / "m_bad.npy", np.ones((4, 7), bool))
    np.save(d / "m_str.npy", np.array(["a"] * 15).reshape(3, 5))
    np.save(d / "k.npy", np.ones((2, 5, 8), np.float32))
    np.save(d / "dk.npy", np.array([1, 2], np.uint32))
    (d / "a_file").write_text("x")
    (d / "dir.npy").mkdir()
    return {
        "input_twice": (["--input", q, "--input", q, "--input", v], "--input query is given twice"),
        "input_no_equals": (["--input", "query", "--input", v], "expected NAME=FILE.npy"),
        "input_unknown_name": (["--input", q, "--input", v, "--input", f"keys={root / 'q.npy'}"],
                               "expected NAME=FILE.npy"),
        "input_empty_file_name": (["--input", "query=", "--input", v], "expected NAME=FILE.npy"),
        "missing_value": (["--input", q], "Missing --input value=FILE.npy"),
        "missing_query": (["--input", v], "Missing --input query=FILE.npy"),
        "mask_not_broadcasting": (["--input", q, "--input", v, "--input", f"attention_mask={d / 'm_bad.npy'}"],
                                  "does not broadcast"),
        "mask_strings": (["--input", q, "--input", v, "--input", f"attention_mask={d / 'm_str.npy'}"],
                         "`attention_mask` has dtype"),
        "key_not_declared": (["--input", q, "--input", v, "--input", f"key={d / 'k.npy'}"],
                             "declares no key input"),
        "dropout_key_without_dropout": (["--input", q, "--input", v, "--input", f"dropout_key={d / 'dk.npy'}"],
                                        "applies no dropout"),
        "output_npy_for_two_outputs": (["--input", q, "--input", v, "--output", str(d / "o.npy")],
                                       "returns output and scores"),
        "output_existing_file": (["--input", q, "--input", v, "--output", str(d / "a_file")],
                                 "exists and is not a directory"),
        "output_npy_is_directory": (["--input", q, "--input", v, "--output", str(d / "dir.npy")],
                                    "returns output and scores"),
        "output_through_a_file": (["--input", q, "--input", v, "--output", str(d / "a_file" / "sub")],
                                  "Not a directory"),
        "target_not_in_bundle": (["--input", q, "--input", v, "--target", "metal"], "has no target `metal`"),
        "target_empty": (["--input", q, "--input", v, "--target", ""], "has no target ``"),
        "no_output_option": (["--input", q, "--input", v, "--output"], "expected one argument"),
    }


ARG_CASES = ["input_twice", "input_no_equals", "input_unknown_name", "input_empty_file_name", "missing_value",
             "missing_query", "mask_not_broadcasting", "mask_strings", "key_not_declared",
             "dropout_key_without_dropout", "output_npy_for_two_outputs", "output_existing_file",
             "output_npy_is_directory", "output_through_a_file", "target_not_in_bundle", "target_empty",
             "no_output_option"]


@pytest.mark.parametrize("case", ARG_CASES)
def test_bad_run_arguments(case: str, bundle, tmp_path: Path, capsys) -> None:
    b, root = bundle
    args, needle = _arg_cases(root, tmp_path)[case]
    argv = ["run", str(b), *args]
    if "--output" not in args:
        argv += ["--output", str(tmp_path / "out")]
    refuses(argv, capsys, needle=needle, watch=[tmp_path, b])


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_run_into_full_and_read_only_folders(bundle, tmp_path: Path, capsys) -> None:
    """A full disk or a read-only folder: one line naming the cause, and no partial file left."""
    b, root = bundle
    big_q = np.ones((2, 3, 8), np.float32)
    np.save(tmp_path / "q.npy", big_q)
    argv = ["run", str(b), "--input", f"query={tmp_path / 'q.npy'}", "--input", f"value={root / 'v.npy'}"]
    with _tmpfs(tmp_path / "full", "size=4k") as full:
        (full / "filler").write_bytes(b"\0" * 4096)
        refuses(argv + ["--output", str(full / "o")], capsys, needle="No space left on device", watch=[full])
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        refuses(argv + ["--output", str(ro / "o")], capsys, needle="Read-only file system", watch=[ro])


def _cli_cases(root: Path, d: Path) -> dict[str, tuple[list[str], str]]:
    spec = str(root / "spec.toml")
    (d / "spec_dir").mkdir()
    (d / "w_dir.npz").mkdir()
    (d / "json_dir").mkdir()
    (d / "a_file").write_text("x")
    return {
        "targets_repeated": (["verify", spec, "--targets", "cpu,cpu"], "expected each target once"),
        "target_and_targets": (["verify", spec, "--target", "cpu", "--targets", "vmvx"], "were both given"),
        "targets_empty": (["verify", spec, "--targets", ""], "expected comma-separated target names"),
        "targets_trailing_comma": (["verify", spec, "--targets", "cpu,"], "expected comma-separated"),
        "targets_unknown": (["verify", spec, "--targets", "cpu,gpu9000"], "Received: target='gpu9000'"),
        "target_near_miss": (["verify", spec, "--targets", "cuda"], "(did you mean `cuda-sm80`?)"),
        "target_typo": (["build", spec, "--target", "vulkn", "--out", str(d / "o")], "(did you mean `vulkan`?)"),
        "target_refused": (["build", spec, "--target", "cuda-sm90", "--out", str(d / "o")], "is refused"),
        "build_targets_repeated": (["build", spec, "--targets", "vmvx,vmvx", "--out", str(d / "o")],
                                   "expected each target once"),
        "spec_missing": (["verify", str(d / "nope.toml")], "Spec file not found"),
        "spec_directory": (["verify", str(d / "spec_dir")], "Cannot read spec file"),
        "weights_missing": (["verify", spec, "--weights", str(d / "nope.npz")], "Weights file not found"),
        "weights_directory": (["verify", spec, "--weights", str(d / "w_dir.npz")], "is a directory"),
        "json_in_missing_folder": (["verify", spec, "--target", "cpu", "--json", str(d / "no" / "r.json")],
                                   "No such file or directory"),
        "json_is_directory": (["verify", spec, "--target", "cpu", "--json", str(d / "json_dir")],
                              "Is a directory"),
        "json_through_a_file": (["verify", spec, "--target", "cpu", "--json", str(d / "a_file" / "r.json")],
                                "Not a directory"),
        "seed_not_a_number": (["verify", spec, "--seed", "x"], "invalid int value"),
        "unknown_command": (["frobnicate"], "invalid choice"),
        "unknown_option": (["verify", spec, "--fast"], "unrecognized arguments: --fast"),
        "build_without_out": (["build", spec], "the following arguments are required: --out"),
        "run_without_output": (["run", str(root / "b")], "the following arguments are required: --output"),
        "no_command": ([], "required: command"),
        "import_keras_missing_file": (["import-keras", str(d / "nope.keras"), "--layer", "mha", "--query-shape",
                                       "2,3,8", "--value-shape", "2,5,8", "--out", str(d / "s.toml")], "not found"),
    }


CLI_CASES = ["targets_repeated", "target_and_targets", "targets_empty", "targets_trailing_comma",
             "targets_unknown", "target_near_miss", "target_typo", "target_refused", "build_targets_repeated", "spec_missing", "spec_directory",
             "weights_missing", "weights_directory", "json_in_missing_folder", "json_is_directory",
             "json_through_a_file", "seed_not_a_number", "unknown_command", "unknown_option", "build_without_out",
             "run_without_output", "no_command", "import_keras_missing_file"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_command_line(case: str, bundle, tmp_path: Path, capsys) -> None:
    b, root = bundle
    args, needle = _cli_cases(root, tmp_path)[case]
    refuses(args, capsys, needle=needle, watch=[tmp_path, root])


def test_run_writes_one_file_and_times_the_call(bundle, tmp_path: Path, capsys) -> None:
    """`--output DIR` gets one .npy per output, a timing line is printed, no temporary file remains."""
    b, root = bundle
    argv = ["run", str(b), "--input", f"query={root / 'q.npy'}", "--input", f"value={root / 'v.npy'}",
            "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ran `cpu` in" in out and " ms" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["output.npy", "scores.npy"]
    assert np.load(tmp_path / "o" / "scores.npy").shape == (2, 2, 3, 5)
