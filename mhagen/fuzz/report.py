"""What a fuzz run leaves behind: a reproducer folder per failure, and results.json, junit.xml and
summary.md for the whole run.

A reproducer needs nothing of mhagen to replay: the StableHLO with its weights inline, the exact
`iree-compile` and `iree-run-module` commands, the function's inputs as .npy files, the oracle's
expected outputs and the actual ones, which `write_reproducer` gets by running those very commands.

    info = write_reproducer(spec.to_dict(), "vulkan", seed, failure, "out/failures/case-0003-vulkan")
    write_reports("out", run)          # results.json, junit.xml, summary.md
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import Spec

__all__ = ["write_reproducer", "write_reports", "summarize"]

REPLAY_TIMEOUT_S = 600


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros after the end of each axis up to `shape` (a padded mask is 0: masked)."""
    return np.pad(array, [(0, s - n) for n, s in zip(array.shape, shape)])


def _function_inputs(program: Any, check_spec: Spec, inputs: dict[str, np.ndarray]
                     ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """The compiled function a call runs and its arguments, as mhagen's runtime prepares them: the
    smallest bucket that holds the call, inputs padded with zeros, the mask as int32 (0 = masked)."""
    from ..runtime import np_dtype

    batch, seq = check_spec.geometry.query_shape[0], max(check_spec.geometry.query_shape[1],
                                                         check_spec.geometry.value_shape[1])
    functions = sorted(program.interface["functions"], key=lambda f: (f["batch"] or 0, f["seq"] or 0))
    fn = next(f for f in functions if (f["batch"] is None or f["batch"] >= batch)
              and (f["seq"] is None or f["seq"] >= seq))
    args = []
    for sig in fn["inputs"]:
        name, shape = sig["name"], tuple(sig["shape"])
        if name == "attention_mask" and name not in inputs:     # a padded bucket masks its padding
            array = np.ones(check_spec.geometry.full_mask_shape, bool)
        else:
            array = inputs[name]
        args.append((name, _pad(np.asarray(array), shape).astype(np_dtype(sig["dtype"]))))
    return fn, args


def _write_array(folder: Path, stem: str, array: np.ndarray) -> tuple[str, str]:
    """Save `array` for iree-run-module: (file name, its --input value). bfloat16, which .npy cannot
    hold, goes as raw bytes with IREE's `SHAPExbf16=@file` form."""
    if array.dtype.name == "bfloat16":
        name = f"{stem}.bin"
        array.tofile(folder / name)
        return name, f"{'x'.join(map(str, array.shape))}xbf16=@{name}"
    name = f"{stem}.npy"
    np.save(folder / name, array)
    return name, f"@{name}"


def write_reproducer(spec_dict: dict[str, Any], target_name: str, seed: int, failure: dict[str, Any],
                     folder: str, context: dict[str, Any]) -> dict[str, Any]:
    """Write the reproducer of `failure` (a `run_case` result for this spec, target and seed) into
    `folder`, replay its commands there, and say whether the replay shows the failure.

    `context`: {"case_id", "seed" (the run's), "tries", "minimal", "original" (the drawn spec dict)}.
    Returns {"folder", "replay": a sentence, "reproduced": bool | None}. Runs in the fuzz worker: it
    traces with JAX; the module runs in `iree-run-module`, a process of its own.
    """
    from ..compile import compile_timeout
    from ..program import render
    from ..runtime import driver_status
    from ..targets import compile_flags, get_target
    from ..verify import compare, tolerance
    from .case import _prepared, call_data, calls

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    spec = Spec.from_dict(spec_dict)
    target = get_target(target_name)
    _, _, program = _prepared(spec.to_toml())
    (out / "spec.toml").write_text(spec.to_toml())
    (out / "original_spec.toml").write_text(Spec.from_dict(context["original"]).to_toml())
    (out / "program.mlir").write_text(program.text)
    flags = compile_flags(target)
    if target.active_tuning_spec:       # a file of this checkout: copied beside the program
        shutil.copyfile(target.active_tuning_spec, out / "tuning_spec.mlir")
        flags = [f"--iree-codegen-tuning-spec-path=tuning_spec.mlir" if f.startswith(
            "--iree-codegen-tuning-spec-path=") else f for f in flags]
    compile_argv = ["iree-compile", "program.mlir", "--iree-input-type=stablehlo", *flags, "-o", "module.vmfb"]
    kind = failure.get("kind", "")
    tol = tolerance(spec)
    page: dict[str, Any] = {
        "target": target_name, "kind": kind, "case_id": context["case_id"], "seed": context["seed"],
        "tries": context["tries"], "minimal": context["minimal"], "message": failure.get("message", ""),
        "compiler": _version("iree-base-compiler"), "runtime": _version("iree-base-runtime"),
        "driver": target.driver, "device": driver_status(target.driver)[1], "cpu": _cpu(),
        "compile_command": shlex.join(compile_argv), "run_command": "", "inputs": [], "loads": [],
        "padded": False, "dtype": spec.call.dtype_policy.compute, "atol": tol.atol, "rtol": tol.rtol,
        "bf16": False,
    }
    page["what"] = {
        "mismatch": "The compiled module's outputs disagree with a float64 NumPy reference beyond the "
                    "dtype's tolerance.",
        "compile-error": "`iree-compile` fails on a valid program.",
        "runtime-error": "The IREE runtime fails running the compiled module.",
        "crash": "The process running the compiled module dies.",
        "timeout": "The compile or the run does not finish.",
    }.get(kind, f"The case fails ({kind}).")
    compiled = subprocess.run(compile_argv, cwd=out, capture_output=True, text=True,
                              timeout=compile_timeout())
    if compiled.returncode != 0:
        (out / "compile_stderr.txt").write_text(compiled.stderr)
        first = next((ln for ln in compiled.stderr.splitlines() if "error" in ln.lower()), "")
        reproduced = kind == "compile-error"
        page["replay"] = (f"`iree-compile` exits with status {compiled.returncode}: `{first.strip()[:300]}` "
                          "(all of it in `compile_stderr.txt`).")
        return _finish(out, page, render, reproduced)
    index = failure.get("call") or 0
    checks = calls(spec)
    check = checks[index]
    inputs, expected = call_data(spec, index, seed)
    fn, args = _function_inputs(program, check.spec, inputs)
    page["padded"] = any(tuple(s["shape"]) != tuple(e.shape) for s, e in zip(fn["outputs"], expected))
    run_argv = ["iree-run-module", f"--device={target.driver}", "--module=module.vmfb", f"--function={fn['name']}"]
    for i, (name, array) in enumerate(args):
        file, flag = _write_array(out, f"input{i}_{name}", array)
        run_argv.append(f"--input={flag}")
        note = " (int32, nonzero = attend; fully masked rows included)" if name == "attention_mask" else ""
        page["inputs"].append(f"`{file}`: `{name}` {list(array.shape)} {array.dtype.name}{note}")
    bf16 = any(s["dtype"] == "bfloat16" for s in fn["outputs"])
    page["bf16"] = bf16
    for j, sig in enumerate(fn["outputs"]):
        np.save(out / f"expected_{j}.npy", expected[j])
        if bf16:
            run_argv.append(f"--output=@actual_{j}.bin")
            page["loads"].append(f"np.fromfile(\"actual_{j}.bin\", dtype=ml_dtypes.bfloat16)"
                                 f".reshape({tuple(sig['shape'])})")
        else:
            run_argv.append(f"--output=@actual_{j}.npy")
            page["loads"].append(f"np.load(\"actual_{j}.npy\")")
    page["run_command"] = shlex.join(run_argv)
    try:
        ran = subprocess.run(run_argv, cwd=out, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        page["replay"] = f"`iree-run-module` did not finish within {REPLAY_TIMEOUT_S} s."
        return _finish(out, page, render, kind == "timeout")
    if ran.returncode != 0:
        (out / "run_stderr.txt").write_text(ran.stderr)
        what = (f"killed by signal {-ran.returncode}" if ran.returncode < 0
                else f"exits with status {ran.returncode}")
        first = next((ln for ln in ran.stderr.splitlines() if ln.strip()), "")
        page["replay"] = f"`iree-run-module` {what}: `{first.strip()[:300]}` (`run_stderr.txt`)."
        return _finish(out, page, render, kind in ("crash", "runtime-error"))
    lines, reproduced = [], False
    for j, sig in enumerate(fn["outputs"]):
        if bf16:
            import ml_dtypes

            actual = np.fromfile(out / f"actual_{j}.bin", dtype=ml_dtypes.bfloat16).reshape(sig["shape"])
        else:
            actual = np.load(out / f"actual_{j}.npy")
        actual = actual[tuple(slice(0, n) for n in expected[j].shape)]
        c = compare(actual, expected[j], tol=tol, name=f"outputs[{j}]")
        reproduced = reproduced or not c.passed
        lines.append(f"- {c.message} (max |err| {c.max_abs:.3g})")
    verdict = ("The replay shows the failure:" if reproduced else
               "The replay does **not** show the failure (the fuzzer ran the module through mhagen's "
               "runtime in a process that had run other modules before; see the message above):")
    page["replay"] = verdict + "\n\n" + "\n".join(lines)
    return _finish(out, page, render, reproduced if kind == "mismatch" else None)


def _finish(out: Path, page: dict[str, Any], render: Any, reproduced: bool | None) -> dict[str, Any]:
    (out / "README.md").write_text(render("fuzz_reproducer_README.md.j2", **page))
    return {"folder": str(out), "replay": page["replay"].splitlines()[0], "reproduced": reproduced}


# -- the run's reports -----------------------------------------------------------------------------

def summarize(run: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Cases per target and status: {"cpu": {"passed": 12, "failed": 0, ...}, ...}."""
    from .case import STATUSES

    table = {t: {s: 0 for s in STATUSES} for t in run["targets"]}
    for case in run["cases"]:
        for target, result in case["results"].items():
            table[target][result["status"]] += 1
    return table


def write_reports(out: Path, run: dict[str, Any]) -> list[Path]:
    """results.json, junit.xml (one <testcase> per case x target) and summary.md in `out`."""
    run = {**run, "summary": summarize(run)}
    paths = [out / "results.json", out / "junit.xml", out / "summary.md"]
    _write_text_atomic(paths[0], json.dumps(run, indent=2) + "\n")
    _write_text_atomic(paths[1], _junit(run))
    _write_text_atomic(paths[2], _markdown(run))
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    """A report is whole or absent: written beside its place and renamed into it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _junit(run: dict[str, Any]) -> str:
    cases = [(case, target, case["results"][target]) for case in run["cases"] for target in run["targets"]
             if target in case["results"]]
    count = lambda status: sum(r["status"] == status for _, _, r in cases)  # noqa: E731
    suites = ET.Element("testsuites", name="mhagen fuzz")
    suite = ET.SubElement(suites, "testsuite", name=f"mhagen fuzz --seed {run['seed']}", tests=str(len(cases)),
                          failures=str(count("failed")), errors="0",
                          skipped=str(count("refused") + count("compiled-not-run")),
                          time=f"{run.get('seconds', 0):.1f}")
    for case, target, result in cases:
        seconds = result.get("compile_seconds", 0) + result.get("run_seconds", 0)
        element = ET.SubElement(suite, "testcase", classname=f"mhagen.fuzz.{case['id']}", name=target,
                                time=f"{seconds:.3f}")
        if result["status"] == "failed":
            failure = ET.SubElement(element, "failure", message=result["message"][:1000],
                                    type=result.get("kind", "failure"))
            shrunk = next((f for f in run["failures"] if f["case"] == case["id"] and f["target"] == target), None)
            failure.text = (f"{result['message']}\n\n" + (f"shrunk spec ({shrunk['folder']}):\n{shrunk['spec_toml']}"
                                                           if shrunk else f"spec:\n{Spec.from_dict(case['spec']).to_toml()}"))
        elif result["status"] in ("refused", "compiled-not-run"):
            ET.SubElement(element, "skipped", message=f"{result['status']}: {result['message']}"[:1000])
        ET.SubElement(element, "system-out").text = f"seed {case['seed']}: {json.dumps(case['spec'])}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _markdown(run: dict[str, Any]) -> str:
    lines = [f"# mhagen fuzz --seed {run['seed']}", "",
             f"{len(run['cases'])} cases in {run.get('seconds', 0) / 60:.1f} min ({run['stopped']}); "
             f"targets {', '.join(run['targets'])}.", "",
             "| target | passed | failed | refused | compiled, not run |", "|---|---|---|---|---|"]
    for target, row in run["summary"].items():
        lines.append(f"| {target} | {row['passed']} | {row['failed']} | {row['refused']} | {row['compiled-not-run']} |")
    reasons = sorted({(t, r["message"]) for c in run["cases"] for t, r in c["results"].items()
                      if r["status"] in ("refused", "compiled-not-run")})
    if reasons:
        lines += ["", "Not run here, and why:", ""]
        lines += [f"- {t}: {m}" for t, m in reasons]
    lines += ["", "## Failures", ""]
    if not run["failures"]:
        lines.append("None.")
    for f in run["failures"]:
        lines += [f"### {f['case']} on `{f['target']}`: {f['kind']}", "", f"`{f['message']}`", "",
                  f"Shrunk in {f['tries']} tries ({'a local minimum' if f['minimal'] else 'stopped by the tries or time limit'}); "
                  f"reproducer `{f['folder']}`: {f.get('replay', '')}", "", "```toml", f["spec_toml"].strip(), "```", ""]
    return "\n".join(lines) + "\n"
