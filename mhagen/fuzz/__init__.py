"""`mhagen fuzz`: cross-backend differential testing. Random specs, every target, the oracle as judge.

Each case is a random spec (`draw.draw_spec`) with random inputs (`draw.draw_inputs`: fully masked
query rows, large magnitudes). For every named target it is compiled through the compile cache, run
where this machine can run it, and compared with the NumPy oracle under the dtype's tolerance
(`case.run_case`, in a child process so that a runtime crash is a result, not the end of the run).
Each failure is shrunk to a minimal spec that fails the same way on the same target (`shrink`) and
written as a reproducer folder that replays with IREE's tools alone (`report.write_reproducer`).

    run = fuzz(parse_targets("cpu,vulkan"), seed=7, budget_s=600, out=Path("out/fuzz"))
    run["summary"]["vulkan"]      # {"passed": 31, "failed": 0, "refused": 4, "compiled-not-run": 0}

The command: `mhagen fuzz --targets cpu,vmvx,vulkan --budget 10m --seed 7 --out DIR`; exit 0 when no
case failed, 1 when one did, 2 on bad arguments, 130 when interrupted (after writing the reports).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MhagenError
from ..spec import Spec
from .case import Worker, run_case, signature
from .draw import draw_spec, fuzz_dtypes
from .report import summarize, write_reports, write_reproducer
from .shrink import shrink

__all__ = ["fuzz", "run_case", "shrink", "draw_spec", "parse_budget", "add_cli", "describe"]

DEFAULT_SHRINK_TRIES = 100
DEFAULT_SHRINK_SECONDS = 600.0
DEFAULT_JOB_TIMEOUT_S = 600.0
_REPORT_FILES = ("results.json", "junit.xml", "summary.md")


def parse_budget(text: str, *, option: str = "--budget") -> float:
    """`90s`, `10m`, `1h` or a bare number of seconds -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise MhagenError(f"Received an invalid value for argument `{option}`, expected a duration "
                          f"such as 90s, 10m or 1h. Received: {option}={text!r}")
    return seconds


def describe(spec: Spec) -> str:
    """A case in a few words: `q(2, 5, 7) v(2, 9, 3) 2x4 mask causal gate float16`."""
    g, layer, call = spec.geometry, spec.layer, spec.call
    words = [f"q{g.query_shape}", f"v{g.value_shape}"]
    if spec.has_key:
        words.append(f"k{g.key_shape}")
    words.append(f"{g.num_heads}x{g.key_dim}" + (f"/{layer.value_dim}" if layer.value_dim else ""))
    if layer.attention_axes is not None:
        words.append(f"axes{list(layer.attention_axes)}")
    flags = [("mask" if call.attention_mask is True else f"mask{list(call.attention_mask)}")
             if spec.has_mask else "", "causal" if call.use_causal_mask else "",
             f"window {layer.sliding_window}" if layer.sliding_window else "", "gate" if layer.use_gate else "",
             "no-bias" if not layer.use_bias else "", "scores" if call.return_attention_scores else "",
             f"dropout {layer.dropout}" if spec.has_dropout else "", "keras2" if layer.masking else "",
             f"dynamic {'+'.join(call.dynamic)}" if call.dynamic else "", call.dtype]
    return " ".join(words + [f for f in flags if f])


