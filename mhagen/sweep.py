"""Sweeps: every spec of a folder x every target, as separate jobs on a local process pool or a Ray
cluster, collected into one matrix.

A sweep is three kinds of job, each a plain picklable function of this module:

    trace     case (spec and weights) -> the traced program (JAX; anywhere)
    compile   program, target -> the module as bytes, once per compile-cache key (anywhere)
    run       case, program, module, target -> one cell of the matrix: run at every size
              `mhagen verify` checks, compared with the NumPy oracle (only where the device is)

On Ray, a run job asks for one unit of the custom resource named after the target's IREE driver
(`RESOURCE_BY_DRIVER`: `vulkan`, `cuda`, `hip`, `metal`, `local-task` for CPU targets, `local-sync`
for vmvx), so it lands only on a node started with that resource:

    ray start --head --port 6379 --resources '{"local-task": 1, "local-sync": 1}'
    ray start --address HEAD:6379 --resources '{"cuda": 1}'      # one unit per run at a time

A node that dies takes its running jobs with it; Ray runs them again elsewhere (`MAX_RETRIES`), and a
module lost with the node's object store is compiled again from the job that made it (Ray's lineage).
A host CPU target (`cpu`: `target-cpu=host`) is compiled by its run job, on the node that runs it,
since its code is for that node's CPU.

    matrix = sweep(find_specs("specs/"), parse_targets("cpu,vmvx,vulkan"), jobs=2)
    matrix = sweep(cases, targets, ray_address="auto")
    matrix.cell("encoder.toml", "vulkan").status      # "pass"
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CompileError, MhagenError, SpecError

if TYPE_CHECKING:
    from .spec import Spec
    from .targets import Target

__all__ = ["SweepCase", "Cell", "Matrix", "find_specs", "load_cases", "sweep", "RESOURCE_BY_DRIVER",
           "resource_for", "STATUSES", "MAX_RETRIES", "connect_ray", "run_many"]

# The Ray custom resource a run job needs, by IREE driver: the driver's own name.
RESOURCE_BY_DRIVER: dict[str, str] = {
    "local-task": "local-task",     # llvm-cpu targets, IREE's multithreaded CPU driver
    "local-sync": "local-sync",     # vmvx, IREE's reference VM
    "vulkan": "vulkan",
    "cuda": "cuda",
    "hip": "hip",                   # rocm targets
    "metal": "metal",
}

# What a cell can say, from best to worst. "refused": the target cannot compute this spec (e.g. a
# dtype it lacks); "compiled, not run": no device for it here (or on the cluster); "error": the job
# itself failed (a bug, or a job lost after every retry).
STATUSES = ("pass", "refused", "compiled, not run", "FAIL", "compile failed", "error")
FAILED = frozenset({"FAIL", "compile failed", "error"})

# Attempts after the first when a node (or its worker process) dies under a job. Expected errors
# (a compile failure, a mismatch) are results, not exceptions, so they are never retried.
MAX_RETRIES = 5
# How often the driver looks at the cluster while it waits: a resource that left with its last node
# would leave the jobs that need it waiting forever.
_POLL_S = 5.0


@dataclass(frozen=True)
class SweepCase:
    """One spec of a sweep: its name (the file, relative to the folder), the spec and its weights
    (a list in Keras `get_weights()` order, normalized)."""

    name: str
    spec: Spec
    weights: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Cell:
    """One entry of the matrix: `spec` x `target`.

    `max_abs` / `max_rel`: the largest errors against the oracle over every size checked (None when
    it did not run); `reason`: why it was refused, not run or failed (for FAIL, the worst place);
    `where`: the process or Ray node that ran it (not part of what a cell says)."""

    spec: str
    target: str
    status: str
    max_abs: float | None = None
    max_rel: float | None = None
    reason: str = ""
    where: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "target": self.target, "status": self.status, "max_abs": self.max_abs,
                "max_rel": self.max_rel, "reason": self.reason, "where": self.where}


@dataclass
class Matrix:
    """The sweep's result: one `Cell` per (spec, target), and how the work went."""

    specs: list[str]
    targets: list[str]
    cells: dict[tuple[str, str], Cell]
    executor: str = ""                 # "process pool (2 workers)" or "Ray cluster at ADDRESS"
    compiles: int = 0                  # compile jobs: one per distinct compile-cache key
    seconds: float = 0.0

    def cell(self, spec: str, target: str) -> Cell:
        return self.cells[(spec, target)]

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells.values() if c.status in FAILED]

    def counts(self) -> dict[str, int]:
        return {s: n for s in STATUSES if (n := sum(c.status == s for c in self.cells.values()))}

    def to_dict(self) -> dict[str, Any]:
        return {"specs": self.specs, "targets": self.targets, "executor": self.executor,
                "compiles": self.compiles, "seconds": round(self.seconds, 3), "counts": self.counts(),
                "cells": [self.cell(s, t).to_dict() for s in self.specs for t in self.targets]}


