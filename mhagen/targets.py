"""Hardware targets as data: one TOML file per target in `targets/`.

A target names an IREE backend, its compiler flags and the runtime driver that executes it. A user
adds a target by adding a file (to the project's `targets/`, or to a directory named in
`MHAGEN_TARGETS_PATH`).

    t = get_target("cpu")
    compile_flags(t)       # ['--iree-hal-target-backends=llvm-cpu', '--iree-llvmcpu-target-cpu=host']
"""

from __future__ import annotations

import functools
import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TargetError
from .runtime import host_arch, host_cpu_features
from .runtime.devices import subgroup_mismatch

__all__ = ["Target", "all_targets", "get_target", "parse_targets", "compile_flags", "stated_flags",
           "host_arch",
           "Availability", "availability", "data_dir"]

_KEYS = {"name", "description", "backend", "driver", "flags", "arch", "dtypes", "refused",
         "cpu_features", "device_hint", "tuning_spec", "dtype_cpu_features",
         "tuning_spec_cpu_features", "subgroup_sizes"}
_BACKENDS = ("llvm-cpu", "vmvx", "vulkan-spirv", "cuda", "rocm", "metal-spirv")


def data_dir(name: str) -> Path:
    """`targets/` or `templates/`: inside the installed package, else beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise TargetError(f"mhagen's `{name}/` directory is missing from the installation ({here})")


@dataclass(frozen=True)
class Target:
    """One hardware target. `arch` is the CPU architecture code runs on: a name, "host" or "any"."""

    name: str
    description: str
    backend: str
    driver: str
    flags: tuple[str, ...] = ()
    arch: str = "any"
    dtypes: tuple[str, ...] = ("float32",)
    refused: str | None = None
    cpu_features: tuple[str, ...] = ()
    device_hint: str | None = None
    tuning_spec: str | None = None     # absolute path of an IREE tuning spec (transform library)
    tuning_spec_cpu_features: tuple[str, ...] = ()  # host targets: use the spec only on these CPUs
    # dtype -> CPU features the building host must have for that dtype (arch = "host" targets)
    dtype_cpu_features: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # GPU targets: the subgroup sizes (lanes) the compiled code assumes; it runs only on devices whose
    # subgroups are one of them (IREE does not ask the driver for the size it compiled for)
    subgroup_sizes: tuple[int, ...] = ()
    source: str = field(default="", compare=False)

    @property
    def is_cpu(self) -> bool:
        return self.backend in ("llvm-cpu", "vmvx")

    @property
    def active_tuning_spec(self) -> str | None:
        """The tuning spec this build uses: none on a host that lacks the features it is for."""
        if not self.tuning_spec:
            return None
        if self.arch == "host" and not set(self.tuning_spec_cpu_features) <= host_cpu_features():
            return None
        return self.tuning_spec

    def missing_cpu_features(self, dtype: str) -> list[str]:
        """CPU features this host lacks that the target needs to compute in `dtype` (host targets)."""
        needed = dict(self.dtype_cpu_features).get(dtype, ())
        return sorted(set(needed) - host_cpu_features()) if self.arch == "host" else []

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "description": self.description, "backend": self.backend,
               "driver": self.driver, "flags": list(self.flags), "arch": self.arch,
               "dtypes": list(self.dtypes)}
        if self.subgroup_sizes:
            out["subgroup_sizes"] = list(self.subgroup_sizes)
        if self.active_tuning_spec:
            spec = Path(self.active_tuning_spec)
            out["tuning_spec"] = spec.name
            out["tuning_spec_sha256"] = hashlib.sha256(spec.read_bytes()).hexdigest()
        return out


def _features(path: Path, key: str, value: Any) -> tuple[str, ...]:
    """A list of CPU feature names from a target file (a bare string would split into letters)."""
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise TargetError(f"Target file {path}: `{key}` must be a list of CPU feature names as "
                          f"/proc/cpuinfo spells them, e.g. [\"avx512f\"]; got {value!r}")
    return tuple(value)


def _load(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise TargetError(f"Target file {path} is unreadable: {str(exc).splitlines()[0][:160]}") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise TargetError(f"Target file {path}: unknown key(s) {unknown}; expected some of {sorted(_KEYS)}")
    for key in ("name", "backend", "driver"):
        if not isinstance(data.get(key), str):
            raise TargetError(f"Target file {path}: `{key}` must be a string")
    if data["backend"] not in _BACKENDS:
        raise TargetError(f"Target file {path}: backend {data['backend']!r} is not one of {list(_BACKENDS)}")
    tuning = data.get("tuning_spec")
    if tuning is not None:
        resolved = (path.parent / str(tuning)).resolve()
        if not resolved.is_file():
            raise TargetError(f"Target file {path}: tuning_spec {tuning!r} is not a file "
                              f"(looked for {resolved})")
        tuning = str(resolved)
    needs = data.get("dtype_cpu_features", {})
    if not isinstance(needs, dict):
        raise TargetError(f"Target file {path}: `dtype_cpu_features` must map dtype names to lists "
                          f"of CPU feature names, e.g. {{ bfloat16 = [\"avx512_bf16\"] }}")
    needs = {dtype: _features(path, f"dtype_cpu_features.{dtype}", v) for dtype, v in needs.items()}
    lanes = data.get("subgroup_sizes", [])
    if not isinstance(lanes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                              for n in lanes):
        raise TargetError(f"Target file {path}: `subgroup_sizes` must be a list of positive integers "
                          f"(lanes), e.g. [32]; got {lanes!r}")
    return Target(
        name=data["name"], description=data.get("description", ""), backend=data["backend"],
        driver=data["driver"], flags=tuple(data.get("flags", ())), arch=data.get("arch", "any"),
        dtypes=tuple(data.get("dtypes", ("float32",))), refused=data.get("refused"),
        cpu_features=_features(path, "cpu_features", data.get("cpu_features", [])),
        device_hint=data.get("device_hint"),
        tuning_spec=tuning, source=str(path),
        dtype_cpu_features=tuple(sorted(needs.items())),
        tuning_spec_cpu_features=_features(path, "tuning_spec_cpu_features",
                                           data.get("tuning_spec_cpu_features", [])),
        subgroup_sizes=tuple(lanes),
    )


@functools.lru_cache(maxsize=None)
def _targets(search: tuple[str, ...]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for directory in search:
        for path in sorted(Path(directory).glob("*.toml")):
            target = _load(path)
            out[target.name] = target
    return out


def _search_path() -> tuple[str, ...]:
    extra = [p for p in os.environ.get("MHAGEN_TARGETS_PATH", "").split(os.pathsep) if p]
    return (str(data_dir("targets")), *extra)


def all_targets() -> dict[str, Target]:
    """Every target by name, the project's and those in `MHAGEN_TARGETS_PATH` (which override)."""
    return _targets(_search_path())


