"""One fuzz job: a spec on one target, compiled, run where it can run, compared with the oracle.

`run_case(spec_dict, target_name, seed)` is a plain, picklable function returning a JSON-ready dict,
so that any executor can run it: the fuzzer's `Worker` (a child process, so that a runtime crash
kills only the child), a process pool, or a cluster.

    result = run_case(spec.to_dict(), "vulkan", seed=3)
    result["status"]      # "passed" | "failed" | "refused" | "compiled-not-run"
    result["kind"]        # for a failure: "mismatch" | "compile-error" | "runtime-error" | "crash" | ...
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import MhagenError
from ..spec import Spec

__all__ = ["run_case", "calls", "signature", "Worker", "STATUSES"]

STATUSES = ("passed", "failed", "refused", "compiled-not-run")


@functools.lru_cache(maxsize=4)
def _prepared(spec_toml: str) -> tuple[Spec, list[np.ndarray], Any]:
    """The spec, its seeded weights and its program (inline weights: one self-contained MLIR file
    that a reproducer replays with IREE's tools alone). Shared by the targets of one case."""
    from ..trace import WeightsMode, trace
    from ..weights import init_weights

    spec = Spec.from_toml(spec_toml)
    weights = init_weights(spec)
    return spec, weights, trace(spec, weights, weights_mode=WeightsMode.INLINE)


def calls(spec: Spec) -> list[Any]:
    """The sizes a case is called at: those `mhagen verify` checks, less batches served in chunks
    (a Python loop of the runtime, not the compiled code): the declared shape, or for a dynamic
    spec its buckets and one size between them (padded into the next one)."""
    from ..verify import shape_checks

    return [c for c in shape_checks(spec)[0] if c.why != "in chunks"]


@functools.lru_cache(maxsize=16)
def _call_data(spec_toml: str, index: int, seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Inputs and the oracle's outputs of call `index`, computed once for every target."""
    from ..verify import expected_outputs
    from .draw import draw_inputs

    spec, weights, _ = _prepared(spec_toml)
    check = calls(spec)[index]
    inputs = draw_inputs(check.spec, seed + index, weights)
    return inputs, expected_outputs(check.spec, weights, inputs)


def call_data(spec: Spec, index: int, seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(inputs, expected outputs) of call `index` of `calls(spec)` for input seed `seed`."""
    return _call_data(spec.to_toml(), index, seed)


def run_case(spec_dict: dict[str, Any], target_name: str, seed: int) -> dict[str, Any]:
    """Compile the spec for `target_name` (through the compile cache), run it here at every size of
    `calls(spec)` on inputs drawn from `seed` if the target runs here, and compare with the oracle
    under the compute dtype's tolerance.

    Returns {"target", "status", "kind", "message", "max_abs", "call", "compile_seconds",
    "cached", "run_seconds"}: "status" one of `STATUSES`; for a failure "kind" and, for a mismatch
    or runtime error, "call" (the index into `calls(spec)`) and the mismatch line in "message".
    """
    from ..compile import check_supported, compile_program
    from ..errors import CompileError, MhagenError, TargetError
    from ..runtime import CompiledLayer
    from ..targets import availability, get_target
    from ..verify import check_outputs

    out: dict[str, Any] = {"target": target_name, "status": "failed", "kind": "", "message": "",
                           "max_abs": None, "call": None, "compile_seconds": 0.0, "cached": False,
                           "run_seconds": 0.0}
    spec = Spec.from_dict(spec_dict)
    try:
        target = get_target(target_name)
        check_supported(target, spec)
    except TargetError as exc:          # documented, up-front refusals (dtype, CPU features)
        return {**out, "status": "refused", "message": str(exc)}
    try:
        _, _, program = _prepared(spec.to_toml())
    except MhagenError as exc:          # a valid spec that does not trace: a bug of mhagen
        return {**out, "kind": "trace-error", "message": _line(str(exc))}
    avail = availability(target)
    if not avail.compiles:              # e.g. a backend this IREE compiler was built without
        return {**out, "status": "refused", "message": avail.compile_reason}
    try:
        compiled = compile_program(program.text, target)
    except CompileError as exc:
        return {**out, "kind": "compile-error", "message": _compile_message(exc)}
    out.update(compile_seconds=round(compiled.seconds, 3), cached=compiled.cached)
    if not avail.runs:
        return {**out, "status": "compiled-not-run", "message": avail.run_reason}
    start, index = time.perf_counter(), None
    try:
        layer = CompiledLayer(program.interface, compiled.vmfb, target, spec=spec)
        worst = 0.0
        for index, check in enumerate(calls(spec)):
            inputs, expected = call_data(spec, index, seed)
            result = layer(**inputs)
            got = list(result) if isinstance(result, tuple) else [result]
            comparisons = check_outputs(check.spec, got, expected)
            worst = max([worst] + [c.max_abs for c in comparisons])
            bad = [c for c in comparisons if not c.passed]
            if bad:
                return {**out, "kind": "mismatch", "call": index, "max_abs": worst,
                        "message": f"query {tuple(check.spec.geometry.query_shape)}: {bad[0].message}",
                        "run_seconds": round(time.perf_counter() - start, 3)}
    except MhagenError as exc:
        return {**out, "kind": "runtime-error", "call": index, "message": _line(str(exc)),
                "run_seconds": round(time.perf_counter() - start, 3)}
    return {**out, "status": "passed", "max_abs": worst, "message": "",
            "run_seconds": round(time.perf_counter() - start, 3)}


def _line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _compile_message(exc: Any) -> str:
    """The summary and the compiler's first error line (what a shrink must keep failing with)."""
    first = next((ln.strip() for ln in exc.diagnostics.splitlines() if "error" in ln.lower()), "")
    return f"{exc.summary}: {first}" if first else exc.summary


def signature(result: dict[str, Any]) -> tuple[str, str]:
    """How a failure fails, for "still fails the same way" while shrinking: its kind and, for a
    mismatch, NaN/infinity versus wrong numbers; for a compile error, the compiler's first error
    with its shapes and numbers taken out (they change as the spec shrinks)."""
    kind, message = result.get("kind", ""), result.get("message", "")
    if kind == "mismatch":
        return kind, "non-finite" if re.search(r"\b(nan|inf)\b|NaN|infinity", message) else "values"
    if kind == "compile-error":
        detail = message.split(": ", 1)[1] if ": " in message else ""
        detail = re.sub(r"<[^>]*>|tensor<[^>]*>|\d+", "#", re.sub(r"^\S*:\d+:\d+:\s*", "", detail))
        return kind, detail[:120]
    if kind == "crash":
        return kind, message.split(" (")[0]
    return kind, ""


# -- a child process per job stream: a runtime crash ends the child, not the fuzzer ------------------

def _serve(conn: Any) -> None:
    """The worker's loop: receive (function, args), send back its result or the exception's line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result: Any = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported as the job's failure, the worker goes on
            result = {"status": "failed", "kind": "internal-error",
                      "message": f"{type(exc).__name__}: {_line(str(exc))}"}
        conn.send(result)


class Worker:
    """Runs jobs one at a time in a child process (spawned: no JAX or IREE state is inherited).

    A child that dies (a segfault in a driver) or outlives `timeout` seconds is replaced, and the
    job is answered {"status": "failed", "kind": "crash" | "timeout", ...}.

        with Worker() as worker:
            result = worker(run_case, spec.to_dict(), "vulkan", 3)
    """

    def __init__(self, *, timeout: float = 600.0):
        self.timeout = timeout
        self._process: Any = None
        self._conn: Any = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child,), daemon=True, name="mhagen-fuzz-worker")
        try:
            process.start()
        except (OSError, RuntimeError) as exc:   # e.g. spawned from an unguarded `__main__` script
            parent.close()
            raise MhagenError(f"cannot start the fuzz worker process: {_line(str(exc))}") from None
        finally:
            child.close()
        self._process, self._conn = process, parent

    def close(self) -> None:
        """Stop the child (it is killed: a job in flight is abandoned)."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._conn.close()
        self._process = self._conn = None

    def __call__(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        if self._process is None or not self._process.is_alive():
            self.close()
            self._start()
        target = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        try:
            self._conn.send((fn, args))
            if self._conn.poll(self.timeout):
                return self._conn.recv()
            self.close()
            return {"target": target, "status": "failed", "kind": "timeout",
                    "message": f"no answer within {self.timeout:g} s (the child was killed)"}
        except (EOFError, OSError, BrokenPipeError):
            self._process.join()
            code = self._process.exitcode
            self.close()
            what = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                    else f"exited with status {code}")
            return {"target": target, "status": "failed", "kind": "crash",
                    "message": f"the process running it {what} (a crash in the compiler or runtime)"}
        except BaseException:               # Ctrl-C: the job in flight is abandoned
            self.close()
            raise