# ---------------------------------------------------------------------------------------------
# The cases: specs and weights, read and checked in the driver before any job starts.

def find_specs(folder: str | Path) -> list[Path]:
    """The `*.toml` files directly in `folder`, sorted; refuses a folder that is missing or has none."""
    path = Path(folder)
    if not path.exists():
        raise SpecError(f"Received an invalid value for argument `--sweep`, expected a folder of spec "
                        f"TOML files. Received: {folder} (no such folder)")
    if not path.is_dir():
        raise SpecError(f"Received an invalid value for argument `--sweep`, expected a folder of spec "
                        f"TOML files. Received: {folder} (not a folder)")
    specs = sorted(p for p in path.glob("*.toml") if p.is_file())
    if not specs:
        raise SpecError(f"Received an invalid value for argument `--sweep`, expected a folder of spec "
                        f"TOML files. Received: {folder} (no *.toml file in it)")
    return specs


def load_cases(paths: Sequence[str | Path], *, root: str | Path | None = None) -> list[SweepCase]:
    """Read every spec and its weights (`SPEC.npz` / `SPEC.safetensors` beside it, else seeded), and
    check each against the memory budget: a bad one refuses the whole sweep, naming the file, before
    any job starts."""
    from .budget import check as check_budget
    from .spec import Spec
    from .weights import normalize_weights
    from .weights_io import load_weights_file

    cases = []
    for p in map(Path, paths):
        name = p.relative_to(root).as_posix() if root is not None else p.name
        try:
            spec = Spec.load(p)
            check_budget(spec, weights_mode="parameters", verify=True)
            sidecar = next((s for s in (p.with_suffix(".npz"), p.with_suffix(".safetensors")) if s.is_file()),
                           None)
            weights = normalize_weights(spec, load_weights_file(sidecar) if sidecar else None)
        except MhagenError as exc:
            raise type(exc)(f"{name}: {_first_line(str(exc))}") from None
        cases.append(SweepCase(name, spec, tuple(weights)))
    return cases


def resource_for(target: Target) -> str:
    """The Ray custom resource a run job for `target` needs (see `RESOURCE_BY_DRIVER`)."""
    return RESOURCE_BY_DRIVER.get(target.driver, target.driver)


# ---------------------------------------------------------------------------------------------
# The jobs. Each is a module-level function of picklable arguments, run in a pool worker or a Ray
# worker; every expected error comes back as a value, never as an exception.

@dataclass(frozen=True)
class CompileOutcome:
    """What a compile job says, without the module (which travels on its own)."""

    status: str                 # "compiled", "refused" or "compile failed"
    reason: str = ""
    seconds: float = 0.0
    cached: bool = False
    where: str = ""


def trace_job(case: SweepCase) -> tuple[Any, str]:
    """(the program `mhagen verify` compiles for the case, weights as parameters: a `trace.Program`,
    ""), or (None, why the spec cannot be traced)."""
    from .trace import WeightsMode, trace

    try:
        return trace(case.spec, list(case.weights), weights_mode=WeightsMode.PARAMETERS), ""
    except MhagenError as exc:
        return None, _first_line(str(exc))


def compile_job(text: str, target_name: str, dtype: str) -> tuple[CompileOutcome, bytes | None]:
    """Compile program `text` for the target named `target_name` (as this node's mhagen defines it),
    through this node's compile cache: (outcome, the module's bytes or None)."""
    from .compile import check_dtype, compile_program
    from .targets import get_target

    try:
        target = get_target(target_name)
        check_dtype(target, dtype)
    except MhagenError as exc:
        return CompileOutcome("refused", _first_line(str(exc)), where=_where()), None
    try:
        compiled = compile_program(text, target)
    except CompileError as exc:
        return CompileOutcome("compile failed", exc.summary, where=_where()), None
    except MhagenError as exc:
        return CompileOutcome("refused", _first_line(str(exc)), where=_where()), None
    return CompileOutcome("compiled", "", compiled.seconds, compiled.cached, _where()), compiled.vmfb