def get_target(name: str | Target) -> Target:
    """Look a target up by name; an unknown name lists the valid ones. Refused targets raise here."""
    if isinstance(name, Target):
        target = name
    else:
        targets = all_targets()
        if name not in targets:
            raise TargetError(f"Received an invalid value for argument `target`, expected one of "
                              f"{', '.join(sorted(targets))}. Received: target={name!r}{_did_you_mean(name, targets)}")
        target = targets[name]
    if target.refused:
        raise TargetError(f"Target `{target.name}` is refused: {target.refused}")
    broken = known_broken(target)
    if broken:
        raise TargetError(f"Target `{target.name}` is refused: {broken}")
    return target


def _did_you_mean(name: str, choices: Any) -> str:
    """` (did you mean X?)` for a near miss or a family name (`cuda` -> `cuda-sm80`), else ''."""
    import difflib

    names = sorted(choices)
    family = [n for n in names if isinstance(name, str) and n.startswith(f"{name}-")]
    close = family[:1] or difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


# Flags IREE 3.13 accepts but cannot compile attention for (checked on this compiler): refused up
# front with what to use instead, rather than failing deep in the compiler.
_KNOWN_BROKEN = {
    "--iree-cuda-target=sm_90": "cuda-sm80 (its code runs on Hopper too)",
    "--iree-cuda-target=sm_90a": "cuda-sm80 (its code runs on Hopper too)",
    "--iree-cuda-target=sm_100": "cuda-sm80 or cuda-sm89",
    "--iree-cuda-target=sm_100a": "cuda-sm80 or cuda-sm89",
    "--iree-cuda-target=sm_120a": "--iree-cuda-target=sm_120",
    "--iree-hip-target": "--iree-rocm-target=gfxNNNN (the hip spelling no longer exists)",
}


