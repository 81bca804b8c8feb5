"""The `mhagen` command line: build, verify, run, targets (and more as stages grow).

Exit codes:
    0    success
    1    a verify mismatch (a compiled target disagrees with the NumPy oracle)
    2    bad input or environment: spec, weights, target, bundle, call, or an OS error such as a
         read-only or full output folder; one line on stderr (`mhagen: error: ...`)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import CompileError, MhagenError, TargetError, VerifyError
from .runtime.cli import OneLineParser

EXIT_MISMATCH = 1
EXIT_ERROR = 2


def _weights_arg(spec_path: str, value: str | None) -> Any:
    """`--weights FILE`, else a sidecar `SPEC.npz` / `SPEC.safetensors` beside the spec, else None."""
    from .weights_io import load_weights_file

    if value:
        return load_weights_file(value)
    base = Path(spec_path)
    for suffix in (".npz", ".safetensors"):
        candidate = base.with_suffix(suffix)
        if candidate.is_file():
            return load_weights_file(candidate)
    return None


def _targets_arg(args: argparse.Namespace) -> list[Any]:
    from .targets import parse_targets

    if args.target is not None and args.targets is not None:
        raise TargetError(f"--target {args.target} and --targets {args.targets} were both given; use one")
    value = args.targets if args.targets is not None else args.target if args.target is not None else "cpu"
    return parse_targets(value)


# Columns a narrow terminal drops, widest need first: (column, the least width that shows it).
_TARGETS_OPTIONAL = {"description": 160, "driver": 100}


def _cmd_targets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .targets import all_targets, availability

    rows, cells = [], []
    for name, target in sorted(all_targets().items()):
        a = availability(target)
        compiles = "yes" if a.compiles else f"no: {a.compile_reason}"
        runs = f"yes ({a.run_reason})" if a.runs else f"no: {a.run_reason}"
        cells.append({"target": name, "backend": target.backend, "driver": target.driver,
                      "compiles here": compiles, "runs here": runs, "description": target.description})
        rows.append({**target.to_dict(), "compiles": a.compiles, "compile_reason": a.compile_reason,
                     "runs": a.runs, "run_reason": a.run_reason})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    console = Console()
    columns = [c for c in ("target", "backend", "driver", "compiles here", "runs here", "description")
               if console.width >= _TARGETS_OPTIONAL.get(c, 0)]
    table = Table(title="mhagen targets")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*(Text(row[c]) for c in columns))
    console.print(table)
    if len(columns) < len(cells[0]):
        console.print(f"(a wider terminal shows {', '.join(c for c in cells[0] if c not in columns)}; "
                      "--json shows all)", highlight=False)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .sweep import check_verify_options, cmd_sweep

    if check_verify_options(args):        # --sweep DIR: every spec of a folder (mhagen/sweep.py)
        return cmd_sweep(args, _targets_arg(args))
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .progress import Steps
    from .spec import Spec
    from .verify import SourceReference, shape_checks, tolerance, verify_matrix

    spec = Spec.load(args.spec)
    weights = _weights_arg(args.spec, args.weights)
    targets = _targets_arg(args)
    if args.json:
        _check_writable(Path(args.json), "--json")
    # The source model's own output, as `mhagen import-keras` writes it beside the spec.
    reference_path = Path(args.reference or Path(args.spec).with_suffix(".keras-ref.npz"))
    reference = SourceReference.load(reference_path) if args.reference or reference_path.is_file() else None
    with Steps(Console(stderr=True)) as steps:
        rows = verify_matrix(spec, targets, weights, seed=args.seed, reference=reference,
                             on_progress=lambda name, stage: steps.start(f"{name}: {stage}"))
    tol = tolerance(spec)
    # With rtol 0 the test is |err| <= atol alone, and a relative error would only confuse.
    criterion = f"|err| <= {tol.atol:g}" + (f" + {tol.rtol:g} |expected|" if tol.rtol else "")
    table = Table(title=Text(f"mhagen verify {args.spec} ({spec.call.dtype}; pass: {criterion})"))
    columns = ["target", "compiled", "max abs err"] + (["max rel err"] if tol.rtol else [])
    columns += (["vs source"] if reference else []) + ["result"]
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col in ("target", "compiled"))
    for r in rows:
        compiled = (f"{r.size / 1024:.0f} KiB, " + ("cached" if r.cached else f"{r.compile_seconds:.1f} s")
                    if r.compiled else "no")
        result = r.status
        if not r.compiled and r.reason:
            result = f"compile failed: {r.reason}"
        elif r.compiled and not r.ran:
            result = f"not run: {r.reason}"
        elif r.ran and r.max_abs is None:      # the run itself failed
            result = f"FAIL: {r.reason}"
        cells = [r.target, compiled, "" if r.max_abs is None else f"{r.max_abs:.3g}"]
        if tol.rtol:
            cells.append("" if r.max_rel is None else f"{r.max_rel:.3g}")
        if reference:
            cells.append("" if r.reference_max_abs is None else f"{r.reference_max_abs:.3g}")
        table.add_row(*map(Text, cells + [result]))
    console = Console()
    console.print(table)
    ran = next((r for r in rows if r.shapes), None)
    if ran:
        console.print(Text(f"shapes checked: query {', '.join(ran.shapes)} ({shape_checks(spec)[1]})"))
    if reference:
        console.print(Text(f"vs source: max abs err against {reference.source}'s own output ({reference_path})"))
    for r in rows:
        if r.ran and not r.passed:
            print(f"{r.target}: {r.message or r.reason}", file=sys.stderr)
    if args.json:
        payload = {"spec": spec.to_dict(), "dtype": spec.call.dtype,
                   "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
                   "results": [r.to_dict() for r in rows]}
        _write_text_atomic(Path(args.json), json.dumps(payload, indent=2))
    failed = [r for r in rows if (r.ran and not r.passed) or not r.compiled]
    return EXIT_MISMATCH if failed else 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .bundle import build_bundle
    from .spec import Spec

    spec = Spec.load(args.spec)
    weights = _weights_arg(args.spec, args.weights if args.weights != "inline" else None)
    targets = _targets_arg(args)
    out = build_bundle(spec, targets, args.out, weights=weights,
                       weights_mode="inline" if args.weights == "inline" else "parameters",
                       verify=not args.no_verify, force=args.force, progress=True)
    print(f"wrote {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime import run_main

    return run_main(args.args, prog="mhagen run")


def _check_writable(path: Path, option: str) -> None:
    """Refuse, before any work, a report path that cannot be written."""
    import os

    if path.is_dir():
        raise OSError(21, "Is a directory", str(path))
    parent = path.parent
    if not parent.is_dir():
        raise OSError(20 if parent.exists() else 2,
                      "Not a directory" if parent.exists() else "No such file or directory", str(parent))
    if not os.access(parent, os.W_OK):
        raise OSError(13, "Permission denied", str(parent))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write a report file through a temporary file renamed into place."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version() -> str:
    import importlib.metadata

    from . import __version__

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (f"mhagen {__version__} (iree-base-compiler {version('iree-base-compiler')}, "
            f"iree-base-runtime {version('iree-base-runtime')}, jax {version('jax')})")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mhagen", description="Compile Keras MultiHeadAttention ahead of time with IREE, per "
        "hardware target, and verify every build against a NumPy oracle.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show full diagnostics on errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    def target_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", help="one target name (see `mhagen targets`)")
        p.add_argument("--targets", help="comma-separated target names, or `all`")

    p = sub.add_parser("build", help="compile a spec into a deployable bundle directory")
    p.add_argument("spec", help="spec TOML file")
    target_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", help="weights file (.npz/.safetensors; default: SPEC.npz beside the "
                   "spec, else seeded initial weights), or `inline` to bake those weights into the "
                   "modules as constants instead of a shared weights.irpa")
    p.add_argument("--no-verify", action="store_true", help="skip running the oracle check")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an mhagen bundle")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("verify", help="compile, run on seeded inputs, compare with the NumPy oracle")
    p.add_argument("spec", nargs="?", help="spec TOML file (or --sweep DIR)")
    target_args(p)
    p.add_argument("--weights", help="weights file (.npz/.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    importlib.import_module("mhagen.sweep").add_verify_options(p)
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--reference", help="also compare with a source model's own output (default: "
                   "SPEC.keras-ref.npz beside the spec, which `mhagen import-keras` writes)")
    p.set_defaults(func=_cmd_verify)

    # `mhagen run` is the bundle's own `run.py` with the bundle as first argument: one parser, the runtime's.
    p = sub.add_parser("run", help="run a bundle on .npy inputs (as the bundle's run.py does); "
                       "`mhagen run --help` lists its options", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("targets", help="list targets: whether each compiles and runs here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_targets)

    # Stages with their own commands register them here (each module owns its subcommand).
    for module_name in _CLI_MODULES:
        module = importlib.import_module(f"mhagen.{module_name}")
        module.add_cli(sub)
    return parser


# Modules that define `add_cli(subparsers)`; each adds its subcommand with `set_defaults(func=...)`.
_CLI_MODULES: tuple[str, ...] = ("keras_io", "bench", "reweight", "fuzz")


def main(argv: Sequence[str] | None = None) -> int:
    _interrupt_on_termination()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "run" and all(a in ("-v", "--verbose") for a in argv[:first]):
        from .runtime import run_main       # `mhagen run ...` is run.py's own parser, --help included

        return run_main(argv[first + 1:], prog="mhagen run")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:      # --help, --version, or a usage error already printed in one line
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except VerifyError as exc:
        print(f"mhagen: verify failed: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_MISMATCH
    except CompileError as exc:
        print(f"mhagen: error: {exc.summary}", file=sys.stderr)
        if args.verbose:
            print(exc.diagnostics, file=sys.stderr)
        print("mhagen: (rerun with -v for the diagnostics; set IREE_SAVE_TEMPS=DIR to keep reproducers)",
              file=sys.stderr)
        return EXIT_ERROR
    except MhagenError as exc:
        print(f"mhagen: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mhagen: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mhagen: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("mhagen: error: out of memory (the spec's sizes need more memory than this machine has; "
              "try smaller shapes or --no-verify)", file=sys.stderr)
        return EXIT_ERROR
    except RecursionError:
        print("mhagen: error: input nested too deeply", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only with -v
        if args.verbose:
            raise
        print(f"mhagen: internal error: {type(exc).__name__}: {_one_line(str(exc))[:200]} "
              "(a bug in mhagen: rerun with -v for the traceback and report it)", file=sys.stderr)
        return EXIT_ERROR


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (timeout, CI cancellation, systemd, docker stop) end a command as Ctrl-C
    does: what it was writing is removed, one line is printed, the exit code is 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, interrupt)
        except (ValueError, OSError):
            pass


def _one_line(text: str) -> str:
    return text.splitlines()[0] if text.strip() else "unknown error"


if __name__ == "__main__":
    sys.exit(main())