def run_job(case: SweepCase, program: Any, module: bytes | None, target_name: str, seed: int) -> Cell:
    """Run `module` (compiled from `program` for `target_name`; None: compile it here first) at every
    size `mhagen verify` checks, on inputs drawn from `seed`, and compare with the oracle."""
    from .runtime import CompiledLayer, parameter_index
    from .targets import availability, get_target
    from .verify import check_layer, shape_checks
    from .weights import weight_names

    def cell(status: str, reason: str = "", **errors: Any) -> Cell:
        return Cell(case.name, target_name, status, reason=reason, where=_where(), **errors)

    if module is None:
        outcome, module = compile_job(program.text, target_name, case.spec.call.dtype_policy.compute)
        if module is None:
            return cell(outcome.status, outcome.reason)
    target = get_target(target_name)
    avail = availability(target)
    if not avail.runs:
        return cell("compiled, not run", avail.run_reason)
    weights = list(case.weights)
    checks, _ = shape_checks(case.spec)
    try:
        layer = CompiledLayer(program.interface, module, target, spec=case.spec,
                              parameters=parameter_index(dict(zip(weight_names(case.spec), weights))))
        comparisons = check_layer(layer, checks, weights, seed=seed)
    except MhagenError as exc:          # the module would not load or run: a failure of this target
        return cell("FAIL", _first_line(str(exc)))
    max_abs, max_rel = max(c.max_abs for c in comparisons), max(c.max_rel for c in comparisons)
    bad = [c.message for c in comparisons if not c.passed]
    return cell("FAIL" if bad else "pass", bad[0] if bad else "", max_abs=max_abs, max_rel=max_rel)


def _where() -> str:
    """This job's place: the Ray node (when run by Ray) or the host and process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"node {ray.get_runtime_context().get_node_id()[:12]}"
    return f"{socket.gethostname()} pid {os.getpid()}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


# ---------------------------------------------------------------------------------------------
# Executors: the same three calls on a process pool and on Ray.

class _Job:
    """A job on the pool: its call, and the future of its latest attempt (None until it starts)."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.future: Any = None
        self.alone = 0          # attempts it made alone in the pool


class _Pool:
    """A local process pool. Jobs start in fresh interpreters (spawn): the driver may hold JAX's
    threads, which a forked child would inherit half-locked. At most `jobs` are in the pool at once
    (the others wait here), so a pool that breaks takes only the jobs it was running.

    A worker that dies (a driver crash in native code, the OOM killer) breaks the whole pool and
    fails every job in it. The pool is then made again and those jobs run again one at a time, so
    the one that kills its worker is found: it is tried alone twice, then ends as an error cell;
    the others finish. Ray does the like when a node dies.

    Vulkan runs wait until nothing else is left: once a process has opened a Vulkan device on Mesa's
    lavapipe, two of its threads poll for the rest of its life (0.5-0.75 of a core each process,
    measured for tests/conftest.py), which would slow every job after it on the same worker."""

    holds_back = frozenset({"vulkan"})

    def __init__(self, jobs: int):
        from collections import deque

        self.jobs = jobs
        self.name = f"process pool ({jobs} worker{'s' if jobs > 1 else ''})"
        self._pool = self._new_pool()
        self._queue: Any = deque()          # jobs waiting for a worker
        self._suspects: Any = deque()       # jobs of a broken pool, to run again one at a time
        self._running: list[_Job] = []

    def _new_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[..., Any], *args: Any, resource: str | None = None) -> _Job:
        job = _Job(fn, args)
        self._queue.append(job)
        self._fill()
        return job

    def _fill(self) -> None:
        if self._suspects:                  # one at a time, alone in the pool
            if not self._running:
                self._start(self._suspects.popleft(), alone=True)
            return
        while self._queue and len(self._running) < self.jobs:
            self._start(self._queue.popleft())

    def _start(self, job: _Job, *, alone: bool = False) -> None:
        job.alone += alone
        job.future = self._pool.submit(job.fn, *job.args)
        self._running.append(job)

    def wait(self, handles: list[_Job], timeout: float) -> list[_Job]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        self._fill()
        futures = {job.future: job for job in self._running}
        done = [futures[f] for f in wait(futures, timeout=timeout, return_when=FIRST_COMPLETED).done]
        broken = [job for job in self._running if job.future.done()
                  and isinstance(job.future.exception(), BrokenProcessPool)]
        if broken:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            for job in broken:
                if len(broken) > 1 or job.alone < 2:    # not yet known to be the one: again, alone
                    self._suspects.append(job)
                    if job in done:
                        done.remove(job)
        self._running = [job for job in self._running if not job.future.done()]
        self._fill()
        return [job for job in done if job.future.done()]

    def get(self, handle: _Job) -> Any:
        return handle.future.result()

    def share(self, value: Any) -> Any:
        """What jobs are given for a value many of them need: here, the value."""
        return value

    def compiled(self, handle: _Job) -> tuple[CompileOutcome, Any]:
        """A finished compile job's outcome, and what a run job is given for its module."""
        return handle.future.result()

    def lacks(self, resource: str) -> str | None:
        return None            # every device of this machine is the pool's: run jobs find out themselves

    def compiles_apart(self, target: Any) -> bool:
        return True            # the same machine compiles and runs

    def cancel(self, handle: _Job) -> None:
        if handle in self._queue:
            self._queue.remove(handle)
        elif handle.future is not None:
            handle.future.cancel()

    def close(self, *, cancel: bool = False) -> None:
        if cancel:
            # Stop now: queued jobs are dropped and running ones killed (3.11 has no public way).
            workers = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for w in workers:
                w.kill()
            return
        self._pool.shutdown(wait=True)


