"""The benchmark: a compiled module against the same layer under `jax.jit` and the NumPy oracle.

For one spec, in one process and on the same inputs and weights, it times

- **mhagen**: the module compiled for a target, called through the IREE Python runtime with the
  inputs already on the device;
- **jax.jit**: the layer in Keras' own formulation (`trace.forward(spec, attention="keras")`, the
  weights closed over as constants), jitted by XLA on the CPU: what a user gets from calling
  `jax.jit` on the Keras layer;
- **oracle**: the float64 NumPy oracle, where one call is cheap enough;
- **peers** (`peers=("onnxruntime", ...)`, `mhagen bench --peers onnxruntime,openvino`): the same
  layer with the same weights in ONNX Runtime and OpenVINO (`mhagen.peers`). Each is checked against
  the oracle at its precision's tolerance before it is timed; one that disagrees is reported with
  its error and not timed.

Every runtime gets the same number of threads (`threads`, default the cores this process may use):
`mhagen bench --threads 1` pins the process to one core (so XLA sees one) and sets IREE's worker
count, ONNX Runtime's intra-op threads and OpenVINO's INFERENCE_NUM_THREADS to 1.

Calls are warmed up, then interleaved (mhagen, jax, mhagen, ...) so that load from other processes
hits both alike; the median is reported. GFLOP/s counts the spec's multiply-adds (`Spec.flops`).
Peak memory is measured in a fresh subprocess per implementation: the most resident memory the
first call adds to a process that already holds the module and the inputs (Linux `VmHWM` after
resetting it, minus `VmRSS` before the call).

    result = bench_spec(Spec.load("benchmarks/bert_base_b1_t512.toml"))
    result.rows["mhagen"].median_ms, result.speedup

`mhagen bench SPEC` prints one spec; `mhagen bench --suite benchmarks` runs every spec of a folder and
writes `results.md`, `results.json` and `results.png` there. `mhagen bench DIR` times a bundle's
module alone with the IREE runtime (`mhagen.runtime.timing`: no spec, no JAX), as its `run.py --bench` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MhagenError
from .spec import Spec

__all__ = ["ImplResult", "SpecResult", "bench_spec", "run_suite", "add_cli", "IMPLEMENTATIONS", "set_threads"]

IMPLEMENTATIONS = ("mhagen", "jax", "oracle")
# The oracle holds float64 scores and probabilities; past this many score elements one call takes
# seconds and gigabytes, so it is skipped (the long-context specs).
ORACLE_MAX_SCORES = 1 << 23
# Past ORACLE_MAX_SCORES, outputs are checked against the oracle on this many query rows at each end.
ORACLE_CHECK_ROWS = 64
# Repetitions: enough for a stable median, capped by a time budget per implementation and spec.
DEFAULT_REPEATS = 60
TIME_BUDGET_S = 6.0


@dataclass
class ImplResult:
    """One implementation's timings on one spec (milliseconds), or why it was skipped."""

    name: str
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    note: str = ""
    precision: str = "float32"
    max_abs_vs_oracle: float | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def min_ms(self) -> float | None:
        return min(self.times_ms) if self.times_ms else None

    def gflops(self, flops: int) -> float | None:
        m = self.median_ms
        return flops / (m * 1e6) if m else None


@dataclass
class SpecResult:
    """Everything measured for one spec."""

    name: str
    spec: Spec
    target: str
    flops: int
    data_mb: float
    path: str
    compile_s: float
    build_s: float
    max_abs_vs_jax: float | None
    rows: dict[str, ImplResult]
    threads: int = 0
    oracle_rows: str = ""

    @property
    def speedup(self) -> float | None:
        """jax.jit median / mhagen median: above 1, the compiled module is faster."""
        return self.ratio("mhagen")

    def ratio(self, impl: str) -> float | None:
        a, b = self.rows["jax"].median_ms, self.rows[impl].median_ms
        return a / b if a and b else None

    def to_dict(self) -> dict[str, Any]:
        rows = {}
        for name, r in self.rows.items():
            rows[name] = {"median_ms": r.median_ms, "min_ms": r.min_ms, "times_ms": r.times_ms,
                          "gflops": r.gflops(self.flops), "peak_mb": r.peak_mb,
                          "ratio_to_jax": self.ratio(name), "note": r.note, "precision": r.precision,
                          "max_abs_vs_oracle": r.max_abs_vs_oracle}
        return {"name": self.name, "spec": self.spec.to_dict(), "target": self.target,
                "flops": self.flops, "data_mb": self.data_mb, "attention_path": self.path,
                "compile_s": self.compile_s, "build_s": self.build_s,
                "max_abs_vs_jax": self.max_abs_vs_jax, "threads": self.threads,
                "oracle_checked_rows": self.oracle_rows,
                "speedup_vs_jax": self.speedup, "results": rows}


