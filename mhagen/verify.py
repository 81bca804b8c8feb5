"""Stage 6, the verify: compiled outputs against the NumPy oracle, with per-dtype tolerances.

    result = compare(got, expected, dtype="float32", name="outputs[0]")
    result.passed, result.max_abs, result.max_rel
    checks, why = shape_checks(spec)     # every size a build serves that verify runs, and why those
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .spec import Spec
from .trace import input_signature

__all__ = ["TOLERANCES", "Tolerance", "Comparison", "compare", "random_inputs", "dropout_keep_mask",
           "tolerance", "TargetResult", "verify_matrix", "expected_outputs", "check_outputs", "ShapeCheck",
           "shape_checks", "check_layer", "check_decoder", "decode_plan", "SourceReference"]


@dataclass(frozen=True)
class Tolerance:
    """Pass when |got - expected| <= atol + rtol * |expected| everywhere."""

    atol: float
    rtol: float


# Against the float64 oracle on unit-scale inputs (normal(0, 1), Glorot weights).
TOLERANCES: dict[str, Tolerance] = {
    # The contract: 1e-5 absolute. Measured max |err| on the examples: 5.4e-7 (cpu, vmvx, vulkan).
    "float32": Tolerance(atol=1e-5, rtol=0.0),
    # 10 mantissa bits (eps 9.8e-4); measured max |err| on causal_decoder: 4.2e-3 (cpu),
    # 6.1e-3 (cpu-x86_64, vulkan-ampere on lavapipe), 4.7e-3 (mixed_float16, cpu).
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    # 7 mantissa bits (eps 7.8e-3); measured max |err| on causal_decoder: 1.1e-2 (cpu),
    # 1.4e-2 (mixed_bfloat16, cpu).
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}


def tolerance(spec: Spec) -> Tolerance:
    return TOLERANCES[spec.call.dtype_policy.compute]


@dataclass(frozen=True)
class Comparison:
    name: str
    passed: bool
    max_abs: float
    max_rel: float
    message: str


def compare(got: Any, expected: Any, *, tol: Tolerance, name: str = "outputs[0]") -> Comparison:
    """Compare shape, then values; the message names the worst element when values disagree.

    NaN and infinities are compared by place: NaN in both at the same place agrees, an infinity
    agrees with one of the same sign, and any other place where either side is not finite is a
    mismatch reported as such, before any rounding error:
    `outputs[0][0, 3, 1]: got nan, expected 0.52 (NaN where the oracle has a number, 8 places)`.
    """
    got = np.asarray(got)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return Comparison(name, False, float("inf"), float("inf"),
                          f"{name}: shape {got.shape}, expected {expected.shape}")
    g = got.astype(np.float64)
    if g.size == 0:
        return Comparison(name, True, 0.0, 0.0, f"{name}: empty")
    finite = np.isfinite(g) & np.isfinite(expected)
    agree = (np.isnan(g) & np.isnan(expected)) | (np.isinf(g) & (g == expected))
    wrong = ~finite & ~agree
    if wrong.any():
        worst = tuple(int(i) for i in np.argwhere(wrong)[0])
        what = _nonfinite_mismatch(float(g[worst]), float(expected[worst]))
        count = int(wrong.sum())
        return Comparison(name, False, float("inf"), float("inf"),
                          f"{name}[{_where(worst)}]: got {g[worst]:.6g}, expected {expected[worst]:.6g} "
                          f"({what}{f', {count} places' if count > 1 else ''})")
    if not finite.any():
        return Comparison(name, True, 0.0, 0.0,
                          f"{name}: all {g.size} values NaN or infinite, at the oracle's places")
    # Agreeing NaN and infinities out of the arithmetic (inf - inf, 0 * inf would warn).
    g, expected = np.where(finite, g, 0.0), np.where(finite, expected, 0.0)
    err = np.abs(g - expected)
    rel = err / np.maximum(np.abs(expected), 1e-30)
    max_abs = float(err.max())
    max_rel = float(np.where(np.abs(expected) > tol.atol, rel, 0.0).max())
    excess = np.where(finite, err - (tol.atol + tol.rtol * np.abs(expected)), -np.inf)
    worst = np.unravel_index(int(np.argmax(excess)), err.shape)
    passed = bool(excess[worst] <= 0)
    message = (f"{name}[{_where(worst)}]: got {g[worst]:.6g}, expected {expected[worst]:.6g} "
               f"(|err| {err[worst]:.2g} {'<=' if passed else '>'} atol {tol.atol:g}"
               f"{f' + rtol {tol.rtol:g}' if tol.rtol else ''})")
    return Comparison(name, passed, max_abs, max_rel, message)


def _where(index: tuple[Any, ...]) -> str:
    return ", ".join(str(int(i)) for i in index)


def _kind(x: float) -> str:
    return "NaN" if np.isnan(x) else "infinity" if np.isinf(x) else "a number"


def _nonfinite_mismatch(got: float, expected: float) -> str:
    """Why a place where one side is NaN or infinite disagrees, e.g. "NaN where the oracle has a number"."""
    if np.isinf(got) and np.isinf(expected):
        return "infinity of the wrong sign"
    return f"{_kind(got)} where the oracle has {_kind(expected)}"


def random_inputs(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded unit-scale inputs for every runtime input of the spec (mask ~80% True)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for sig in input_signature(spec):
        if sig.name == "attention_mask":
            out[sig.name] = rng.random(sig.shape) < 0.8
        elif sig.name == "dropout_key":
            out[sig.name] = np.array([spec.layer.seed or 0, seed], dtype=np.uint32)
        else:
            out[sig.name] = rng.standard_normal(sig.shape).astype(np.float32)
    return out


def dropout_keep_mask(spec: Spec, dropout_key: Any) -> np.ndarray:
    """The keep-mask the compiled module draws: `jax.random.bernoulli(key, 1 - rate, scores_shape)`.

    Computed with JAX here (not in the oracle, which stays JAX-free) and handed to the oracle.
    """
    import jax

    key = np.asarray(dropout_key, dtype=np.uint32)
    keep = jax.random.bernoulli(key, 1.0 - spec.layer.dropout, spec.geometry.scores_shape)
    return np.asarray(keep)


@dataclass
class TargetResult:
    """One row of the verify matrix."""

    target: str
    compiled: bool = False
    size: int = 0
    compile_seconds: float = 0.0
    cached: bool = False
    ran: bool = False
    reason: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    passed: bool | None = None
    message: str = ""
    shapes: list[str] = field(default_factory=list)   # the sizes it ran at (`shape_checks`)
    reference_max_abs: float | None = None   # against the source model's own output, when given

    @property
    def status(self) -> str:
        if not self.compiled:
            return "compile failed" if self.reason else "not compiled"
        if not self.ran:
            return "compiled, not run"
        return "pass" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "status": self.status, "compiled": self.compiled,
                "size": self.size, "compile_seconds": round(self.compile_seconds, 3),
                "cached": self.cached, "ran": self.ran, "reason": self.reason,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "passed": self.passed,
                "message": self.message, "shapes": list(self.shapes),
                "reference_max_abs": self.reference_max_abs}


def expected_outputs(spec: Spec, weights: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The oracle's answer for `inputs` (as from `random_inputs`), as a list of outputs."""
    from .oracle import reference

    keep = dropout_keep_mask(spec, inputs["dropout_key"]) if spec.has_dropout else None
    ref = reference(spec, weights, inputs["query"], inputs["value"], inputs.get("key"),
                    inputs.get("attention_mask"), dropout_keep=keep)
    return list(ref) if isinstance(ref, tuple) else [ref]


