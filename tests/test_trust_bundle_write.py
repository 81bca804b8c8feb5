"""Trust, the bundle write side: `--out` never loses what is not mhagen's, nothing is left beside a
bundle, a build killed at any moment leaves the old or the new complete bundle, a target whose verify
failed is not runnable, and `mhagen reweight` swaps weights without recompiling.

The last family, invalid output folders (read-only, full, through a file, uncreatable), is part of
the trust corpus (`tests/corpus/`): each case exits 2 with one line naming the path and the cause,
and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mhagen
import mhagen.bundle
import mhagen.verify
from conftest import ROOT
from corpus import refuses, tree_state
from mhagen.cli import main
from mhagen.verify import random_inputs
from mhagen.weights import weight_names

SPEC_TEXT = "[layer]\nnum_heads = 2\nkey_dim = 4\n\n[call]\nquery = [2, 5, 8]\nvalue = [2, 7, 8]\n" \
            "attention_mask = true\n"


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC_TEXT)
    return path


def _spec() -> mhagen.Spec:
    return mhagen.Spec.from_toml(SPEC_TEXT)


def _weights(scale: float) -> dict[str, np.ndarray]:
    spec = _spec()
    return {k: np.asarray(v) * scale for k, v in zip(weight_names(spec), mhagen.init_weights(spec))}


def _build(spec_file: Path, out: Path, *extra: str) -> int:
    return main(["build", str(spec_file), "--target", "cpu", "--out", str(out), *extra])


def _litter(out: Path) -> list[str]:
    """Whatever sits beside `out` that mhagen might have made (`.NAME.*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _no_trace(monkeypatch) -> None:
    """Refusals must come before any work: tracing is an error from here on."""
    def refuse(*args, **kwargs):
        raise AssertionError("traced before refusing")
    monkeypatch.setattr(mhagen.bundle, "trace", refuse)


# ---------------------------------------------------------------------------------------------
# (a) never destroy what is not ours
# ---------------------------------------------------------------------------------------------
def test_user_folder_refused_then_replaced_with_force(spec_file: Path, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    out = tmp_path / "scratch_out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with monkeypatch.context() as m:
        _no_trace(m)
        refuses(["build", str(spec_file), "--target", "cpu", "--out", str(out)], capsys,
                needle=[str(out), "not an mhagen bundle", "--force"], watch=[tmp_path])
    assert (out / "notes.txt").read_text() == "my notes"
    assert _build(spec_file, out, "--force") == 0
    assert not (out / "notes.txt").exists()
    mhagen.load(out, "cpu")
    assert _litter(out) == []


def test_file_as_out_refused_then_replaced_with_force(spec_file: Path, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    with monkeypatch.context() as m:
        _no_trace(m)
        refuses(["build", str(spec_file), "--target", "cpu", "--out", str(out)], capsys,
                needle=[str(out), "is a file"], watch=[tmp_path])
    assert out.read_text() == "my notes"
    assert _build(spec_file, out, "--force") == 0
    assert out.is_dir() and _litter(out) == []
    mhagen.load(out, "cpu")


def test_empty_folder_and_own_bundle_are_replaced(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    assert _build(spec_file, out) == 0                      # an empty folder
    (out / "__pycache__").mkdir()                            # what `import mhagen_runtime` may leave
    (out / "__pycache__" / "x.pyc").write_bytes(b"")
    assert _build(spec_file, out) == 0                      # our own bundle
    assert _litter(out) == []


# ---------------------------------------------------------------------------------------------
# (b) no lock or staging litter
# ---------------------------------------------------------------------------------------------
def test_no_lock_or_staging_beside_the_bundle(spec_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    out = tmp_path / "b"
    (tmp_path / ".b.lock").write_text("")                    # what mhagen 0.1 left: tidied away
    for _ in range(2):
        assert _build(spec_file, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "run", "spec.toml"]
    lock = mhagen.bundle._lock_path(out)
    assert lock.parent == tmp_path / "run" / "mhagen" / "locks" and not lock.exists()
    assert lock.name == f"{hashlib.sha256(os.fsencode(out.resolve())).hexdigest()}.lock"


# ---------------------------------------------------------------------------------------------
# (c) SIGKILL at 10 moments: --out holds the old or the new complete bundle
# ---------------------------------------------------------------------------------------------
# moment -> (what --out holds after the kill, the litter the kill leaves, force the two-rename swap)
KILL_MOMENTS = {
    "locked": ("old", "", False),
    "staging-created": ("old", "staging", False),
    "traced": ("old", "staging", False),
    "compiled": ("old", "staging", False),
    "verified": ("old", "staging", False),
    "before-swap": ("old", "staging", False),
    "exchanged": ("new", "staging", False),        # the staging name now holds the old bundle
    "removing-old": ("new", "staging", False),
    "between-renames": ("missing", "old staging", True),   # no RENAME_EXCHANGE: the next run moves the old one back
    "after-renames": ("new", "old", True),
}


def _start_build(spec_file: Path, out: Path, weights: Path, pause_at: str, *, no_exchange: bool = False
                 ) -> subprocess.Popen:
    env = {**os.environ, "MHAGEN_TEST_PAUSE_AT": pause_at, "PYTHONPATH": str(ROOT)}
    if no_exchange:
        env["MHAGEN_TEST_NO_EXCHANGE"] = "1"
    return subprocess.Popen([sys.executable, "-m", "mhagen.cli", "build", str(spec_file), "--target", "cpu",
                             "--out", str(out), "--weights", str(weights)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _kill_at(proc: subprocess.Popen, point: str, timeout: float = 180.0) -> None:
    """Wait until the build announces `point`, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            seen += chunk
            if f"mhagen-test: paused at {point}".encode() in seen:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc.stderr.close()
                return
            if not chunk and proc.poll() is not None:
                break
    proc.kill()
    proc.wait(30)
    pytest.fail(f"the build never reached {point}: rc {proc.returncode}, stderr {seen.decode()[-2000:]}")


def _holds(out: Path, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> str:
    """"old", "new" or "missing": which complete bundle `out` is (every hash checked on load)."""
    if not os.path.lexists(out):
        return "missing"
    got = mhagen.load(out, "cpu")(**inputs)
    for name, want in expected.items():
        if np.allclose(got, want, atol=1e-5):
            return name
    raise AssertionError("--out holds a bundle whose outputs are neither the old nor the new weights'")


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkill_leaves_old_or_new_bundle(moment: str, spec_file: Path, tmp_path: Path) -> None:
    holds, litter, no_exchange = KILL_MOMENTS[moment]
    out = tmp_path / "b"
    spec = _spec()
    old_w, new_w = _weights(1.0), _weights(-0.5)
    np.savez(tmp_path / "new.npz", **new_w)
    np.savez(tmp_path / "old.npz", **old_w)
    assert main(["build", str(spec_file), "--target", "cpu", "--out", str(out),
                 "--weights", str(tmp_path / "old.npz")]) == 0
    inputs = random_inputs(spec, seed=3)
    expected = {"old": mhagen.reference(spec, list(old_w.values()), **inputs),
                "new": mhagen.reference(spec, list(new_w.values()), **inputs)}

    _kill_at(_start_build(spec_file, out, tmp_path / "new.npz", moment, no_exchange=no_exchange), moment)
    assert _holds(out, inputs, expected) == holds
    assert [name.split(".")[2] for name in _litter(out)] == litter.split()
    if holds == "missing":   # the old bundle is whole beside it; the next run puts it back first
        olds = [p for p in tmp_path.iterdir() if p.name.startswith(".b.old.")]
        assert len(olds) == 1 and _holds(olds[0], inputs, expected) == "old"
        _kill_at(_start_build(spec_file, out, tmp_path / "new.npz", "locked"), "locked")
        assert _holds(out, inputs, expected) == "old"

    assert main(["build", str(spec_file), "--target", "cpu", "--out", str(out),
                 "--weights", str(tmp_path / "new.npz")]) == 0
    assert _holds(out, inputs, expected) == "new"
    assert _litter(out) == [] and not mhagen.bundle._lock_path(out).exists()


# ---------------------------------------------------------------------------------------------
# (d) a failed verify: exit 1 naming the target, written but not runnable
# ---------------------------------------------------------------------------------------------
def test_failed_verify_exits_1_and_marks_target_not_runnable(spec_file: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    real = mhagen.verify.expected_outputs
    monkeypatch.setattr(mhagen.verify, "expected_outputs",
                        lambda spec, weights, inputs: [o + 1.0 for o in real(spec, weights, inputs)])
    out = tmp_path / "b"
    capsys.readouterr()
    assert main(["build", str(spec_file), "--targets", "cpu,vmvx", "--out", str(out)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cpu, vmvx disagree with the oracle" in err[0] and "not runnable" in err[0], err
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["targets"]:
        assert entry["verify"]["passed"] is False and entry["runnable"] is False
    assert "not runnable" in (out / "README.md").read_text()
    with pytest.raises(mhagen.BundleError, match="not runnable"):
        mhagen.load(out, "cpu")
    mhagen.load(out, "cpu", allow_failed=True)   # the explicit opt-in
    assert _litter(out) == []


# ---------------------------------------------------------------------------------------------
# (e) reweight
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def built(spec_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    assert _build(spec_file, out) == 0
    return out


def test_reweight_swaps_weights_without_recompiling(built: Path, tmp_path: Path, monkeypatch) -> None:
    def no_compile(*args, **kwargs):
        raise AssertionError("reweight compiled or traced")
    for module, name in [(mhagen.bundle, "compile_program"), (mhagen.bundle, "trace"),
                         (mhagen.compile, "compile_program")]:
        monkeypatch.setattr(module, name, no_compile)
    old = json.loads((built / "manifest.json").read_text())
    new_w = _weights(-0.7)
    np.savez(tmp_path / "new.npz", **new_w)
    started = time.perf_counter()
    assert main(["reweight", str(built), "--weights", str(tmp_path / "new.npz")]) == 0
    seconds = time.perf_counter() - started
    manifest = json.loads((built / "manifest.json").read_text())
    old_hash = old["files"]["weights.irpa"]["sha256"]
    assert manifest["files"]["weights.irpa"]["sha256"] != old_hash
    assert old_hash not in json.dumps(manifest)
    assert manifest["files"]["cpu/module.vmfb"] == old["files"]["cpu/module.vmfb"]
    assert manifest["targets"][0]["verify"]["status"] == "pass" and manifest["targets"][0]["runnable"]
    spec = _spec()
    inputs = random_inputs(spec, seed=7)
    np.testing.assert_allclose(mhagen.load(built, "cpu")(**inputs),
                               mhagen.reference(spec, list(new_w.values()), **inputs), atol=1e-5)
    assert seconds < 30, seconds
    assert _litter(built) == []


REWEIGHT_BAD = {
    "wrong_shape": (lambda w: {**w, "query/kernel": np.zeros((8, 2, 5), np.float32)}, "query/kernel"),
    "missing_key": (lambda w: {k: v for k, v in w.items() if k != "value/bias"}, "value/bias"),
    "extra_key": (lambda w: {**w, "gate/kernel": np.zeros((8, 8), np.float32)}, "gate/kernel"),
    "non_finite": (lambda w: {**w, "key/bias": np.full_like(w["key/bias"], np.nan)}, "key/bias"),
    "integer_dtype": (lambda w: {**w, "key/bias": np.zeros(w["key/bias"].shape, np.int32)}, "key/bias"),
}


@pytest.mark.parametrize("case", sorted(REWEIGHT_BAD))
def test_reweight_refuses_bad_weights(case: str, built: Path, tmp_path: Path, capsys) -> None:
    make, needle = REWEIGHT_BAD[case]
    weights = make(_weights(1.0))
    if case == "non_finite":
        try:
            mhagen.weights.normalize_weights(_spec(), weights)
            pytest.skip("normalize_weights does not refuse non-finite weights yet (another part of issue 12)")
        except mhagen.WeightsError:
            pass
    np.savez(tmp_path / "bad.npz", **weights)
    refuses(["reweight", str(built), "--weights", str(tmp_path / "bad.npz")], capsys, needle=needle,
            watch=[built.parent])
    mhagen.load(built, "cpu")


def test_reweight_refuses_inline_tampered_and_foreign(spec_file: Path, tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "w.npz", **_weights(0.5))
    argv = ["reweight", "", "--weights", str(tmp_path / "w.npz")]
    inline = tmp_path / "inline"
    assert _build(spec_file, inline, "--weights", "inline") == 0
    refuses([*argv[:1], str(inline), *argv[2:]], capsys, needle=["inline weights", "rebuild"],
            watch=[tmp_path])
    tampered = tmp_path / "tampered"
    assert _build(spec_file, tampered) == 0
    vmfb = tampered / "cpu" / "module.vmfb"
    data = bytearray(vmfb.read_bytes())
    data[len(data) // 2] ^= 1
    vmfb.write_bytes(bytes(data))
    refuses([*argv[:1], str(tampered), *argv[2:]], capsys, needle=["cpu/module.vmfb", "SHA-256"],
            watch=[tmp_path])
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    refuses([*argv[:1], str(user), *argv[2:]], capsys, needle=[str(user), "not an mhagen bundle"],
            watch=[tmp_path])
    refuses([*argv[:1], str(tmp_path / "absent"), *argv[2:]], capsys, needle="does not exist",
            watch=[tmp_path])


# ---------------------------------------------------------------------------------------------
# (f) corpus family: invalid output folders
# ---------------------------------------------------------------------------------------------
def _chattr(path: Path, flag: str) -> str | None:
    """Set or clear the immutable flag; returns why it cannot be used, or None."""
    if not shutil.which("chattr"):
        return "no chattr here"
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    return None if done.returncode == 0 else f"chattr {flag} refused: {done.stderr.strip()}"


@pytest.fixture()
def immutable(tmp_path: Path):
    """A read-only folder: root ignores permission bits, so the immutable attribute stands in."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(exist_ok=True)
        why = _chattr(path, "+i")
        if why:
            pytest.skip(f"cannot make a read-only folder: {why}")
        made.append(path)
        return path

    yield make
    for path in made:
        _chattr(path, "-i")


def _mount_small_tmpfs(mount: Path) -> Path:
    """A 64 KiB tmpfs at `mount` (unmounted by the test), or a skip with the reason."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a 64 KiB tmpfs: {done.stderr.strip()}")
    return mount


def _case_readonly_parent(tmp_path, immutable, tmpfs):
    ro = immutable(tmp_path / "ro")
    return ro / "bundle", [ro], [str(ro), "Operation not permitted"]


def _case_readonly_out(tmp_path, immutable, tmpfs):
    ro = immutable(tmp_path / "ro")        # an empty folder may be replaced, but this one cannot move
    return ro, [tmp_path], [str(ro), "Operation not permitted"]


def _case_full_disk(tmp_path, immutable, tmpfs):
    full = tmpfs()
    return full / "bundle", [full], [str(full / "bundle"), "No space left on device"]


def _case_through_a_file(tmp_path, immutable, tmpfs):
    (tmp_path / "file.txt").write_text("mine")
    return tmp_path / "file.txt" / "sub", [tmp_path], [str(tmp_path / "file.txt"), "is a file, not a folder"]


def _case_uncreatable_parent(tmp_path, immutable, tmpfs):
    ro = immutable(tmp_path / "ro")
    return ro / "a" / "b" / "bundle", [tmp_path], [str(ro / "a"), "Operation not permitted"]


def _case_parent_in_proc(tmp_path, immutable, tmpfs):
    return Path("/proc/mhagen-no-such-dir/bundle"), [tmp_path], ["/proc/mhagen-no-such-dir", "cannot create"]


def _case_user_folder(tmp_path, immutable, tmpfs):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    return tmp_path / "mine", [tmp_path], [str(tmp_path / "mine"), "not an mhagen bundle", "--force"]


def _case_bundle_with_user_file(tmp_path, immutable, tmpfs):
    out = tmp_path / "b"
    assert _build(tmp_path / "spec.toml", out) == 0
    (out / "cpu" / "my-results.npy").write_text("mine")
    return out, [tmp_path], ["did not write", "cpu/my-results.npy"]


def _case_foreign_manifest(tmp_path, immutable, tmpfs):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "someone else\'s"}')
    return tmp_path / "other", [tmp_path], ["not mhagen's"]


def _case_manifest_fifo(tmp_path, immutable, tmpfs):
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "manifest.json")     # reading it would hang
    return tmp_path / "fifo", [tmp_path], ["manifest.json is not a regular file"]


def _case_symlink_to_user_folder(tmp_path, immutable, tmpfs):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    return tmp_path / "link", [tmp_path], [str(tmp_path / "mine"), "not an mhagen bundle"]


def _case_root(tmp_path, immutable, tmpfs):
    return Path("/"), [tmp_path], ["`--out`"]


OUTPUT_CASES = {name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")}
_NEEDS_WORK = {"full_disk", "readonly_out"}   # refused when writing or swapping; the others before tracing


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_invalid_output_refused(case: str, spec_file: Path, tmp_path: Path, immutable, capsys,
                                monkeypatch) -> None:
    mounted: list[Path] = []

    def tmpfs() -> Path:
        mounted.append(_mount_small_tmpfs(tmp_path / "full"))
        return mounted[-1]

    try:
        out, watch, needles = OUTPUT_CASES[case](tmp_path, immutable, tmpfs)
        if case not in _NEEDS_WORK:
            _no_trace(monkeypatch)
        refuses(["build", str(spec_file), "--target", "cpu", "--out", str(out)], capsys, needle=needles,
                watch=watch)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        for folder in watch:
            assert not [k for k in tree_state(folder) if ".staging." in k or ".old." in k]
    finally:
        for mount in mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)



def test_look_alike_names_and_caches_are_never_touched(tmp_path: Path) -> None:
    """Only what a killed build recorded in its lock is undone: a user's folder named like mhagen's
    staging or old bundle stays, and so does a user's file in a bundle's __pycache__ (refused)."""
    from mhagen.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text("[layer]\nnum_heads = 2\nkey_dim = 4\n[call]\nquery = [2, 3, 8]\nvalue = [2, 5, 8]\n")
    (tmp_path / ".b.old.12345678").mkdir()
    (tmp_path / ".b.old.12345678" / "mydata.txt").write_text("mine")
    (tmp_path / ".b.staging.1.abcdefgh").write_text("mine too")
    assert main(["build", str(spec), "--target", "cpu", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / ".b.old.12345678" / "mydata.txt").read_text() == "mine"
    assert (tmp_path / ".b.staging.1.abcdefgh").read_text() == "mine too"
    (tmp_path / "b" / "__pycache__").mkdir()
    (tmp_path / "b" / "__pycache__" / "thesis.docx").write_text("mine")
    assert main(["build", str(spec), "--target", "cpu", "--out", str(tmp_path / "b")]) == 2
    assert (tmp_path / "b" / "__pycache__" / "thesis.docx").read_text() == "mine"
