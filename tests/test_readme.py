"""The READMEs run: every ```sh and ```python block of README.md, and of the README a real build
writes into its bundle (templates/bundle_README.md.j2), is executed in order in a scratch folder,
so the documentation cannot drift from the code.

A block whose fence says `no-test` (```sh no-test: why) is not run: README.md's test command, and
blocks that need what a test cannot have (ten minutes, a cluster of GPU machines). The environment
set-up at the head of README command 1 (make and activate a virtual environment, pip install) is
left out: the test runs in the environment already installed, whose `mhagen`, `python3` and
`iree-run-module` come first on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# Leading `&&` steps of a command that set up an environment rather than use it.
SETUP = re.compile(r"^(python3 -m venv \S+|\. \S+/bin/activate|python3 -m pip install \S+)$")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    lang: str
    info: str
    code: str
    line: int

    @property
    def skipped(self) -> bool:
        return "no-test" in self.info.split(":")[0].split()

    def __str__(self) -> str:
        return f"```{self.info} block at line {self.line}"


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        info = m.group(1).strip()
        out.append(Block(info.split()[0] if info else "", info, m.group(2), text.count("\n", 0, m.start()) + 1))
    return out


def without_setup(command: str) -> str:
    """Command 1 without its leading venv / activate / pip install steps."""
    steps = command.strip().split(" && ")
    while steps and SETUP.match(steps[0].strip()):
        steps.pop(0)
    assert steps, f"nothing left to run of {command!r}"
    return " && ".join(steps)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["COLUMNS"] = "80"
    env.setdefault("KERAS_BACKEND", "jax")
    return env


def run_blocks(found: list[Block], cwd: Path) -> list[str]:
    """Run every sh and python block in order in `cwd`; returns what ran, for the report."""
    ran = []
    for block in found:
        if block.lang not in ("sh", "python") or block.skipped:
            continue
        if block.lang == "sh":
            argv = ["bash", "-euo", "pipefail", "-c", without_setup(block.code)]
        else:
            argv = [sys.executable, "-c", block.code]
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, (f"{block} failed with exit code {proc.returncode}:\n{block.code}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        ran.append(str(block))
    return ran


def test_readme_top_commands() -> None:
    """The README opens with exactly two commands; the second is the one .ci/run runs."""
    first, second = blocks(README.read_text())[:2]
    assert first.lang == second.lang == "sh"
    assert len(first.code.strip().splitlines()) == 1 and len(second.code.strip().splitlines()) == 1
    assert README.read_text().lstrip().startswith("# mhagen\n\n```sh")
    assert second.code.strip() in (ROOT / ".ci" / "run").read_text().splitlines()
    # Command 1 works where python3 is externally managed: it makes its own virtual environment.
    assert first.code.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    # Besides the test command, a block is left out only with its reason (`sh no-test: why`).
    skipped = [b for b in blocks(README.read_text()) if b.skipped]
    assert skipped[0] == second and all(b.info.partition(":")[2].strip() for b in skipped), skipped


def test_readme_toml_blocks_parse() -> None:
    for block in blocks(README.read_text()):
        if block.lang == "toml":
            tomllib.loads(block.code)


@pytest.mark.slow
def test_readme_blocks_run(tmp_path: Path) -> None:
    """Every sh and python block of README.md, in order, from a folder holding the examples."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    ran = run_blocks(blocks(README.read_text()), tmp_path)
    assert len(ran) >= 6, ran
    assert (tmp_path / "out" / "encoder" / "manifest.json").is_file()
    assert (tmp_path / "spec.toml").is_file() and (tmp_path / "spec.npz").is_file()


@pytest.mark.parametrize("case", ["static", "dynamic", "decoder", "cross"])
def test_bundle_readme_blocks_run(case: str, tmp_path: Path, monkeypatch) -> None:
    """The README of a real build: every block runs from the folder the build ran in (a dynamic
    bundle in a folder whose name has a space, to check the quoting)."""
    import mhagen
    from mhagen.bundle import build_bundle
    from mhagen.targets import parse_targets

    monkeypatch.chdir(tmp_path)
    if case == "static":
        spec, targets, out = mhagen.Spec.load(EXAMPLES / "encoder.toml"), "cpu,vmvx", "out/encoder"
    else:
        spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": {
            "query": [2, 8, 8], "value": [2, 8, 8], "use_causal_mask": True,
            "dynamic": ["batch", "seq"], "max_batch": 2, "max_seq": 8}})
        targets, out = "cpu", "out/dyn b"
    if case == "decoder":
        spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": {
            "query": [1, 4, 8], "value": [1, 4, 8], "use_causal_mask": True, "cache_max_length": 16}})
        targets, out = "cpu", "out/decoder"
    if case == "cross":
        spec = mhagen.Spec.from_dict({"layer": {"num_heads": 2, "key_dim": 4}, "call": {
            "query": [1, 4, 8], "value": [1, 12, 8], "cache_max_length": 12}})
        targets, out = "cpu", "out/cross"
    build_bundle(spec, parse_targets(targets), out)
    text = (tmp_path / out / "README.md").read_text()
    ran = run_blocks(blocks(text), tmp_path)
    # inputs, run.py, Python, run.py --bench, [decoding: run.py --decode, Python], iree-run-module
    assert len(ran) == (7 if case in ("decoder", "cross") else 5), ran
    assert (tmp_path / "output.npy").is_file()
    if case == "decoder":
        assert np.load(tmp_path / "generated" / "output.npy").shape == (1, 8, 8)
        assert np.load(tmp_path / "generated" / "cache.npy").shape == (1, 2, 16, 2, 4)
    assert "fixed" not in text
    if case == "dynamic":
        assert "| query | (<=2, <=8, 8) | float32 |" in text and "batch 1 to 2 and sequence length 1 to 8" in text
    elif case == "decoder":
        assert "## Decoding" in text and "1 x 2 x 16 x 2 x 4" in text
    elif case == "cross":
        assert "cross-attention decoder build" in text
        assert np.load(tmp_path / "generated" / "output.npy").shape == (1, 8, 8)
    else:
        assert "| query | (*, 16, 32) | float32 |" in text and "runs 2 rows at a time" in text
        assert "Shapes checked against the NumPy oracle: query (2, 16, 32), (1, 16, 32) in chunks" in text