def check_outputs(spec: Spec, got: list[np.ndarray], expected: list[np.ndarray]) -> list[Comparison]:
    tol = tolerance(spec)
    return [compare(g, e, tol=tol, name=f"outputs[{i}]") for i, (g, e) in enumerate(zip(got, expected))]


@dataclass(frozen=True)
class SourceReference:
    """What the source model itself computed (e.g. a Keras model, written by `mhagen import-keras`
    as SPEC.keras-ref.npz): `inputs` by name (`query` (B, T, E), `value` (B, S, E), `key`,
    `attention_mask` (B, T, S)) and the `outputs` it returned (output (B, T, E), then the scores
    when it returns them). `verify_matrix` compares every target with it as well as with the oracle,
    so a spec that does not say what the model does (a dropped call-site argument) fails even
    where target and oracle agree.

        ref = SourceReference.load("spec.keras-ref.npz")
        rows = verify_matrix(spec, targets, weights, reference=ref)
    """

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    source: str

    def save(self, path: Any) -> None:
        arrays = {f"input_{k}": np.asarray(v) for k, v in self.inputs.items()}
        arrays.update({f"output_{i}": np.asarray(v, dtype=np.float32) for i, v in enumerate(self.outputs)})
        np.savez(path, source=np.array(self.source), **arrays)

    @classmethod
    def load(cls, path: Any) -> SourceReference:
        from .errors import WeightsError

        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise WeightsError(f"Reference file {path} is not a readable .npz: {exc}") from None
        inputs = {k.removeprefix("input_"): v for k, v in data.items() if k.startswith("input_")}
        count = sum(k.startswith("output_") for k in data)
        outputs = [data.get(f"output_{i}") for i in range(count)]
        if "source" not in data or "query" not in inputs or not outputs or any(o is None for o in outputs):
            raise WeightsError(f"Reference file {path} holds {sorted(data)}: expected source, input_query, "
                               "input_value, ... and output_0, output_1, ...")
        return cls(inputs, [o for o in outputs if o is not None], str(data["source"]))