class _Ray:
    """Jobs as Ray tasks on the cluster the driver is connected to (`connect_ray`)."""

    holds_back: frozenset[str] = frozenset()     # a Vulkan node of a cluster runs Vulkan jobs alone

    def __init__(self, *, owns_connection: bool):
        import ray

        self._ray = ray
        self._owns = owns_connection
        try:
            address = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - a Ray Client connection (ray://) does not say
            address = "the address given"
        self.name = f"Ray cluster at {address}"
        # SPREAD: a sweep is many short jobs, which Ray would otherwise queue on the driver's node.
        options = {"num_cpus": 1, "max_retries": MAX_RETRIES, "retry_exceptions": False,
                   "scheduling_strategy": "SPREAD"}
        self._options = options
        self._fns: dict[Callable[..., Any], Any] = {}
        self._modules: dict[Any, Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any, resource: str | None = None) -> Any:
        if fn not in self._fns:
            returns = {"num_returns": 2} if fn is compile_job else {}
            self._fns[fn] = self._ray.remote(**self._options, **returns)(fn)
        remote = self._fns[fn]
        if resource is not None:
            remote = remote.options(resources={resource: 1})
        refs = remote.remote(*args)
        if fn is compile_job:       # (outcome, module): the driver waits on the outcome alone, and the
            outcome, module = refs  # module goes from the compiling node to the running one directly
            self._modules[outcome] = module
            return outcome
        return refs

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        done, _ = self._ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def get(self, handle: Any) -> Any:
        return self._ray.get(handle)

    def share(self, value: Any) -> Any:
        """One copy in the object store for every job that needs `value` (a case's weights)."""
        return self._ray.put(value)

    def compiled(self, handle: Any) -> tuple[CompileOutcome, Any]:
        """The outcome, and the module's object reference: Ray fetches it for the run job from the
        node that compiled it, or compiles it again if that node died."""
        return self._ray.get(handle), self._modules.pop(handle)

    def lacks(self, resource: str) -> str | None:
        if self._ray.cluster_resources().get(resource, 0) > 0:
            return None
        return (f"no node of the Ray cluster has the `{resource}` resource (start one with "
                f"`ray start --address ... --resources '{{\"{resource}\": 1}}'`)")

    def compiles_apart(self, target: Any) -> bool:
        return target.arch != "host"    # host code is for the CPU of the node that runs it

    def cancel(self, handle: Any) -> None:
        self._ray.cancel(handle, force=True)

    def close(self, *, cancel: bool = False) -> None:
        if self._owns:
            self._ray.shutdown()


def connect_ray(address: str) -> bool:
    """Connect this process to the Ray cluster at `address` ("auto", "HOST:PORT" or "ray://HOST:PORT");
    refuses in one line when Ray is not installed or nothing answers there. False when this process
    was connected already (the connection is then left as it is)."""
    try:
        import ray
    except ImportError:
        raise MhagenError("--ray needs Ray, which is not installed; install it with "
                          "pip install 'mhagen[ray]' (or pip install 'ray>=2.9')") from None
    if ray.is_initialized():        # this process is connected already (a notebook, a test)
        return False
    if address != "auto":
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise MhagenError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                              "start one with `ray start --head`, or give its address") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MhagenError(f"--ray {address}: cannot connect to a Ray cluster ({_first_line(str(exc))}); "
                          "start one with `ray start --head`, or give its address") from None
    return True


