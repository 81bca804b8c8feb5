"""Sweeps (mhagen/sweep.py): a folder of specs x targets on a local process pool, and on a real
two-node Ray cluster on this machine with its worker node killed in the middle of the sweep.

Neither this process nor the pool opens Vulkan here (pool workers and Ray workers are processes of
their own); conftest orders the module last anyway (it names vulkan)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from corpus import refuses
from mhagen.spec import Spec
from mhagen.sweep import find_specs, load_cases, run_many, run_job, sweep
from mhagen.targets import parse_targets
from mhagen.verify import tolerance, verify_matrix

ROOT = Path(__file__).resolve().parent.parent
TARGETS = "cpu,vmvx,vulkan"
N_SPECS = 20


def write_specs(folder: Path, n: int = N_SPECS) -> None:
    """`n` small specs (each compiles in about a second), varied in heads, dims, lengths, value_dim,
    masks and dtype (every fifth is float16: cpu runs it, vmvx and vulkan refuse it), and one more
    that differs from spec00 only in its weights' seed: the same program, so no new compile."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        layer = f"num_heads = {1 + i % 2}\nkey_dim = {2 + i % 3}\nseed = {i}\n"
        layer += "value_dim = 3\n" if i % 4 == 1 else ""
        call = f"query = [1, {2 + i % 5}, 8]\nvalue = [1, {2 + (3 * i) % 5}, 8]\n"
        call += "attention_mask = true\n" if i % 3 == 1 else ""
        call += 'dtype = "float16"\n' if i % 5 == 2 else ""
        (folder / f"spec{i:02d}.toml").write_text(f"[layer]\n{layer}\n[call]\n{call}")
    (folder / "spec00_reseeded.toml").write_text(
        (folder / "spec00.toml").read_text().replace("seed = 0", "seed = 1234"))


def expected_status(spec: Spec, target: str) -> str:
    if spec.call.dtype == "float16" and target in ("vmvx", "vulkan"):
        return "refused"
    return "pass"


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "specs"
    write_specs(folder)
    return folder


@pytest.fixture(scope="module")
def local(specs: Path):
    """The sweep on a local pool of 2 workers: the matrix the Ray run must reproduce."""
    return sweep(load_cases(find_specs(specs)), parse_targets(TARGETS), jobs=2)


@pytest.mark.slow          # the 63-cell local sweep: 20 s with the compile cache warm, 2.5 min cold here
def test_pool_sweep_matrix(specs: Path, local) -> None:
    cases = {c.name: c for c in load_cases(find_specs(specs))}
    assert local.specs == sorted(cases) and local.targets == TARGETS.split(",")
    assert len(local.cells) == len(cases) * 3 >= 60
    for (name, target), cell in local.cells.items():
        assert cell.status == expected_status(cases[name].spec, target), cell
        if cell.status == "refused":
            assert f"cannot compute in float16" in cell.reason and cell.max_abs is None
        else:
            assert cell.max_abs is not None and cell.max_abs <= tolerance(cases[name].spec).atol, cell
    # One compile per (program, target): the reseeded spec's program is spec00's.
    assert local.compiles == 3 * N_SPECS
    assert not local.failed and local.executor == "process pool (2 workers)"


@pytest.mark.slow
def test_pool_sweep_matches_verify(specs: Path, local) -> None:
    """A cell says what `mhagen verify` says of that spec and target (same inputs, same module)."""
    for name in ("spec01.toml", "spec02.toml"):
        spec = Spec.load(specs / name)
        for row in verify_matrix(spec, parse_targets("cpu,vmvx")):
            cell = local.cell(name, row.target)
            assert (cell.status == "pass") == bool(row.passed), (cell, row)
            assert cell.max_abs == row.max_abs, (cell, row)


def test_run_many_runs_a_case_function(specs: Path) -> None:
    """The pool behind a sweep runs any picklable per-case function (as `mhagen fuzz` needs)."""
    from mhagen.sweep import trace_job

    case = load_cases([specs / "spec03.toml"])[0]
    program, _ = trace_job(case)
    calls = [(case, program, None, "vmvx", 0), (case, program, None, "nope", 0), (case, None, None, "vmvx", 0)]
    results = dict(run_many(run_job, calls, jobs=2))
    assert results[0].status == "pass" and results[0].max_abs <= 1e-5
    assert results[1].status == "refused" and "nope" in results[1].reason
    assert isinstance(results[2], AttributeError)      # a job that raised: the exception, not a hang


def test_pool_survives_a_job_that_kills_its_worker() -> None:
    """A worker that dies (as in a driver crash) breaks the pool: it is made again and its jobs
    rerun; the job that kills its worker every time ends as an error, the others finish."""
    import operator
    from concurrent.futures.process import BrokenProcessPool

    calls = [(abs, -2), (os._exit, 3), (abs, -5), (abs, -7)]
    results = dict(run_many(operator.call, calls, jobs=2))
    assert (results[0], results[2], results[3]) == (2, 5, 7)
    assert isinstance(results[1], BrokenProcessPool)