# A dynamic build with more buckets than this is checked at its smallest, middle and largest bucket.
ALL_BUCKETS_UP_TO = 4


@dataclass(frozen=True)
class ShapeCheck:
    """One size verify calls a build with: a static spec of that size, and why it is checked."""

    spec: Spec
    why: str = ""                # "padded" (between buckets), "in chunks" (batch served in chunks)
    rows: int | None = None      # the oracle runs this many batch rows at a time (the compiled batch)

    @property
    def label(self) -> str:
        """The query shape, e.g. `(5, 16, 32) in chunks`."""
        return f"{tuple(self.spec.geometry.query_shape)}{f' {self.why}' if self.why else ''}"


def shape_checks(spec: Spec) -> tuple[list[ShapeCheck], str]:
    """The sizes a build of `spec` is verified at, and the choice in words.

    Static batch B: B, 1 and B + 3 (the last two served in chunks of B), unless the layer trains
    with dropout (one random mask over the whole batch: B only). Dynamic: every shape bucket, or
    with more than `ALL_BUCKETS_UP_TO` the smallest, the middle and the largest; one size between
    buckets (padded into the next one) where there is one; and, when only the sequence is dynamic,
    batch 1 and B + 3 as above.

        checks, why = shape_checks(spec)     # why: "every bucket (4), a size between buckets"
    """
    from .trace import buckets

    declared = spec.geometry.query_shape[0]
    mask = spec.call.attention_mask
    # A declared mask that broadcasts over the batch (size 1 there after Keras' expansion) is the
    # only kind the layer takes: keep it for other batch sizes.
    shaped = not isinstance(mask, bool) and mask is not None
    batchless = shaped and _mask_batch(spec, mask) == 1

    def mask_at(batch: int) -> Any:
        """The declared mask's shape at another batch (None: `at_size`'s default)."""
        if not shaped:
            return None
        return tuple(mask) if batchless else (batch, *tuple(mask)[1:])

    if not spec.call.dynamic:
        if spec.has_dropout:
            return [ShapeCheck(spec)], "the declared shape only: dropout fixes the batch"
        checks = [ShapeCheck(spec)]
        if declared != 1:
            checks.append(ShapeCheck(spec.at_size(1, attention_mask=mask_at(1)), "in chunks", rows=declared))
        checks.append(ShapeCheck(spec.at_size(declared + 3, attention_mask=mask_at(declared + 3)),
                                 "in chunks", rows=declared))
        steps = ""
        if spec.is_decoder:
            steps = ("; decoder steps: a prompt of T + 1 tokens, 1 token, 3 tokens and the last cache "
                     "position, outputs and cache" if spec.decoder_kind == "self" else
                     "; cross-attention steps over the encoder's cache: T + 1, 1 and 3 tokens, and the cache")
        return checks, (f"the declared batch{'' if declared == 1 else ', batch 1'} and batch {declared}+3, "
                        f"in chunks of {declared}{steps}")
    sizes = buckets(spec)
    chosen = sizes if len(sizes) <= ALL_BUCKETS_UP_TO else [sizes[0], sizes[len(sizes) // 2], sizes[-1]]
    what = (f"every bucket ({len(sizes)})" if chosen is sizes
            else f"the smallest, middle and largest of {len(sizes)} buckets")
    checks = [ShapeCheck(spec.at_size(b, s, s)) for b, s in chosen]

    def between(dim: str, ladder: list[int | None]) -> int | None:
        """The smallest size of `dim` that is not a bucket (so the call pads), else its smallest bucket."""
        if dim not in spec.call.dynamic:
            return None
        top = spec.call.max_batch if dim == "batch" else spec.call.max_seq
        return next((n for n in range(1, top + 1) if n not in ladder), min(x for x in ladder if x))

    pb = between("batch", sorted({b for b, _ in sizes if b}))
    ps = between("seq", sorted({s for _, s in sizes if s}))
    if (pb, ps) not in sizes:
        checks.insert(0, ShapeCheck(spec.at_size(pb, ps, ps), "padded"))
        what += ", a size between buckets (padded)"
    if "batch" not in spec.call.dynamic:
        seq = sizes[0][1]
        checks.append(ShapeCheck(spec.at_size(1, seq, seq), "in chunks", rows=declared))
        checks.append(ShapeCheck(spec.at_size(declared + 3, seq, seq), "in chunks", rows=declared))
        what += f", batch 1 and {declared}+3 in chunks of {declared}"
    return checks, what


def _mask_batch(spec: Spec, shape: Any) -> int:
    """The size a mask of `shape` has on the batch axis after Keras' expansion to the scores' rank."""
    from .runtime import expand_mask_shape

    g = spec.geometry
    return expand_mask_shape(tuple(shape), len(g.scores_shape), len(g.attention_axes))[0]


def _expected_by_rows(check: ShapeCheck, weights: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The oracle's answer, `check.rows` batch rows at a time where set: a batch past the compiled one
    then needs no more oracle memory than the declared shape (which the budget was checked for)."""
    batch = check.spec.geometry.query_shape[0]
    rows = check.rows or batch
    if batch <= rows:
        return expected_outputs(check.spec, weights, inputs)
    parts = []
    for start in range(0, batch, rows):
        n = min(rows, batch - start)
        part = {k: v[start:start + n] if k in ("query", "value", "key") or (
                    k == "attention_mask" and _mask_batch(check.spec, v.shape) != 1) else v
                for k, v in inputs.items()}
        parts.append(expected_outputs(check.spec.at_size(n), weights, part))
    return [np.concatenate(p, axis=0) for p in zip(*parts)]


def check_layer(layer: Any, checks: list[ShapeCheck], weights: Any, *, seed: int = 0,
                expected: dict[int, list[np.ndarray]] | None = None) -> list[Comparison]:
    """Call `layer` at every size of `checks` on seeded inputs and compare with the oracle; the
    comparisons are named by the query shape. `expected` caches the oracle's answers by check index
    (shared by the targets of one verify)."""
    cache = {} if expected is None else expected
    out = []
    for i, check in enumerate(checks):
        inputs = random_inputs(check.spec, seed)
        if i not in cache:
            cache[i] = _expected_by_rows(check, weights, inputs)
        result = layer(**inputs)
        got = list(result) if isinstance(result, tuple) else [result]
        name = f"query {tuple(check.spec.geometry.query_shape)}: outputs"
        tol = tolerance(check.spec)
        out += [compare(g, e, tol=tol, name=f"{name}[{j}]") for j, (g, e) in enumerate(zip(got, cache[i]))]
    if checks and checks[0].spec.is_decoder and (getattr(layer, "interface", None) or {}).get("decoder"):
        out += check_decoder(layer, checks[0].spec, weights, seed=seed)
    return out


def decode_plan(spec: Spec) -> list[tuple[int, int]]:
    """The (index, tokens) calls a decoder build is verified with: a prefill of T + 1 tokens (a
    whole chunk and a single step), one token, several tokens, and one token at the last position S - 1
    (the longest cache read; the positions skipped hold the zeros of a fresh cache)."""
    S, T = spec.call.cache_max_length, spec.geometry.query_shape[1]
    assert S is not None
    plan, at = [], 0
    for n in (min(T + 1, S), 1, 3):
        n = min(n, S - 1 - at)
        if n >= 1:
            plan.append((at, n))
            at += n
    if at <= S - 1:
        plan.append((S - 1, 1))
    return plan


def check_decoder(layer: Any, spec: Spec, weights: Any, *, seed: int = 0) -> list[Comparison]:
    """Prefill then decode steps (`decode_plan`) on seeded tokens, each step's output and the final
    cache compared with the oracle's `reference_step` (in float64, from the same cache)."""
    from .oracle import reference_step
    from .weights import normalize_weights

    ws = normalize_weights(spec, weights)
    g = spec.geometry
    B, S = g.query_shape[0], spec.call.cache_max_length
    rng = np.random.default_rng(seed + 7919)
    tol = tolerance(spec)
    if spec.decoder_kind == "cross":
        return _check_cross(layer, spec, ws, rng, tol)
    expected_cache = np.zeros(spec.cache_shape)
    cache = None
    out = []
    for at, n in decode_plan(spec):
        tokens = {"query": rng.standard_normal((B, n, g.query_shape[-1])).astype(np.float32),
                  "value": rng.standard_normal((B, n, g.value_shape[-1])).astype(np.float32)}
        if spec.has_key:
            tokens["key"] = rng.standard_normal((B, n, g.key_shape[-1])).astype(np.float32)
        mask = (rng.random((B, n, S)) < 0.8) if spec.has_mask else None
        want, expected_cache = reference_step(spec, ws, expected_cache, at, **tokens, attention_mask=mask)
        if cache is None:
            got, cache = layer.prefill(**tokens, attention_mask=mask)
        else:
            got, cache = layer.decode(**tokens, attention_mask=mask, cache=cache, index=at)
        out.append(compare(got, want, tol=tol, name=f"decode {n} token(s) at index {at}: output"))
    if cache is not None:
        out.append(compare(np.asarray(cache), expected_cache, tol=tol, name="decode: cache"))
    return out


def _check_cross(layer: Any, spec: Spec, ws: list[np.ndarray], rng: np.random.Generator, tol: Tolerance
                 ) -> list[Comparison]:
    """A cross-attention decoder: the cache of a seeded encoder output, then queries of T + 1, 1 and
    3 tokens over it, each compared with the oracle (`reference_cache`, `reference_step`)."""
    from .oracle import reference_cache, reference_step

    g = spec.geometry
    B, T, S = g.query_shape[0], g.query_shape[1], spec.call.cache_max_length
    inputs = {"value": rng.standard_normal(g.value_shape).astype(np.float32)}
    if spec.has_key:
        inputs["key"] = rng.standard_normal(g.key_shape).astype(np.float32)
    expected_cache = reference_cache(spec, ws, **inputs)
    out, cache = [], None
    for n in (T + 1, 1, 3):
        query = rng.standard_normal((B, n, g.query_shape[-1])).astype(np.float32)
        mask = (rng.random((B, n, S)) < 0.8) if spec.has_mask else None
        want, _ = reference_step(spec, ws, expected_cache, None, query, attention_mask=mask)
        if cache is None:
            got, cache = layer.prefill(query, inputs["value"], inputs.get("key"), attention_mask=mask)
        else:
            got, cache = layer.decode(query, attention_mask=mask, cache=cache)
        out.append(compare(got, want, tol=tol, name=f"cross-attention decode of {n} token(s): output"))
    out.append(compare(np.asarray(cache), expected_cache, tol=tol, name="cross-attention cache"))
    return out


def verify_matrix(spec: Spec, targets: list[Any], weights: Any = None, *, seed: int = 0,
                  on_progress: Any = None, reference: SourceReference | None = None) -> list[TargetResult]:
    """Compile `spec` for every target, run each runnable one at every size of `shape_checks(spec)`
    on the same seeded inputs, and compare with the oracle. Targets that cannot run here are
    reported as "compiled, not run".

    The program is traced as `mhagen build` traces it (weights as parameters), so a verify after a
    build, or a build after a verify, finds its modules in the compile cache.

    `on_progress(target_name, stage)` hears of each stage ("compiling (llvm-cpu)", "reading the
    compile cache", "running 3 shapes").

    With a `reference` (the source model's own output), each target also runs its inputs and
    passes only when it agrees with that output too, with the same tolerance.
    """
    from .budget import check as check_budget
    from .compile import check_supported, compile_program, is_cached
    from .errors import CompileError, MhagenError
    from .runtime import CompiledLayer, parameter_index
    from .targets import availability
    from .trace import WeightsMode, trace
    from .weights import normalize_weights, weight_names

    check_budget(spec, weights_mode="parameters", verify=True)  # before any work: figures and the way out
    ws = normalize_weights(spec, weights)
    program = trace(spec, ws, weights_mode=WeightsMode.PARAMETERS)
    parameters = parameter_index(dict(zip(weight_names(spec), ws)))
    checks, _ = shape_checks(spec)
    expected: dict[int, list[np.ndarray]] = {}
    rows = []
    for target in targets:
        row = TargetResult(target.name)
        rows.append(row)
        try:
            check_supported(target, spec)
            if on_progress:
                on_progress(target.name, "reading the compile cache" if is_cached(program.text, target)
                            else f"compiling ({target.backend})")
            compiled = compile_program(program.text, target)
        except CompileError as exc:
            row.reason = exc.summary
            row.message = str(exc)
            continue
        except MhagenError as exc:
            row.reason = str(exc)
            continue
        row.compiled, row.size, row.compile_seconds, row.cached = (
            True, len(compiled.vmfb), compiled.seconds, compiled.cached)
        avail = availability(target)
        if not avail.runs:
            row.reason = avail.run_reason
            continue
        if on_progress:
            on_progress(target.name, f"running {len(checks)} shape{'s' if len(checks) > 1 else ''}")
        try:
            layer = CompiledLayer(program.interface, compiled.vmfb, target, spec=spec, parameters=parameters)
            comparisons = check_layer(layer, checks, ws, seed=seed, expected=expected)
            against_source = [] if reference is None else _check_reference(layer, spec, reference)
        except MhagenError as exc:
            row.reason = str(exc)
            row.passed = False
            row.ran = True
            continue
        row.ran = True
        row.shapes = [c.label for c in checks]
        row.max_abs = max(c.max_abs for c in comparisons)
        row.max_rel = max(c.max_rel for c in comparisons)
        if against_source:
            row.reference_max_abs = max(c.max_abs for c in against_source)
        comparisons += against_source
        row.passed = all(c.passed for c in comparisons)
        bad = [c.message for c in comparisons if not c.passed]
        row.message = bad[0] if bad else comparisons[0].message
    return rows


def _check_reference(layer: Any, spec: Spec, reference: SourceReference) -> list[Comparison]:
    result = layer(**reference.inputs)
    got = list(result) if isinstance(result, tuple) else [result]
    if len(got) != len(reference.outputs):
        from .errors import VerifyError

        raise VerifyError(f"the build returns {len(got)} outputs, {reference.source} returned "
                          f"{len(reference.outputs)}: the spec does not call the layer as the model does")
    return [compare(g, e, tol=tolerance(spec), name=f"{reference.source}: outputs[{j}]")
            for j, (g, e) in enumerate(zip(got, reference.outputs))]