# ---- the implementations -----------------------------------------------------------------------
def _inputs(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    from .verify import random_inputs

    return random_inputs(spec, seed)


def _data_mb(spec: Spec, weights: Sequence[np.ndarray]) -> float:
    """Inputs + weights + outputs, in MiB: what any implementation must hold."""
    from .trace import input_signature, output_signature

    def size(shape: Sequence[int], dtype: str) -> int:
        return math.prod(shape) * np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize

    total = sum(size(t.shape, t.dtype) for t in input_signature(spec) + output_signature(spec))
    total += sum(np.asarray(w).nbytes for w in weights)
    return total / 2**20


def _mhagen_call(spec: Spec, weights: Any, inputs: dict[str, np.ndarray], target: str
                 ) -> tuple[Callable[[], Any], Callable[[Any], np.ndarray], Any]:
    """(call, to_host, layer): `call()` runs the compiled module on inputs already on the device."""
    from .pipeline import build

    layer = build(spec, target=target, weights=weights, verify=False)   # bench checks the oracle itself
    fn, arrays, _ = layer.prepare(**inputs)
    # The layer's own device and function table: the timed call is the module alone, without the
    # argument checks and host transfers of `layer(...)`.
    device = layer._device
    args = [device.to_device(np.ascontiguousarray(a)) for a in arrays]
    function = layer._table[fn["name"]]

    def call() -> Any:
        return function(*args)

    def to_host(result: Any) -> np.ndarray:
        first = result[0] if isinstance(result, (list, tuple)) else result
        return device.to_host(first)

    return call, to_host, layer


def _jax_call(spec: Spec, weights: Any, inputs: dict[str, np.ndarray]
              ) -> tuple[Callable[[], Any], Callable[[Any], np.ndarray]]:
    """The Keras formulation under `jax.jit`, compiled ahead of the timed calls."""
    import jax

    from .trace import forward, input_signature

    fn = forward(spec, attention="keras")
    consts = [np.asarray(w) for w in weights]
    args = [jax.device_put(np.asarray(inputs[t.name]).astype(t.dtype)) for t in input_signature(spec)]
    compiled = jax.jit(lambda *xs: fn(*xs, *consts)).lower(*args).compile()

    def call() -> Any:
        return jax.block_until_ready(compiled(*args))

    def to_host(result: Any) -> np.ndarray:
        return np.asarray(result[0] if isinstance(result, (list, tuple)) else result)

    return call, to_host


def _oracle_call(spec: Spec, weights: Any, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
    from .oracle import reference

    args = {k: v for k, v in inputs.items() if k != "dropout_key"}
    return lambda: reference(spec, weights, **args)


def _expected_rows(spec: Spec, weights: Any, inputs: dict[str, np.ndarray]
                   ) -> tuple[Any, np.ndarray | None, str]:
    """(rows, the oracle's output at those query rows, which rows): every row where one oracle call
    is cheap (`ORACLE_MAX_SCORES`); past that, for 3-D specs, the first and last
    `ORACLE_CHECK_ROWS` rows (a query row's output depends on its own row alone); else nothing."""
    from .oracle import reference

    args = {k: v for k, v in inputs.items() if k != "dropout_key"}
    g = spec.geometry
    if math.prod(g.scores_shape) <= ORACLE_MAX_SCORES:
        return slice(None), np.asarray(reference(spec, weights, **args)), "all"
    if g.rank != 3 or g.attention_axes != (1,) or spec.call.return_attention_scores or spec.has_dropout:
        return None, None, "none (the oracle is too large for one call)"
    T, S = g.query_shape[1], g.value_shape[1]
    r = ORACLE_CHECK_ROWS
    rows = np.r_[0:r, T - r:T]
    # The same layer on those query rows: the causal mask and the window become an explicit mask
    # (their band is aligned to the full T), and-ed with the spec's own mask cut to the rows.
    band = np.ones((len(rows), S), dtype=bool)
    if spec.call.use_causal_mask:
        band &= rows[:, None] >= np.arange(S)[None, :]
    if spec.layer.sliding_window is not None:
        band &= np.abs(rows[:, None] - np.arange(S)[None, :]) < spec.layer.sliding_window
    mask = band[None, None]                                     # (1, 1, rows, S)
    if g.mask_shape is not None:
        m = np.asarray(inputs["attention_mask"]) != 0
        while m.ndim < 4:                                       # Keras inserts the heads axis
            m = np.expand_dims(m, m.ndim - 2)
        mask = mask & m[:, :, rows, :]
    B, N = g.query_shape[0], g.num_heads
    mask = np.broadcast_to(mask, (B, N if mask.shape[1] > 1 else 1, len(rows), S))
    d = spec.to_dict()
    d["layer"].pop("sliding_window", None)
    d["call"].update(query=[B, len(rows), g.query_shape[2]], use_causal_mask=False,
                     attention_mask=list(mask.shape))
    part = Spec.from_dict(d)
    args.update(query=args["query"][:, rows], attention_mask=mask)
    expected = np.asarray(reference(part, weights, **args))
    return rows, expected, f"{len(rows)} of {T} query rows (first and last {r})"


def _oracle_error(spec: Spec, got: np.ndarray, rows: Any, expected: np.ndarray | None,
                  precision: str) -> tuple[float | None, str]:
    """(max |err| against the oracle, "" or why it does not match) at `precision`'s tolerance."""
    from .verify import TOLERANCES, compare

    if expected is None:
        return None, ""
    result = compare(np.asarray(got)[:, rows] if isinstance(rows, np.ndarray) else got, expected,
                     tol=TOLERANCES[precision])
    return result.max_abs, "" if result.passed else f"does not match the oracle: {result.message}"


def _oracle_skip(spec: Spec) -> str:
    n = math.prod(spec.geometry.scores_shape)
    if n > ORACLE_MAX_SCORES:
        return f"skipped: {n * 8 / 2**30:.1f} GiB of float64 scores per array"
    return ""


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


# ---- peak memory in a fresh process ------------------------------------------------------------
def _status_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise MhagenError(f"/proc/self/status has no {field_name}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _memory_child(impl: str, spec_path: str, target: str, seed: int, threads: int) -> dict[str, float]:
    """Runs in a fresh process: load `impl`, put the inputs in place, measure one call."""
    import resource

    spec = Spec.load(spec_path)
    from .weights import init_weights

    set_threads(threads)
    weights = init_weights(spec)
    inputs = _inputs(spec, seed)
    if impl == "mhagen":
        call, _, _ = _mhagen_call(spec, weights, inputs, target)
    elif impl == "jax":
        call, _ = _jax_call(spec, weights, inputs)
    elif impl == "oracle":
        call = _oracle_call(spec, weights, inputs)
    else:
        from .peers import make_peer

        call = make_peer(impl, spec, weights, inputs, threads=threads).call
    del inputs  # the module holds its own (device) copies
    before = _status_mb("VmRSS")
    if _reset_peak():
        result = call()
        peak = _status_mb("VmHWM")
    else:   # no reset: the high-water mark so far is a lower bound of the call's own
        result = call()
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _status_mb("VmRSS"))
    del result
    return {"rss_before_mb": before, "hwm_mb": peak, "peak_mb": max(0.0, peak - before)}


def measure_peak(impl: str, spec: Spec, *, target: str = "cpu", seed: int = 0, threads: int | None = None,
                 timeout: float = 600.0) -> tuple[float | None, str]:
    """(peak MiB of one `impl` call, note) measured in a fresh subprocess on `threads` threads."""
    from .peers import default_threads

    with tempfile.TemporaryDirectory(prefix="mhagen-bench-") as tmp:
        path = Path(tmp) / "spec.toml"
        path.write_text(spec.to_toml())
        cmd = [sys.executable, "-m", "mhagen.bench", "--memory-child", impl, str(path), target, str(seed),
               str(threads or default_threads())]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"memory run timed out after {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory run failed: {tail[:200]}"
    return float(json.loads(lines[-1])["peak_mb"]), ""


# ---- one spec ----------------------------------------------------------------------------------
def set_threads(threads: int | None = None) -> int:
    """Run this process on `threads` cores (default: all it may use) and return the count.

    Pins the process to the first `threads` of the cores it may use, so XLA's thread pool and the
    peers' see that many, and sets IREE's local-task worker count (its task topology). Takes effect
    for devices created afterwards: call it before the first IREE or JAX call of the process.
    """
    import iree.runtime as rt

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = len(allowed) if threads is None else threads
    if not isinstance(n, int) or not 1 <= n <= len(allowed):
        raise MhagenError(f"Received an invalid value for argument `threads`, expected an integer from 1 to "
                          f"{len(allowed)} (the cores this process may use). Received: threads={threads!r}")
    if n < len(allowed):
        os.sched_setaffinity(0, allowed[:n])
    rt.flags.parse_flags(f"--task_topology_group_count={n}")
    return n


def bench_spec(
    spec: Spec,
    *,
    name: str = "spec",
    target: str = "cpu",
    repeats: int = DEFAULT_REPEATS,
    warmup: int = 2,
    budget_s: float = TIME_BUDGET_S,
    memory: bool = True,
    oracle: bool = True,
    peers: Sequence[str] = (),
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SpecResult:
    """Time `spec` compiled for `target` against `jax.jit`, the oracle and `peers` (names from
    `mhagen.peers.PEERS`), on the same inputs, each runtime on `threads` threads (default: the
    cores this process may use; `set_threads` pins the process and sets IREE's workers).

    At most `repeats` interleaved calls each, fewer when they would take more than `budget_s`
    per implementation (never fewer than 3). Every output is checked against the oracle first; a
    peer that disagrees is reported with its error and not timed.
    """
    from .blocked import choose_path
    from .peers import PeerSkipped, default_threads, make_peer
    from .weights import init_weights

    say = progress or (lambda _msg: None)
    threads = threads or default_threads()
    weights = init_weights(spec)
    inputs = _inputs(spec, seed)
    rows = {impl: ImplResult(impl) for impl in (*IMPLEMENTATIONS, *peers)}

    say(f"{name}: compiling for {target}")
    start = time.perf_counter()
    m_call, m_host, layer = _mhagen_call(spec, weights, inputs, target)
    build_s = time.perf_counter() - start       # trace + compile (0 s when cached) + load
    compile_s = layer.compile_seconds
    say(f"{name}: jax.jit")
    j_call, j_host = _jax_call(spec, weights, inputs)
    calls: dict[str, Callable[[], Any]] = {"mhagen": m_call, "jax": j_call}
    hosts: dict[str, Callable[[Any], np.ndarray]] = {"mhagen": m_host, "jax": j_host}
    for peer_name in peers:
        say(f"{name}: building {peer_name}")
        try:
            peer = make_peer(peer_name, spec, weights, inputs, threads=threads)
        except PeerSkipped as exc:
            rows[peer_name].note = f"skipped: {exc}"
            continue
        calls[peer_name], hosts[peer_name] = peer.call, peer.to_host
        rows[peer_name].precision = peer.precision

    say(f"{name}: checking every output against the oracle")
    check_rows, expected, checked = _expected_rows(spec, weights, inputs) if oracle else (None, None, "")
    outputs = {impl: hosts[impl](call()) for impl, call in calls.items()}
    diff = np.abs(outputs["mhagen"].astype(np.float64) - outputs["jax"].astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    for impl, out in outputs.items():
        row = rows[impl]
        row.max_abs_vs_oracle, why = _oracle_error(spec, out, check_rows, expected, row.precision)
        if why and impl in peers:           # not timed as a winner: it computes something else
            row.note = why
            del calls[impl]
        elif why:
            row.note = why
    del outputs, expected

    say(f"{name}: warming up")
    first: dict[str, float] = {}
    for _ in range(max(1, warmup)):
        for impl, call in calls.items():
            first[impl] = _timed(call)
        if max(first.values()) > 1e3:   # calls of seconds: one warm-up is enough
            break

    slowest = max(first.values()) / 1e3
    n = int(max(3, min(repeats, budget_s / max(slowest, 1e-6))))
    say(f"{name}: timing {n} interleaved calls of {', '.join(calls)}")
    order = list(calls)
    for i in range(n):
        for impl in (order if i % 2 == 0 else order[::-1]):
            rows[impl].times_ms.append(_timed(calls[impl]))

    skip = _oracle_skip(spec) if oracle else "skipped (--no-oracle)"
    if skip:
        rows["oracle"].note = skip
    else:
        say(f"{name}: oracle")
        o_call = _oracle_call(spec, weights, inputs)
        one = _timed(o_call)
        rows["oracle"].times_ms.append(one)
        for _ in range(int(min(4, budget_s / 2 / max(one / 1e3, 1e-6)))):
            rows["oracle"].times_ms.append(_timed(o_call))
    del m_call, j_call, layer, calls

    if memory:
        for impl, row in rows.items():
            if not row.times_ms or (impl == "oracle" and row.note):
                continue
            say(f"{name}: peak memory of {impl} (fresh process)")
            row.peak_mb, note = measure_peak(impl, spec, target=target, seed=seed, threads=threads)
            if note:
                row.note = note
    return SpecResult(name=name, spec=spec, target=target, flops=spec.flops,
                      data_mb=_data_mb(spec, weights), path=choose_path(spec).value,
                      compile_s=compile_s, build_s=build_s, max_abs_vs_jax=max_abs, rows=rows,
                      threads=threads, oracle_rows=checked)


# ---- reports -----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def environment(target: str = "cpu") -> dict[str, Any]:
    """The machine and versions a result was measured with."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "unknown"

    return {"cpu": cpu, "vector_isa": _vector_isa(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "jax": version("jax"), "jaxlib": version("jaxlib"),
            "iree_compiler": version("iree-base-compiler"), "iree_runtime": version("iree-base-runtime"),
            "onnxruntime": version("onnxruntime"), "openvino": version("openvino"),
            "target": target, **_target_flags(target)}


def _vector_isa() -> str:
    """The widest x86 vector extension this CPU has (what IREE's `target-cpu=host` tiles for)."""
    from .runtime import host_cpu_features

    features = host_cpu_features()
    for name in ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon"):
        if name in features:
            return name
    return "unknown"


def _target_flags(target: str) -> dict[str, Any]:
    """The target's flags as its file states them, and its tuning spec by name (no local paths)."""
    from .targets import get_target, stated_flags

    t = get_target(target)
    tuning = {"tuning_spec": Path(t.active_tuning_spec).name} if t.active_tuning_spec else {}
    return {"flags": stated_flags(t), **tuning}


def _shape_text(spec: Spec) -> str:
    g = spec.geometry
    text = f"q{list(g.query_shape)}"
    if g.value_shape != g.query_shape:
        text += f" kv{list(g.value_shape)}"
    extras = [f"{g.num_heads}x{g.key_dim}"]
    if spec.call.use_causal_mask:
        extras.append("causal")
    if spec.has_mask:
        extras.append("mask")
    if len(g.attention_axes) > 1:
        extras.append(f"axes {list(g.attention_axes)}")
    return text + " " + ", ".join(extras)


def markdown_table(results: Sequence[SpecResult]) -> str:
    """One row per spec: the three implementations side by side, and mhagen's speed-up."""
    head = ("| spec | shape | GFLOP | mhagen ms | GFLOP/s | peak MB | jax.jit ms | GFLOP/s | peak MB "
            "| oracle ms | data MB | speed-up vs jax.jit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m, j, o = r.rows["mhagen"], r.rows["jax"], r.rows["oracle"]
        lines.append("| " + " | ".join([
            r.name, _shape_text(r.spec), f"{r.flops / 1e9:.2f}",
            _fmt(m.median_ms, ".1f"), _fmt(m.gflops(r.flops), ".0f"), _fmt(m.peak_mb, ".0f"),
            _fmt(j.median_ms, ".1f"), _fmt(j.gflops(r.flops), ".0f"), _fmt(j.peak_mb, ".0f"),
            _fmt(o.median_ms, ".0f") if o.times_ms else "skipped",
            f"{r.data_mb:.0f}", f"**{r.speedup:.2f}x**" if r.speedup else "",
        ]) + " |")
    return "\n".join(lines) + "\n"


# Column headings of the runtimes in the peers table.
LABELS = {"mhagen": "mhagen", "jax": "jax.jit", "onnxruntime": "ONNX Runtime",
          "onnxruntime_fused": "ORT fused MHA", "openvino": "OpenVINO f32", "openvino_bf16": "OpenVINO bf16"}


def _peer_names(results: Sequence[SpecResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [n for n in r.rows if n not in IMPLEMENTATIONS and n not in names]
    return names


def _cell(r: SpecResult, impl: str) -> str:
    """`ms (ratio to jax.jit), MB`, or why it has no time."""
    row = r.rows.get(impl)
    if row is None:
        return ""
    if row.median_ms is None:
        if row.note.startswith("does not match"):
            return f"mismatch, max err {row.max_abs_vs_oracle:.1e}"
        return row.note.split(":")[0] if row.note else ""
    ratio = r.ratio(impl)
    text = f"{row.median_ms:.1f} ({ratio:.2f}x)" if ratio else f"{row.median_ms:.1f}"
    if row.peak_mb is not None:
        text += f", {row.peak_mb:.0f} MB"
    return ("**" + text + "**") if impl == "mhagen" else text


def peers_table(results: Sequence[SpecResult]) -> str:
    """One row per spec, one column per runtime: median ms (ratio to jax.jit: above 1 is faster), peak MB."""
    names = ["mhagen", "jax", *_peer_names(results)]
    head = "| spec | threads | " + " | ".join(LABELS.get(n, n) for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for r in results:
        lines.append(f"| {r.name} | {r.threads} | " + " | ".join(_cell(r, n) for n in names) + " |")
    return "\n".join(lines) + "\n"


def rich_table(r: SpecResult) -> Any:
    from rich.table import Table

    table = Table(title=f"mhagen bench {r.name} ({_shape_text(r.spec)}; {r.flops / 1e9:.2f} GFLOP; "
                        f"{r.path} attention; data {r.data_mb:.0f} MB; {r.threads} threads; "
                        f"oracle checked on {r.oracle_rows or 'no'} rows)")
    for col in ("implementation", "median ms", "min ms", "calls", "GFLOP/s", "peak MB", "ratio to jax.jit",
                "max err vs oracle", "note"):
        table.add_column(col)
    labels = {"mhagen": f"mhagen ({r.target}, IREE)", "jax": "jax.jit (XLA CPU)", "oracle": "NumPy oracle (f64)"}
    for name, row in r.rows.items():
        ratio = r.ratio(name)
        label = labels.get(name, LABELS.get(name, name))
        if row.precision != "float32":
            label += f" ({row.precision})"
        table.add_row(label, _fmt(row.median_ms, ".2f"), _fmt(row.min_ms, ".2f"), str(len(row.times_ms)),
                      _fmt(row.gflops(r.flops), ".1f"), _fmt(row.peak_mb, ".0f"),
                      "" if ratio is None else f"{ratio:.2f}x", _fmt(row.max_abs_vs_oracle, ".1e"), row.note)
    return table


def plot(results: Sequence[SpecResult], path: Path) -> str:
    """Bar charts of median time and peak memory per spec; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'mhagen[bench]'): no plot written"
    names = [r.name for r in results]
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(names)), 8), sharex=True)
    impls = [("mhagen", "mhagen (IREE, cpu)"), ("jax", "jax.jit (XLA)")]
    impls += [(n, LABELS.get(n, n)) for n in _peer_names(results)]
    w = 0.8 / len(impls)
    for i, (impl, label) in enumerate(impls):
        ms = [r.rows[impl].median_ms or 0 if impl in r.rows else 0 for r in results]
        mb = [r.rows[impl].peak_mb or 0 if impl in r.rows else 0 for r in results]
        offset = (i - (len(impls) - 1) / 2) * w
        ax1.bar(x + offset, ms, w, label=label, color=f"C{i}")
        ax2.bar(x + offset, mb, w, label=label, color=f"C{i}")
    for xi, r in zip(x, results):
        if r.speedup:
            top = max(row.median_ms or 0 for row in r.rows.values() if row.name != "oracle")
            ax1.annotate(f"{r.speedup:.2f}x", (xi, top), ha="center", va="bottom", fontsize=8)
    ax2.plot(x, [r.data_mb for r in results], "k_", markersize=18, label="inputs + weights + outputs")
    ax1.set_yscale("log")
    ax1.set_ylabel("median ms (log)")
    ax2.set_yscale("log")
    ax2.set_ylabel("peak MB of one call (log)")
    ax1.set_title("mhagen vs " + ", ".join(label for _, label in impls[1:]) + " on this CPU "
                  "(labels: speed-up of mhagen over jax.jit)", fontsize=9)
    ax1.legend()
    ax2.legend()
    ax2.set_xticks(x, names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def run_suite(
    folder: str | Path,
    *,
    target: str = "cpu",
    out: str | Path | None = None,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[SpecResult]:
    """Bench every `*.toml` spec in `folder`; write results.md, results.json and results.png to `out`."""
    folder = Path(folder)
    specs = sorted(folder.glob("*.toml"))
    if not specs:
        raise MhagenError(f"Received an invalid value for argument `suite`, expected a folder with "
                          f"spec files (*.toml). Received: suite={str(folder)!r}")
    out = Path(out) if out else folder
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    loaded = [(p, Spec.load(p)) for p in specs]
    results = [bench_spec(spec, name=p.stem, target=target, memory=memory, progress=progress,
                          **kwargs) for p, spec in loaded if not spec.is_decoder]
    decoding = [_bench_decoder(spec, p.stem, target=target, memory=memory, progress=progress,
                               repeats=kwargs.get("repeats", DEFAULT_REPEATS))
                for p, spec in loaded if spec.is_decoder]
    seconds = time.perf_counter() - start
    env = environment(target)
    # Other processes on the machine slow both implementations, IREE's short dispatches the most.
    env["load_average"] = {"before": load_before, "after_1min": os.getloadavg()[0]}
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "seconds": seconds, "results": [r.to_dict() for r in results],
         "decode": decoding}, indent=2))
    note = plot(results, out / "results.png")
    tuning = f", tuning spec `{env['tuning_spec']}`" if env.get("tuning_spec") else ""
    peers = _peer_names(results)
    versions = "".join(f", {label} {env[n]}" for n, label in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO"))
                       if any(p.startswith(n) for p in peers))
    threads = sorted({r.threads for r in results})
    text = [f"# mhagen bench: {target} vs jax.jit{' and ' + ', '.join(LABELS.get(p, p) for p in peers) if peers else ''}\n",
            f"{env['cpu']} ({env['vector_isa']}), {env['cores']} cores, every runtime on "
            f"{'/'.join(map(str, threads))} thread(s); jax {env['jax']}, IREE {env['iree_compiler']}{versions}; "
            f"flags `{' '.join(env['flags'])}`"
            f"{tuning}. Suite run time {seconds / 60:.1f} min; load average "
            f"{load_before:.2f} before, {env['load_average']['after_1min']:.2f} after.\n",
            markdown_table(results),
            "\nmedian of interleaved calls with the inputs on the device; GFLOP/s from the spec's "
            "multiply-adds; peak MB: the most memory one call adds to a fresh process holding the "
            "module and the inputs; data MB: inputs + weights + outputs; speed-up: jax.jit median / "
            "mhagen median.\n"]
    if peers:
        text += ["\n## Peers: the same layer and weights in other runtimes\n", peers_table(results),
                 "\nmedian ms of interleaved calls (ratio to jax.jit: above 1 is faster), peak MB of one call in "
                 "a fresh process. ONNX Runtime and OpenVINO run a plain ONNX graph (MatMul, Softmax, Where); "
                 "ORT fused MHA is `com.microsoft.MultiHeadAttention`. Every output was checked against the "
                 "float64 oracle before timing (all query rows where the oracle fits, else the first and "
                 "last 64): float32 at atol 1e-5, OpenVINO bf16 (its default on CPUs with AVX-512 BF16, "
                 "not float32) at bfloat16's 5e-2. \"mismatch\": outside the tolerance, not timed; "
                 "\"skipped\": the graph cannot express the spec (see results.json).\n"]
    if decoding:
        from .bench_decode import DECODE_NOTE, decode_table

        text += ["\n## Decoding: one token per step over a KV cache\n", decode_table(decoding), DECODE_NOTE]
    if note:
        text.append(f"\n({note})\n")
    (out / "results.md").write_text("\n".join(text))
    return results


def _bench_decoder(spec: Spec, name: str, *, target: str, memory: bool, progress: Any, repeats: int
                   ) -> dict[str, Any]:
    """A decoder spec in the suite: `mhagen.bench_decode.bench_decode`, named."""
    from .bench_decode import bench_decode

    if progress:
        progress(f"{name}: decode steps (mhagen, keras_hub under jax.jit)")
    return {"name": name, **bench_decode(spec, target=target, repeats=repeats, memory=memory)}


# ---- command line ------------------------------------------------------------------------------
def _cmd_bundle_bench(args: argparse.Namespace) -> int:
    """`mhagen bench DIR`: a deployed bundle timed with the runtime alone (no spec, no JAX)."""
    from .runtime import load_bundle
    from .runtime.timing import time_layer

    if args.suite:
        raise MhagenError(f"{args.spec} is a bundle and --suite a folder of specs: give one of them")
    layer = load_bundle(args.spec, args.target)
    timing = time_layer(layer, repeats=args.repeats)
    print(f"mhagen bench {args.spec}")
    print(timing.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": str(args.spec), **timing.to_dict()}, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.spec and Path(args.spec).is_dir():
        if args.peers or args.threads is not None:
            raise MhagenError(f"--peers and --threads are for a spec or --suite; {args.spec} is a bundle, "
                              f"timed by its runtime alone")
        return _cmd_bundle_bench(args)
    console = Console(stderr=True)
    out = Console()

    def progress(msg: str) -> None:
        console.print(f"[dim]{msg}...[/dim]")

    from .peers import parse_peers

    peers = parse_peers(args.peers) if args.peers else ()
    threads = set_threads(args.threads)      # before IREE or JAX start a device
    common = dict(target=args.target, repeats=args.repeats, memory=not args.no_memory,
                  oracle=not args.no_oracle, progress=progress, peers=peers, threads=threads)
    if args.suite:
        start = time.perf_counter()
        results = run_suite(args.suite, out=args.out, **common)
        folder = Path(args.out or args.suite)
        print(markdown_table(results))    # markdown to copy: as is, not wrapped to the terminal
        if peers:
            print(peers_table(results))
        out.print(f"wrote {folder / 'results.md'}, {folder / 'results.json'}"
                  f"{', ' + str(folder / 'results.png') if (folder / 'results.png').exists() else ''} "
                  f"in {(time.perf_counter() - start) / 60:.1f} min")
    else:
        if not args.spec:
            raise MhagenError("Received an invalid value for argument `spec`, expected a spec file "
                              "(or --suite FOLDER). Received: spec=None")
        spec = Spec.load(args.spec)
        if spec.is_decoder:
            from .bench_decode import DECODE_NOTE, decode_table

            result = _bench_decoder(spec, Path(args.spec).stem, target=args.target, memory=not args.no_memory,
                                    progress=progress, repeats=args.repeats)
            print(decode_table([result]) + DECODE_NOTE)
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {"environment": environment(args.target), "decode": [result]}, indent=2))
            return 0
        results = [bench_spec(spec, name=Path(args.spec).stem, **common)]
        out.print(rich_table(results[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": environment(args.target), "results": [r.to_dict() for r in results]}, indent=2))
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="time the compiled module against jax.jit and the NumPy oracle on this CPU, "
        "or time a bundle directory alone")
    p.add_argument("spec", nargs="?", help="spec TOML file, or a bundle directory (written by `mhagen "
                   "build`): its module for --target is timed with the IREE runtime alone, like "
                   "iree-benchmark-module (p50/p90/p99 and mean)")
    p.add_argument("--suite", metavar="FOLDER", help="bench every spec in FOLDER; write results.md, "
                   "results.json and results.png there (or in --out)")
    p.add_argument("--out", help="folder for the suite's results (default: the suite folder)")
    p.add_argument("--target", default="cpu", help="target to compile for, or of the bundle (default cpu; "
                   "`auto` for a bundle)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help=f"most timed calls per implementation (default {DEFAULT_REPEATS}; fewer when "
                   f"they would take over {TIME_BUDGET_S:.0f} s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--peers", metavar="LIST", help="also time the same layer in other runtimes: a comma-"
                   "separated list of onnxruntime (plain graph and com.microsoft.MultiHeadAttention), "
                   "openvino (f32 and its bf16 default); needs pip install 'mhagen[bench]'")
    p.add_argument("--threads", type=int, help="cores for every runtime (default: all this process may "
                   "use); the process is pinned to the first N (one core: --threads 1, or taskset -c 0)")
    p.add_argument("--no-oracle", action="store_true", help="do not time the NumPy oracle")
    p.set_defaults(func=_cmd_bench)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
        sys.exit(0)
    sys.exit("usage: python -m mhagen.bench --memory-child IMPL SPEC.toml TARGET SEED THREADS")