def fuzz(targets: list[Any], *, seed: int, out: Path, budget_s: float | None = None,
         max_cases: int | None = None, shrink_tries: int = DEFAULT_SHRINK_TRIES,
         shrink_seconds: float = DEFAULT_SHRINK_SECONDS,
         job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
         on_event: Callable[[str, dict[str, Any]], None] | None = None,
         jobs: int | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Draw cases from `seed` until `budget_s` is spent or `max_cases` ran (the case in flight, its
    shrinking included, is finished), check each on every target, shrink and write out each
    failure; write the reports into `out` and return the run (as results.json holds it).

    `on_event(kind, data)` hears "case" (a case drawn: id, spec), "target" (a target about to run),
    "result" (every target ran: the case's dict), "shrink" (a failure being shrunk) and "failure"
    (one shrunk and written). Ctrl-C writes the reports of the finished cases and raises KeyboardInterrupt.

    `jobs` (a local process pool) or `ray_address` (a Ray cluster, `mhagen.sweep`) runs a case's
    targets in parallel, each where its device is; shrinking stays in this process's worker.
    """
    if budget_s is None and max_cases is None:
        raise MhagenError("fuzz needs a budget or a number of cases")
    emit = on_event or (lambda kind, data: None)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in targets]
    rng = np.random.default_rng(seed)
    dtypes = fuzz_dtypes(targets)
    run: dict[str, Any] = {"tool": "mhagen fuzz", "seed": seed, "targets": names, "budget_seconds": budget_s,
                           "max_cases": max_cases, "dtypes": list(dtypes), "stopped": "", "seconds": 0.0,
                           "cases": [], "failures": []}
    start = time.monotonic()
    elsewhere = None
    if jobs is not None or ray_address is not None:
        from ..sweep import open_executor

        elsewhere = open_executor(jobs, ray_address)
    try:
        with Worker(timeout=job_timeout_s) as worker:
            while True:
                if max_cases is not None and len(run["cases"]) >= max_cases:
                    run["stopped"] = f"{max_cases} cases"
                    break
                if budget_s is not None and time.monotonic() - start >= budget_s:
                    run["stopped"] = "budget spent"
                    break
                spec = draw_spec(rng, dtypes)
                case_seed = int(rng.integers(0, 1 << 31))
                case = {"id": f"case-{len(run['cases']) + 1:04d}", "spec": spec.to_dict(), "seed": case_seed,
                        "results": {}}
                emit("case", {**case, "describe": describe(spec)})
                if jobs is None and ray_address is None:
                    for name in names:
                        emit("target", {"case": case["id"], "target": name})
                        case["results"][name] = worker(run_case, case["spec"], name, case_seed)
                else:
                    emit("target", {"case": case["id"], "target": ", ".join(names)})
                    case["results"] = _run_elsewhere(case, names, elsewhere)
                emit("result", case)
                failures = [_shrink_and_write(worker, case, name, result, out, seed,
                                              (shrink_tries, shrink_seconds), emit)
                            for name, result in case["results"].items() if result["status"] == "failed"]
                run["cases"].append(case)
                run["failures"] += failures
    except KeyboardInterrupt:
        run["stopped"] = "interrupted"
        run["seconds"] = round(time.monotonic() - start, 1)
        write_reports(out, run)
        raise
    finally:
        if elsewhere is not None:
            elsewhere.close()
    run["seconds"] = round(time.monotonic() - start, 1)
    write_reports(out, run)
    run["summary"] = summarize(run)
    return run


def _run_elsewhere(case: dict[str, Any], names: list[str], executor: Any) -> dict[str, dict[str, Any]]:
    """A case's targets on a process pool or Ray (`mhagen.sweep.run_many`), in target order; a job
    whose process died is a "crash" failure, as in the local worker."""
    from ..sweep import resource_for, run_many
    from ..targets import get_target

    calls = [(case["spec"], name, case["seed"]) for name in names]
    results: dict[str, dict[str, Any]] = {}
    for i, result in run_many(run_case, calls, resource_of=lambda a: resource_for(get_target(a[1])),
                              executor=executor):
        if isinstance(result, BaseException):
            result = {"target": names[i], "status": "failed", "kind": "crash",
                      "message": (str(result).splitlines() or [type(result).__name__])[0][:300],
                      "max_abs": None, "call": None, "compile_seconds": 0.0, "cached": False, "run_seconds": 0.0}
        results[names[i]] = result
    return {name: results[name] for name in names}


def _shrink_and_write(worker: Worker, case: dict[str, Any], target: str, result: dict[str, Any], out: Path,
                      seed: int, limits: tuple[int, float],
                      emit: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
    """Shrink one failure on its target (same kind of failure, same inputs seed) and write its
    reproducer under out/failures/<case>-<target>."""
    want = signature(result)
    last = {"result": result}

    def still_fails(candidate: Spec) -> bool:
        got = worker(run_case, candidate.to_dict(), target, case["seed"])
        if got["status"] == "failed" and signature(got) == want:
            last["result"] = got
            return True
        return False

    emit("shrink", {"case": case["id"], "target": target, "result": result})
    smallest, used, minimal = shrink(Spec.from_dict(case["spec"]), still_fails, max_tries=limits[0],
                                     max_seconds=limits[1])
    folder = Path("failures") / f"{case['id']}-{target}"
    context = {"case_id": case["id"], "seed": seed, "tries": used, "minimal": minimal, "original": case["spec"]}
    info = worker(write_reproducer, smallest.to_dict(), target, case["seed"], last["result"],
                  str(out / folder), context)
    failure = {"case": case["id"], "target": target, "kind": result["kind"], "message": result["message"],
               "shrunk_message": last["result"]["message"], "spec": smallest.to_dict(),
               "spec_toml": smallest.to_toml(), "tries": used, "minimal": minimal, "folder": str(folder),
               "replay": info.get("replay", info.get("message", "")), "reproduced": info.get("reproduced")}
    emit("failure", failure)
    return failure


# -- the command -------------------------------------------------------------------------------------

def _prepare_out(out: Path) -> None:
    """--out must be new, empty, or an earlier fuzz run's folder (whose reports and failures are
    replaced); anything else is refused before any work."""
    if out.exists() and not out.is_dir():
        raise MhagenError(f"Received an invalid value for argument `--out`, expected a folder. "
                          f"Received: --out={str(out)!r} (a file)")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / "results.json").read_text()).get("tool") == "mhagen fuzz"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise MhagenError(f"Received an invalid value for argument `--out`, expected a new or empty "
                              f"folder, or an earlier `mhagen fuzz` output. Received: --out={str(out)!r} "
                              "(it holds other files)")
        shutil.rmtree(out / "failures", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..progress import Steps
    from ..targets import parse_targets

    targets = parse_targets(args.targets)
    budget = parse_budget(args.budget) if args.budget is not None else None
    if args.cases is not None and args.cases <= 0:
        raise MhagenError(f"Received an invalid value for argument `--cases`, expected a positive "
                          f"integer. Received: --cases={args.cases}")
    if budget is None and args.cases is None:
        budget = parse_budget("10m")
    if args.seed < 0:
        raise MhagenError(f"Received an invalid value for argument `--seed`, expected an integer >= 0. "
                          f"Received: --seed={args.seed}")
    if args.shrink_tries < 0:
        raise MhagenError(f"Received an invalid value for argument `--shrink-tries`, expected an "
                          f"integer >= 0. Received: --shrink-tries={args.shrink_tries}")
    shrink_seconds = parse_budget(args.shrink_budget, option="--shrink-budget")
    from ..sweep import check_executor

    check_executor(args.jobs, args.ray)
    if not args.job_timeout > 0:
        raise MhagenError(f"Received an invalid value for argument `--job-timeout`, expected a number of "
                          f"seconds > 0. Received: --job-timeout={args.job_timeout}")
    out = Path(args.out)
    _prepare_out(out)
    console = Console(highlight=False)
    start = time.monotonic()
    current: dict[str, Any] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        clock = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - start))
        if kind == "case":
            current.update(id=data["id"], describe=data["describe"])
        elif kind == "target":
            steps.start(f"{data['case']} {current['describe']}: {data['target']}")
        elif kind == "result":
            cells = [f"{t} {_word(r)}" for t, r in data["results"].items()]
            steps.done(f"[{clock}] {data['id']} {current['describe']}: {', '.join(cells)}")
            for t, r in data["results"].items():
                if r["status"] == "failed":
                    steps.done(f"    {t} FAILED ({r['kind']}): {r['message']}")
        elif kind == "shrink":
            steps.start(f"{data['case']}: shrinking the {data['target']} failure")
        elif kind == "failure":
            steps.done(f"    {data['target']}: shrunk in {data['tries']} tries to {describe(Spec.from_dict(data['spec']))}"
                       f" -> {out / data['folder']}")

    with Steps(console) as steps:
        run = fuzz(targets, seed=args.seed, out=out, budget_s=budget, max_cases=args.cases,
                   shrink_tries=args.shrink_tries, shrink_seconds=shrink_seconds,
                   job_timeout_s=args.job_timeout, on_event=on_event, jobs=args.jobs, ray_address=args.ray)
    table = Table(title=f"mhagen fuzz --seed {args.seed}: {len(run['cases'])} cases in "
                        f"{run['seconds'] / 60:.1f} min ({run['stopped']})")
    for col in ("target", "passed", "failed", "refused", "compiled, not run"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for target, row in run["summary"].items():
        table.add_row(target, *(str(row[s]) for s in ("passed", "failed", "refused", "compiled-not-run")))
    console.print(table)
    for f in run["failures"]:
        console.print(f"FAILED {f['case']} on {f['target']} ({f['kind']}): {f['message']}\n"
                      f"  shrunk: {describe(Spec.from_dict(f['spec']))} -> {out / f['folder']}")
    console.print(f"wrote {', '.join(str(out / n) for n in _REPORT_FILES)}")
    return 1 if run["failures"] else 0


def _word(result: dict[str, Any]) -> str:
    return {"passed": "pass", "failed": "FAIL", "refused": "refused",
            "compiled-not-run": "compiled"}[result["status"]]


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fuzz", help="differential testing: random specs on every target against the NumPy oracle; "
        "failures shrunk and written as reproducers")
    p.add_argument("--targets", required=True, help="comma-separated target names, or `all`")
    p.add_argument("--budget", help="time to keep drawing cases: 90s, 10m, 1h (default 10m unless "
                   "--cases); the case in flight is finished")
    p.add_argument("--cases", type=int, help="stop after this many cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the cases (the same seed draws the same "
                   "cases in the same order)")
    p.add_argument("--out", required=True, help="folder for results.json, junit.xml, summary.md and failures/")
    p.add_argument("--shrink-tries", type=int, default=DEFAULT_SHRINK_TRIES,
                   help=f"most candidate specs tried while shrinking one failure (default {DEFAULT_SHRINK_TRIES})")
    p.add_argument("--shrink-budget", default="10m",
                   help="most time spent shrinking one failure (default 10m); the smallest spec so far is kept")
    p.add_argument("--job-timeout", type=float, default=DEFAULT_JOB_TIMEOUT_S,
                   help=f"seconds one compile-and-run may take before it counts as a hang "
                   f"(default {DEFAULT_JOB_TIMEOUT_S:g})")
    p.add_argument("--jobs", type=int, help="run each case's targets on a local pool of N processes")
    p.add_argument("--ray", metavar="ADDRESS", help="run each case's targets on a Ray cluster (`auto`, HOST:PORT "
                   "or ray://...): each on a node with its device's resource, as `mhagen verify --sweep --ray`")
    p.set_defaults(func=_cmd_fuzz)