def test_cli_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mhagen.cli import main

    write_specs(tmp_path / "specs", 2)
    out = tmp_path / "matrix.json"
    rc = main(["verify", "--sweep", str(tmp_path / "specs"), "--targets", "cpu,cpu-aarch64", "--jobs", "2",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "spec00_reseeded.toml" in printed and "not run" in printed and "6 cells: 3 pass, 3 not run" in printed
    matrix = json.loads(out.read_text())
    assert [c["status"] for c in matrix["cells"]] == ["pass", "compiled, not run"] * 3
    assert "aarch64" in matrix["cells"][1]["reason"]


@pytest.mark.parametrize("argv, needle", [
    (["--sweep", "{tmp}/empty"], "no *.toml file in it"),
    (["--sweep", "{tmp}/notes"], "no *.toml file in it"),
    (["--sweep", "{tmp}/missing"], "no such folder"),
    (["--sweep", "{tmp}/bad"], "bad.toml: "),
    (["{tmp}/notes/x.toml", "--sweep", "{tmp}/notes"], "use one"),
    (["--sweep", "{tmp}/bad", "--jobs", "0"], "--jobs"),
    (["--sweep", "{tmp}/bad", "--ray", "nonsense"], "HOST:PORT"),
    (["--sweep", "{tmp}/good", "--ray", "127.0.0.1:{closed}"], "no Ray cluster answers there"),
    (["--sweep", "{tmp}/bad", "--ray", "auto", "--jobs", "2"], "--jobs and --ray"),
    ([], "needs a spec TOML file, or --sweep DIR"),
    (["examples/encoder.toml", "--jobs", "2"], "--jobs goes with --sweep"),
], ids=["empty-dir", "no-specs", "missing-dir", "invalid-spec", "spec-and-sweep", "jobs-0", "ray-malformed",
        "ray-nothing-there", "jobs-and-ray", "neither", "jobs-without-sweep"])
def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no specs here")
    write_specs(tmp_path / "good", 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad.toml").write_text("[layer]\nnum_heads = 0\nkey_dim = 2\n[call]\nquery = [1, 2, 4]\n"
                                              "value = [1, 2, 4]\n")
    if "no Ray cluster" in needle:
        pytest.importorskip("ray")          # without it, --ray says how to install it (tested below)
    argv = [a.format(tmp=tmp_path, closed=_free_port()) for a in argv]
    refuses(["verify", *argv, "--targets", "cpu"], capsys, needle=needle, max_lines=1, watch=[tmp_path])


def test_cli_ray_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_specs(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` fails as where it is not installed
    refuses(["verify", "--sweep", str(tmp_path), "--targets", "cpu", "--ray", "auto"], capsys,
            needle="pip install 'mhagen[ray]'", max_lines=1)


# ---------------------------------------------------------------------------------------------
# A real two-node Ray cluster on this machine.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_processes(pgid: int) -> list[int]:
    """The processes of a node `ray start` began in session `pgid`: its group, and the children of
    those (Ray starts each worker in a session of its own, under the node's raylet)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[2]))      # (ppid, pgid)
    group = {pid for pid, (_, g) in stats.items() if g == pgid}
    return sorted(group | {pid for pid, (ppid, _) in stats.items() if ppid in group})


def _busy(pgid: int) -> list[str]:
    """The jobs a node's Ray workers are running now (a worker's title is `ray::FUNCTION` while it
    runs one, `ray::IDLE` between)."""
    titles = []
    for pid in _node_processes(pgid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and title.removeprefix("ray::") in ("trace_job", "compile_job", "run_job"):
            titles.append(title)
    return titles


def _kill_node(pgid: int) -> None:
    """SIGKILL every process of one node, as if its machine lost power: ours only, never `ray stop`
    (which stops every Ray process of this machine, other people's too)."""
    for pid in _node_processes(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    """`ray start --head` and one `ray start --address` worker node, each in a session of its own."""

    def __init__(self, head_resources: dict[str, int], worker_resources: dict[str, int]):
        self.temp = tempfile.mkdtemp(prefix="mhray")      # short: Ray's socket paths must fit 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Workers import this checkout's mhagen and use the same compile cache as this process.
        # Ray's memory monitor is off: it kills workers while the *machine* is over 95% used, which
        # on a shared CI machine says nothing of this test (seen here: another process's 15 GB).
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", self.temp,
                  "--object-store-memory", str(200 * 2**20), "--disable-usage-stats",
                  "--include-log-monitor", "false", "--dashboard-agent-listen-port", "{port}",
                  "--node-manager-port", "{port}", "--object-manager-port", "{port}",
                  "--runtime-env-agent-port", "{port}", "--metrics-export-port", "{port}"]
        self.pgids: list[int] = []
        self._start(["--head", "--port", str(self.port), "--include-dashboard", "false",
                     "--ray-client-server-port", "{port}", "--resources", json.dumps(head_resources), *common])
        self._start(["--address", self.address, "--resources", json.dumps(worker_resources), *common])

    def _start(self, args: list[str]) -> None:
        args = [str(_free_port()) if a == "{port}" else a for a in args]
        ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        child = subprocess.Popen([ray, "start", *args], env=self.env, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pgids.append(child.pid)              # the session, so the node's processes, is this pgid
        out = child.communicate(timeout=120)[0]
        assert child.returncode == 0, out[-2000:]

    def stop(self) -> None:
        for pgid in self.pgids:
            _kill_node(pgid)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_two_nodes_survive_a_node_kill(specs: Path, local) -> None:
    """20+ specs x cpu, vmvx, vulkan on a head node (every device) and a worker node (Vulkan only):
    once a quarter of the cells are in, the worker node is killed while it runs a job, and the
    matrix still equals the local pool's. CPU and vmvx runs land only on the head (resource routing)."""
    ray = pytest.importorskip("ray")
    cluster = Cluster({"local-task": 1, "local-sync": 1, "vulkan": 1}, {"vulkan": 1})
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2, nodes
        head = next(f"node {i[:12]}" for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        worker = next(f"node {i[:12]}" for i in nodes if f"node {i[:12]}" != head)
        filled: list = []
        killed_at: list[int] = []
        in_flight: list[str] = []
        total = len(find_specs(specs)) * 3

        def kill_worker_midway() -> None:
            # Once a quarter of the cells are in, kill the worker node while it runs a run job (its
            # module came from another job), or from half on while it runs any job.
            while not killed_at and len(filled) < total:
                busy = _busy(cluster.pgids[1]) if len(filled) >= total // 4 else []
                if any(b == "ray::run_job" for b in busy) or (busy and len(filled) >= total // 2):
                    _kill_node(cluster.pgids[1])
                    killed_at.append(len(filled))
                    in_flight.extend(busy)
                time.sleep(0.02)

        killer = threading.Thread(target=kill_worker_midway, daemon=True)
        cases = load_cases(find_specs(specs))
        start = time.perf_counter()
        killer.start()
        matrix = sweep(cases, parse_targets(TARGETS), ray_address=cluster.address,
                       on_cell=lambda cell, done, total: filled.append(cell))
        seconds = time.perf_counter() - start
        killer.join()
        print(f"two-node Ray sweep: {len(matrix.cells)} cells in {seconds:.1f} s; worker node killed "
              f"after {killed_at} cells, running {in_flight}")
        # Killed in the middle, with a job running there: that job's cell came back all the same.
        assert killed_at and killed_at[0] < len(matrix.cells) * 3 // 4 and in_flight, (killed_at, in_flight)
        assert any(c.where == head for c in list(matrix.cells.values())[killed_at[0]:])
        # Same matrix as the local pool's: statuses, and errors within the dtype's tolerance.
        by_name = {c.name: c for c in cases}
        assert matrix.specs == local.specs and matrix.targets == local.targets
        for key, cell in matrix.cells.items():
            mine = local.cells[key]
            assert cell.status == mine.status, (cell, mine)
            if cell.max_abs is not None or mine.max_abs is not None:
                assert abs(cell.max_abs - mine.max_abs) <= tolerance(by_name[key[0]].spec).atol, (cell, mine)
        # Runs only where their device is declared; compiles anywhere, once per (program, target):
        # `cpu` (code for the running node's CPU) compiles in its run job.
        for (_, target), cell in matrix.cells.items():
            if cell.status == "pass":
                assert cell.where == head or (cell.where == worker and target == "vulkan"), cell
        assert matrix.compiles == 2 * N_SPECS
        # Any per-case job (as `mhagen fuzz` has) on the cluster, routed by its resource.
        from mhagen.sweep import trace_job

        case = by_name["spec03.toml"]
        program, _ = trace_job(case)
        [(_, cell)] = run_many(run_job, [(case, program, None, "vmvx", 0)], ray_address=cluster.address,
                               resource_of=lambda args: "local-sync")
        assert cell.status == "pass" and cell.where == head, cell
        # No node declares `cuda`: its cells say so instead of waiting for one.
        lone = sweep(cases[:1], parse_targets("cuda-sm80"), ray_address=cluster.address)
        cell = lone.cell(cases[0].name, "cuda-sm80")
        assert cell.status == "compiled, not run" and "`cuda` resource" in cell.reason, cell
    finally:
        ray.shutdown()
        cluster.stop()