def _host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` (optionally `ray://HOST:PORT`) -> (host, port); refuses anything else."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in rest:
        raise MhagenError(f"Received an invalid value for argument `--ray`, expected `auto`, HOST:PORT or "
                          f"ray://HOST:PORT. Received: --ray={address!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------------------------------
# The driver.

def sweep(cases: Sequence[SweepCase], targets: Sequence[Target], *, seed: int = 0, jobs: int | None = None,
          ray_address: str | None = None, on_cell: Callable[[Cell, int, int], None] | None = None) -> Matrix:
    """Verify every case on every target; returns the matrix (cases x targets).

    `jobs`: workers of the local process pool (default `os.cpu_count()`); `ray_address`: run on the
    Ray cluster there instead ("auto": the one `ray start` made on this machine, or RAY_ADDRESS).
    `on_cell(cell, done, total)` hears of each cell as it is filled.

        matrix = sweep(load_cases(find_specs("specs")), parse_targets("cpu,vulkan"), jobs=2)
    """
    executor = _executor(jobs, ray_address)
    start = time.perf_counter()
    try:
        matrix = _drive(executor, list(cases), list(targets), seed, on_cell)
    except BaseException:
        executor.close(cancel=True)
        raise
    executor.close()
    matrix.executor, matrix.seconds = executor.name, time.perf_counter() - start
    return matrix


def _executor(jobs: int | None, ray_address: str | None) -> Any:
    _check_executor(jobs, ray_address)
    if ray_address is not None:
        return _Ray(owns_connection=connect_ray(ray_address))
    return _Pool(jobs or os.cpu_count() or 1)


def check_executor(jobs: int | None, ray_address: str | None) -> None:
    """Refuse, in one line, --jobs with --ray, --jobs < 1 and a malformed --ray address."""
    _check_executor(jobs, ray_address)


def _check_executor(jobs: int | None, ray_address: str | None) -> None:
    if jobs is not None and ray_address is not None:
        raise MhagenError("--jobs and --ray were both given; --jobs sizes the local pool, a Ray cluster "
                          "is sized by its nodes")
    if jobs is not None and jobs < 1:
        raise MhagenError(f"Received an invalid value for argument `--jobs`, expected a positive integer. "
                          f"Received: --jobs={jobs}")
    if ray_address is not None and ray_address != "auto":
        _host_port(ray_address)


def open_executor(jobs: int | None = None, ray_address: str | None = None) -> Any:
    """A local process pool or a Ray connection for several `run_many` calls; `.close()` it after."""
    return _executor(jobs, ray_address)


def run_many(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *,
             resource_of: Callable[[tuple[Any, ...]], str | None] = lambda args: None,
             jobs: int | None = None, ray_address: str | None = None,
             executor: Any = None) -> Iterator[tuple[int, Any]]:
    """`fn(*args)` for every `args` of `calls`, on a local process pool (`jobs` workers) or the Ray
    cluster at `ray_address`: yields (index into `calls`, result) as each finishes; a call whose job
    raised (or was lost after every retry) yields the exception instead. `fn` must be a module-level
    function; on Ray a call needs one unit of the resource `resource_of(args)` names (None: any node).

        for i, result in run_many(run_case, [(spec, "vulkan", 0)], resource_of=lambda a: "vulkan"):
            ...
    """
    ex = executor or _executor(jobs, ray_address)
    try:
        pending = {ex.submit(fn, *args, resource=resource_of(args)): i for i, args in enumerate(calls)}
        while pending:
            for h in ex.wait(list(pending), _POLL_S):
                i = pending.pop(h)
                try:
                    result = ex.get(h)
                except Exception as exc:  # noqa: BLE001 - handed to the caller, as a result
                    result = exc
                yield i, result
    except BaseException:
        if executor is None:
            ex.close(cancel=True)
        raise
    if executor is None:
        ex.close()


def _drive(ex: Any, cases: list[SweepCase], targets: list[Any], seed: int,
           on_cell: Callable[[Cell, int, int], None] | None) -> Matrix:
    """Trace every case, compile each distinct (program, target) once, run each cell where its device
    is; each job starts as soon as the ones it needs have finished."""
    from .compile import _cache_key     # the compile cache's own key: one compile job per entry

    matrix = Matrix([c.name for c in cases], [t.name for t in targets], {})
    total = len(cases) * len(targets)
    pending: dict[Any, tuple[str, Any]] = {}       # handle -> ("trace", case) / ("compile", key) / ("run", cell)
    compiled: dict[str, tuple[CompileOutcome, Any]] = {}    # cache key -> outcome, module for run jobs
    waiting: dict[str, list[tuple[Any, Any, Any]]] = {}     # cache key -> (case, program, target) to run
    held: list[tuple[Any, Any, Any, Any]] = []     # runs started when nothing else is left (`holds_back`)
    shared = {case.name: ex.share(case) for case in cases}

    def fill(c: Cell) -> None:
        matrix.cells[(c.spec, c.target)] = c
        if on_cell:
            on_cell(c, len(matrix.cells), total)

    def start_run(case: SweepCase, program: Any, module: Any, target: Any, *, now: bool = False) -> None:
        resource = resource_for(target)
        lack = ex.lacks(resource)
        if lack:
            fill(Cell(case.name, target.name, "compiled, not run", reason=lack))
        elif resource in ex.holds_back and not now:
            held.append((case, program, module, target))
        else:
            h = ex.submit(run_job, shared[case.name], program, module, target.name, seed, resource=resource)
            pending[h] = ("run", (case, target))

    def after_compile(key: str, case: SweepCase, program: Any, target: Any) -> None:
        outcome, module = compiled[key]
        if outcome.status == "compiled":
            start_run(case, program, module, target)
        else:
            fill(Cell(case.name, target.name, outcome.status, reason=outcome.reason, where=outcome.where))

    def traced(case: SweepCase, program: Any) -> None:
        shared_program = ex.share(program)
        for target in targets:
            if not ex.compiles_apart(target):
                start_run(case, shared_program, None, target)
                continue
            key = _cache_key(target, [], program.text)
            if key in compiled:
                after_compile(key, case, shared_program, target)
                continue
            if key not in waiting:
                h = ex.submit(compile_job, program.text, target.name, case.spec.call.dtype_policy.compute)
                pending[h] = ("compile", key)
                waiting[key] = []
                matrix.compiles += 1
            waiting[key].append((case, shared_program, target))

    for case in cases:
        pending[ex.submit(trace_job, shared[case.name])] = ("trace", case)
    while pending or held:
        if not pending:
            for run in held:
                start_run(*run, now=True)
            held.clear()
            continue
        done = ex.wait(list(pending), _POLL_S)
        if not done:
            _give_up_stranded(ex, pending, fill)
        for h in done:
            kind, info = pending.pop(h)
            try:
                value = ex.compiled(h) if kind == "compile" else ex.get(h)
            except Exception as exc:  # noqa: BLE001 - a bug in a job, or a job lost after every retry
                why = f"{type(exc).__name__}: {_first_line(str(exc))}"[:300]
                if kind == "trace":
                    for target in targets:
                        fill(Cell(info.name, target.name, "error", reason=why))
                elif kind == "compile":
                    value = (CompileOutcome("error", why), None)
                else:
                    fill(Cell(info[0].name, info[1].name, "error", reason=why))
                if kind != "compile":
                    continue
            if kind == "trace":
                program, why = value
                if program is None:
                    for target in targets:
                        fill(Cell(info.name, target.name, "refused", reason=why))
                else:
                    traced(info, program)
            elif kind == "compile":
                compiled[info] = value
                for case, program, target in waiting.pop(info):
                    after_compile(info, case, program, target)
            else:
                fill(value)
    return matrix


def _give_up_stranded(ex: Any, pending: dict[Any, tuple[str, Any]], fill: Callable[[Cell], None]) -> None:
    """Run jobs whose resource no live node has any longer (its last node died) would wait forever:
    cancel them and say so."""
    for h, (kind, info) in list(pending.items()):
        if kind != "run":
            continue
        case, target = info
        lack = ex.lacks(resource_for(target))
        if lack:
            ex.cancel(h)
            del pending[h]
            fill(Cell(case.name, target.name, "compiled, not run", reason=lack))


# ---------------------------------------------------------------------------------------------
# `mhagen verify --sweep DIR`: the command line's side.

def add_verify_options(p: Any) -> None:
    """The sweep's options of `mhagen verify`."""
    p.add_argument("--sweep", metavar="DIR", help="verify every *.toml spec in DIR for every target "
                   "(each with its SPEC.npz beside it, else seeded weights) and print the matrix")
    p.add_argument("--jobs", type=int, metavar="N", help="with --sweep: worker processes (default: one per "
                   "CPU)")
    p.add_argument("--ray", metavar="ADDRESS", help="with --sweep: run on a Ray cluster (`auto`, or "
                   "HOST:PORT of its head); needs pip install 'mhagen[ray]'")


def check_verify_options(args: Any) -> bool:
    """Whether `mhagen verify` sweeps; refuses contradictory options before any work."""
    if args.sweep is None:
        for option in ("jobs", "ray"):
            if getattr(args, option) is not None:
                raise MhagenError(f"--{option} goes with --sweep DIR (a single spec runs in this process)")
        if args.spec is None:
            raise SpecError("mhagen verify needs a spec TOML file, or --sweep DIR for a folder of them")
        return False
    if args.spec is not None:
        raise SpecError(f"a spec ({args.spec}) and --sweep {args.sweep} were both given; use one")
    if args.weights is not None:
        raise SpecError("--weights does not go with --sweep: each spec's weights are SPEC.npz (or "
                        "SPEC.safetensors) beside it, else seeded")
    if getattr(args, "reference", None) is not None:
        raise SpecError("--reference does not go with --sweep: a source model's output belongs to one spec")
    _check_executor(args.jobs, args.ray)
    return True


_SHORT = {"pass": "pass", "FAIL": "FAIL", "refused": "refused", "compiled, not run": "not run",
          "compile failed": "compile failed", "error": "error"}


def cmd_sweep(args: Any, targets: list[Target]) -> int:
    """`mhagen verify --sweep DIR --targets ...`: prints the matrix (and writes it with --json);
    exit 1 when a cell failed (FAIL, compile failed, error)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .progress import Steps

    folder = Path(args.sweep)
    cases = load_cases(find_specs(folder), root=folder)
    if args.json:
        from .cli import _check_writable

        _check_writable(Path(args.json), "--json")
    with Steps(Console(stderr=True)) as steps:
        steps.start(f"sweep: {len(cases)} specs x {len(targets)} targets")
        matrix = sweep(cases, targets, seed=args.seed, jobs=args.jobs, ray_address=args.ray,
                       on_cell=lambda c, done, total: steps.start(
                           f"sweep: {done}/{total} cells ({c.spec} x {c.target}: {c.status})"))
    table = Table(title=Text(f"mhagen verify --sweep {args.sweep}"))
    table.add_column("spec", overflow="fold")
    for t in matrix.targets:
        table.add_column(t, overflow="fold")
    for s in matrix.specs:
        cells = [matrix.cell(s, t) for t in matrix.targets]
        table.add_row(s, *(Text(_SHORT[c.status] + (f" {c.max_abs:.2g}" if c.max_abs is not None else ""),
                                style="bold red" if c.status in FAILED else "") for c in cells))
    console = Console()
    console.print(table)
    # Why cells did not pass, one line per distinct reason (a target refusing a dtype says it once).
    reasons: dict[tuple[str, str], list[str]] = {}
    for c in (matrix.cell(s, t) for s in matrix.specs for t in matrix.targets):
        if c.status != "pass":
            reasons.setdefault((c.status, c.reason), []).append(f"{c.spec} x {c.target}")
    for (status, reason), where in reasons.items():
        listed = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        console.print(Text(f"{_SHORT[status]}: {listed}: {reason}"))
    counts = ", ".join(f"{n} {_SHORT[s]}" for s, n in matrix.counts().items())
    console.print(Text(f"{len(matrix.cells)} cells: {counts}; {matrix.compiles} compile jobs; "
                       f"{matrix.seconds:.1f} s on a {matrix.executor}"))
    if args.json:
        from .cli import _write_text_atomic
        import json

        _write_text_atomic(Path(args.json), json.dumps(matrix.to_dict(), indent=2))
    return 1 if matrix.failed else 0
