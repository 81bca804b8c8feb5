"""Weights swap: new weights into a built bundle, without tracing or compiling anything.

A bundle built with parameter weights (the default) keeps them in `weights.irpa`, which every module
loads at run time. `reweight` checks the new weights against the bundle's spec (names, shapes,
values, as `mhagen build` does), checks every file of the bundle against its SHA-256 (re-hashing a
tampered module would bless it), writes a new archive, re-runs verify against the oracle with the
new weights for every target that runs here (so the recorded results stay true; a failing target
is marked not runnable, as in `build_bundle`), re-hashes the manifest and swaps the result in with
the same lock and atomic exchange as `mhagen build` (see `mhagen.bundle`). A bundle whose weights
are inline (baked into its modules) is refused: it has to be rebuilt.

    reweight("out/encoder", "new_weights.npz")          # or a list / dict of arrays
    mhagen reweight out/encoder --weights new_weights.npz
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .bundle import _claimed, _failed, _finish, _os_error, _runs_here, _write_irpa
from .errors import BundleError, MhagenError
from .runtime import read_manifest, sha256_file
from .spec import Spec
from .weights import normalize_weights, weight_names
from .weights_io import load_weights_file

__all__ = ["reweight", "add_cli"]


def reweight(bundle_dir: str | Path, weights: Any, *, verify: bool = True, progress: bool = False) -> Path:
    """Replace the weights of the bundle at `bundle_dir`; returns its path.

    `weights`: a `.npz` / `.safetensors` path, a dict keyed by weight path, or a list in
    `layer.get_weights()` order. Raises `WeightsError` for weights that do not fit the spec,
    `BundleError` for a bundle that is inline, tampered or not a bundle (the bundle is then left
    as it was), and `VerifyError` after swapping in when a target's verify failed.

        reweight("out/encoder", "finetuned.npz")
        layer = mhagen.load("out/encoder", "cpu")     # the same modules, the new weights
    """
    if isinstance(weights, (str, Path)):
        weights = load_weights_file(weights)
    with _claimed(bundle_dir, force=False, need_bundle=True, progress=progress) as (dest, staging):
        manifest = read_manifest(dest)
        if not manifest.get("weights"):
            raise BundleError(f"Cannot reweight {dest}: it was built with inline weights (baked into its "
                              f"modules); rebuild it with `mhagen build SPEC --weights FILE --out {dest}`")
        spec = _spec(dest, manifest)
        ws = normalize_weights(spec, weights)
        names = weight_names(spec)
        weights_file = _checked_weights_entry(dest, manifest, names)
        listed = _checked_files(dest, manifest)
        try:
            for rel in listed:
                if rel not in (weights_file, "README.md"):   # both written anew below
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(dest / rel, staging / rel)
            _write_irpa(staging / weights_file, names, ws)
        except OSError as exc:
            raise _os_error(dest, exc) from None
        manifest["reweighted"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for entry in manifest["targets"]:   # results for the old weights no longer hold
            entry["runnable"] = True
            entry["verify"] = {"ran": False, "status": "not verified",
                               "reason": "weights replaced without verify"}
        _finish(dest, staging, manifest, spec, ws, verify=verify, progress=progress, run_py=False,
                runs={e["name"]: _runs_here(e) for e in manifest["targets"]})
    error = _failed(dest, manifest)
    if error:
        raise error
    return Path(bundle_dir)


def _spec(dest: Path, manifest: Mapping[str, Any]) -> Spec:
    targets = manifest.get("targets")
    if not (isinstance(targets, list) and targets and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in targets)):
        raise BundleError(f"Cannot reweight {dest}: manifest.json has no valid `targets` list; rebuild the bundle")
    try:
        return Spec.from_dict(manifest["spec"])
    except MhagenError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed spec in a manifest is the bundle's fault
        raise BundleError(f"Cannot reweight {dest}: manifest.json's `spec` is malformed ({exc})") from None


def _checked_weights_entry(dest: Path, manifest: Mapping[str, Any], names: list[str]) -> str:
    """The archive's file name, once the manifest's weight entries are the spec's."""
    entry = manifest["weights"]
    entries = entry.get("entries") if isinstance(entry, dict) else None
    file = entry.get("file") if isinstance(entry, dict) else None
    if (not isinstance(entries, list) or not isinstance(file, str)
            or [e.get("name") if isinstance(e, dict) else None for e in entries] != names):
        raise BundleError(f"Cannot reweight {dest}: manifest.json's weights entry does not match its spec "
                          f"(expected {names}); rebuild the bundle")
    return file


def _checked_files(dest: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Every file the manifest lists, each relative, inside the bundle, regular and unmodified."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"Cannot reweight {dest}: manifest.json lists no files; rebuild the bundle")
    for rel, info in files.items():
        parts = PurePosixPath(rel).parts
        path = dest / rel
        if (not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel
                or path.is_symlink() or not path.is_file() or path.resolve() != dest / Path(*parts)):
            raise BundleError(f"Cannot reweight {dest}: manifest.json lists {rel!r}, which is not a "
                              "regular file inside the bundle; rebuild the bundle")
        if (not isinstance(info, dict) or path.stat().st_size != info.get("size")
                or sha256_file(path) != info.get("sha256")):
            raise BundleError(f"Cannot reweight {dest}: {rel} does not match its SHA-256 in manifest.json "
                              "(truncated or modified); rebuild the bundle")
    return sorted(files)


def _cmd_reweight(args: Any) -> int:
    out = reweight(args.bundle, args.weights, verify=not args.no_verify, progress=True)
    print(f"reweighted {out}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `mhagen reweight`."""
    p = subparsers.add_parser(
        "reweight", help="replace a bundle's weights without recompiling",
        description="Write new weights into a bundle built with parameter weights (the default): "
        "the modules stay, the weights archive and manifest are replaced atomically, and verify "
        "re-runs with the new weights on every target that runs here.")
    p.add_argument("bundle", help="bundle directory written by `mhagen build`")
    p.add_argument("--weights", required=True,
                   help="the new weights (.npz/.safetensors), with the spec's names and shapes")
    p.add_argument("--no-verify", action="store_true", help="skip re-running the oracle check")
    p.set_defaults(func=_cmd_reweight)
