"""`run.py` and `mhagen run`: load one target of a bundle, feed it .npy inputs, write .npy outputs.

Inputs are read without pickle, and a `.npy` whose header promises more (or less) data than the
file holds is refused before anything is allocated. Outputs are written atomically: each goes to
a temporary file beside its destination and is renamed into place only once complete, so a full
disk leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .bundle import load_bundle
from .errors import CallError, MhagenError

__all__ = ["run_main", "OneLineParser", "read_npy", "save_npy_atomic"]

INPUT_NAMES = ("query", "value", "key", "attention_mask", "dropout_key")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`PROG: error: ...`) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def read_npy(path: str | Path, name: str) -> np.ndarray:
    """A `.npy` file as an array: a regular file, no pickle, the header's size equal to the data's."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CallError(f"Cannot read `{name}` from {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CallError(f"Cannot read `{name}` from {path}: not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f, max_header_size=10000)
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise CallError(f"Cannot read `{name}` from {path}: not a .npy file ({str(exc)[:100]})") from None
        if any(int(d) < 0 for d in shape):
            raise CallError(f"Cannot read `{name}` from {path}: not a .npy file (negative dimension in "
                            f"shape {shape})")
        if dtype.hasobject:
            raise CallError(f"Cannot read `{name}` from {path}: it holds Python objects (pickle), "
                            "which are never loaded; save a numeric array")
        count = 1
        for d in shape:
            count *= int(d)
        expected = count * dtype.itemsize
        available = info.st_size - f.tell()
        if expected != available:
            raise CallError(f"Cannot read `{name}` from {path}: its header says shape {shape} {dtype} "
                            f"({expected} bytes) but the file holds {available} bytes of data")
        data = f.read(expected)
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape, order="F" if fortran else "C")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` through a temporary file renamed into place (never a partial file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _destinations(output: str, names: Sequence[str]) -> list[Path]:
    """`--output FILE.npy` for a single output, else `--output DIR` holding NAME.npy per output."""
    if not output.strip():
        raise CallError("--output is empty; give FILE.npy or a directory")
    out = Path(output)
    folder = out.parent if out.suffix == ".npy" else out
    for place in (folder, *folder.resolve().parents):
        if (place / "manifest.json").is_file() and (place / "mhagen_runtime").is_dir():
            raise CallError(f"--output {output} is inside the bundle {place}, whose files are hashed; "
                            "write the outputs somewhere else")
    if out.suffix == ".npy":
        if len(names) > 1:
            raise CallError(f"--output {output} names one .npy file, but this bundle returns "
                            f"{' and '.join(names)}: give a directory instead")
        if out.is_dir():
            raise CallError(f"--output {output} is a directory; give a file name or a directory "
                            "without the .npy suffix")
        if not out.parent.is_dir():
            raise CallError(f"--output {output}: the folder {out.parent} does not exist")
        return [out]
    if out.exists() and not out.is_dir():
        raise CallError(f"--output {output} exists and is not a directory (give a directory, "
                        "or a FILE.npy for a single output)")
    return [out / f"{n}.npy" for n in names]


def _write_outputs(destinations: Sequence[Path], arrays: Sequence[np.ndarray]) -> None:
    """Write every output atomically; on failure remove what this call created (folders included)."""
    folder = destinations[0].parent
    created = []
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            created.append(parent)
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for dest, array in zip(destinations, arrays):
            existed = dest.exists()
            if np.asarray(array).dtype.name == "bfloat16":
                # NumPy has no bfloat16: saved as is, the .npy reads back as `|V2` bytes. float32
                # holds every bfloat16 value exactly, so the output is widened and said so.
                array = np.asarray(array).astype(np.float32)
                print(f"{dest.name}: bfloat16 output written as float32 (exact)", file=sys.stderr)
            save_npy_atomic(dest, array)
            if not existed:
                written.append(dest)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _bench(layer: Any, inputs: dict[str, np.ndarray] | None, repeats: int | None) -> int:
    from .timing import DEFAULT_REPEATS, time_layer

    timing = time_layer(layer, inputs, repeats=DEFAULT_REPEATS if repeats is None else repeats)
    print(timing.summary())
    return 0


def _generate(layer: Any, arrays: dict[str, np.ndarray], steps: int, tokens: np.ndarray | None
              ) -> list[np.ndarray]:
    """Prefill the prompt, then `steps` single-token decode steps; returns [outputs (B, T0+steps, E),
    the cache (B, 2, S, N, H)]. Cross-attention: the cache of the encoder output `value`, the
    queries, then `steps` more queries over it."""
    info = layer.interface.get("decoder")
    if not info:
        raise CallError("--decode needs a decoder bundle (a spec with [call] cache_max_length)")
    for name, why in (("dropout_key", "a decoder build does not train"),
                      ("attention_mask", "--decode runs without a padding mask")):
        if name in arrays:
            raise CallError(f"--decode takes no --input {name} ({why})")
    cross = info.get("kind") == "cross"
    if info.get("key") and not cross:
        raise CallError("--decode cannot make key tokens for the steps of a spec with a separate key; "
                        "drive its steps from Python (layer.decode(query, value, key, cache=...))")
    query = arrays["query"]
    B, _, S, _, _ = info["cache_shape"]
    if query.ndim != 3:
        raise CallError(f"`query` has shape {query.shape}, expected (B, T0, E)")
    if not cross and query.shape[1] + steps > S:
        raise CallError(f"a prompt of {query.shape[1]} tokens and {steps} steps need {query.shape[1] + steps} "
                        f"cache positions; this build's cache holds {S} (cache_max_length)")
    if tokens is not None and (tokens.ndim != 3 or tokens.shape[1] != steps or tokens.shape[0] != query.shape[0]
                               or tokens.shape[2] != query.shape[2]):
        raise CallError(f"--tokens has shape {tokens.shape}, expected ({query.shape[0]}, {steps}, {query.shape[2]}): "
                        "one token per step, with the prompt's batch and features")
    if tokens is not None and not np.issubdtype(tokens.dtype, np.floating):
        raise CallError(f"--tokens has dtype {tokens.dtype}, expected floats")
    out, cache = layer.prefill(query, arrays["value"], arrays.get("key"))
    outs = [out]
    token = out[:, -1:]
    for i in range(steps):
        if tokens is not None:
            token = tokens[:, i:i + 1]
        elif token.shape[-1] != query.shape[-1]:
            raise CallError(f"--decode without --tokens feeds each output back as the next token, but "
                            f"outputs have {token.shape[-1]} features and queries {query.shape[-1]}; "
                            "give --tokens FILE.npy")
        out, cache = layer.decode(token, cache=cache) if cross else layer.decode(token, token, cache=cache)
        outs.append(out)
        token = out
    return [np.concatenate(outs, axis=1), np.asarray(cache)]


def run_main(argv: Sequence[str] | None = None, *, bundle: str | Path | None = None,
             prog: str = "run.py") -> int:
    """`run.py` / `mhagen run`: load a bundle target, feed .npy inputs, write .npy outputs.

    run.py --target cpu --input query=q.npy --input value=v.npy --output OUTDIR
    Exit codes: 0 ok, 2 bad input or environment (one line on stderr), 130 interrupted.
    """
    parser = OneLineParser(prog=prog, description="Run an mhagen bundle on .npy inputs.")
    if bundle is None:
        parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--target", default="cpu", help="target in the bundle (default cpu), or `auto`: "
                        "the first that runs here, in the order cuda, rocm, metal, vulkan, cpu, vmvx")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input: query, value, key, attention_mask or dropout_key")
    parser.add_argument("--output",
                        help="FILE.npy for a single output, or a directory for output.npy (and scores.npy)")
    parser.add_argument("--allow-failed", action="store_true",
                        help="run a target even though its verify failed when the bundle was built")
    parser.add_argument("--bench", action="store_true",
                        help="time the module instead (p50/p90/p99 and mean, inputs on the device, as "
                        "iree-benchmark-module does) on the --input files, else on seeded inputs of the "
                        "declared shapes; no --output")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="with --bench: the most timed calls (default 100, fewer past 10 s)")
    parser.add_argument("--decode", type=int, default=None, metavar="N",
                        help="a decoder bundle: the inputs are the prompt (prefill), then N decode steps of "
                        "one token each, from --tokens, else each step's output fed back as the next "
                        "token; writes output.npy (every token's output) and cache.npy (B, 2, S, N, H)")
    parser.add_argument("--tokens", metavar="FILE.npy", default=None,
                        help="with --decode: the tokens (B, N, E) decoded one at a time after the prompt")
    try:
        args = parser.parse_args(argv)
        if args.bench and args.output is not None:
            parser.error("--bench times the module and writes no output: drop --output")
        if not args.bench and args.output is None:
            parser.error("the following arguments are required: --output")
        if args.repeats is not None and not args.bench:
            parser.error("--repeats goes with --bench")
        if args.decode is not None and (args.decode < 0 or args.bench):
            parser.error("--decode takes a number of steps >= 0 and does not go with --bench")
        if args.tokens is not None and args.decode is None:
            parser.error("--tokens goes with --decode N")
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        inputs: dict[str, Any] = {}
        for item in args.input:
            name, sep, file = item.partition("=")
            if not sep or name not in INPUT_NAMES or not file:
                raise CallError(f"Received an invalid value for argument `--input`, expected NAME=FILE.npy "
                                f"with NAME one of {', '.join(INPUT_NAMES)}. Received: --input={item!r}")
            if name in inputs:
                raise CallError(f"--input {name} is given twice")
            inputs[name] = file
        for name in ("query", "value"):   # --bench without any --input times seeded inputs
            if name not in inputs and not (args.bench and not inputs):
                raise CallError(f"Missing --input {name}=FILE.npy")
        layer = load_bundle(bundle if bundle is not None else args.bundle, args.target,
                            allow_failed=args.allow_failed)
        if args.bench:
            return _bench(layer, {name: read_npy(file, name) for name, file in inputs.items()} or None,
                          args.repeats)
        arrays = {name: read_npy(file, name) for name, file in inputs.items()}
        started = time.perf_counter()
        if args.decode is not None:
            names = ["output", "cache"]
            destinations = _destinations(args.output, names)
            tokens = None if args.tokens is None else read_npy(args.tokens, "tokens")
            outs = _generate(layer, arrays, args.decode, tokens)
        else:
            names = [s.name for s in layer.outputs]
            destinations = _destinations(args.output, names)
            result = layer(**arrays)
            outs = list(result) if isinstance(result, tuple) else [result]
        seconds = time.perf_counter() - started
        _write_outputs(destinations, outs)
        for name, dest, array in zip(names, destinations, outs):
            print(f"{name}: {array.shape} {array.dtype} -> {dest}")
        print(f"ran `{layer.target_name}` in {seconds * 1e3:.2f} ms (including transfers)")
    except MhagenError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename or args.output
        print(f"{prog}: error: {f'{where}: ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory running the bundle", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