def known_broken(target: Target) -> str | None:
    """Why IREE 3.13 cannot compile `target`'s flags, or None."""
    for flag in target.flags:
        for bad, instead in _KNOWN_BROKEN.items():
            if flag == bad or (bad.endswith("-target") and flag.startswith(bad + "=")):
                return f"IREE 3.13 cannot compile with `{flag}`; use {instead}"
    return None


def parse_targets(value: str | list[str] | tuple[str, ...]) -> list[Target]:
    """`"all"`, a comma-separated string or a list of names -> targets (refused ones excluded from all)."""
    if isinstance(value, str):
        if value.strip() == "all":
            return [t for _, t in sorted(all_targets().items())
                    if not t.refused and not known_broken(t)]
        value = [v.strip() for v in value.split(",")]
    if not value or any(not v for v in value):
        raise TargetError(f"Received an invalid value for argument `targets`, expected comma-separated "
                          f"target names or `all`. Received: targets={','.join(value)!r}")
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise TargetError(f"Received an invalid value for argument `targets`, expected each target once. "
                          f"Received: {', '.join(repeated)} more than once")
    return [get_target(v) for v in value]


def stated_flags(target: Target) -> list[str]:
    """The flags the target file states, with the backend: no local path (the tuning spec's is
    added by `compile_flags`), so they are the same in every checkout."""
    return [f"--iree-hal-target-backends={target.backend}", *target.flags]


def compile_flags(target: Target) -> list[str]:
    """The IREE compiler flags for `target` (pure: no compiler is run)."""
    flags = stated_flags(target)
    if target.active_tuning_spec:
        # IREE 3.13 loads the spec under a lock from a compiler thread, and parsing it waits on
        # the thread pool, which can hand that same thread another executable's tuning-spec pass:
        # it then waits on the lock it holds, forever (seen in CI and here, about one compile in
        # a few hundred). One compiler thread cannot do that; it costs ~1 s on a small layer.
        flags += [f"--iree-codegen-tuning-spec-path={target.active_tuning_spec}",
                  "--mlir-disable-threading"]
    return flags


@dataclass(frozen=True)
class Availability:
    compiles: bool
    compile_reason: str
    runs: bool
    run_reason: str


@functools.lru_cache(maxsize=1)
def _compiler_backends() -> frozenset[str]:
    try:
        from iree.compiler import tools

        return frozenset(tools.query_available_targets())
    except Exception:  # noqa: BLE001 - any failure means "no compiler here"
        return frozenset()


def availability(target: Target) -> Availability:
    """Whether `target` compiles here (backend in this IREE) and runs here (arch, driver, device)."""
    if target.refused or known_broken(target):
        return Availability(False, target.refused or known_broken(target) or "", False, "refused")
    backends = _compiler_backends()
    compiles = target.backend in backends
    compile_reason = "" if compiles else f"this IREE compiler has no `{target.backend}` backend"
    from .runtime import driver_status

    arch = host_arch()
    if target.arch not in ("any", "host", arch):
        return Availability(compiles, compile_reason, False,
                            f"needs a {target.arch} CPU; this machine is {arch}")
    missing = [f for f in target.cpu_features if f not in host_cpu_features()]
    if missing:
        return Availability(compiles, compile_reason, False, f"this CPU lacks {', '.join(missing)}")
    ok, reason = driver_status(target.driver)
    mismatch = subgroup_mismatch(target.subgroup_sizes, target.driver) if ok else None
    if mismatch:
        return Availability(compiles, compile_reason, False, mismatch)
    if ok and target.device_hint and target.device_hint.lower() not in reason.lower():
        # The profile's SPIR-V runs on any Vulkan device with its features and subgroup sizes
        # (lavapipe included, where it needs none); it is only tuned for the hinted GPUs.
        reason = f"{reason}; code tuned for {target.device_hint} GPUs"
    return Availability(compiles, compile_reason, ok, reason)
