"""Half precision and mixed policies: verified where they run, compiled where they compile,
refused up front where a target cannot do them."""

from __future__ import annotations

import numpy as np
import pytest

import mhagen
from conftest import EXAMPLES, vulkan_available
from mhagen.compile import check_dtype
from mhagen.targets import availability, get_target
from mhagen.verify import TOLERANCES, tolerance, verify_matrix

SPEC = EXAMPLES / "causal_decoder.toml"

# (dtype, target): every pair here must verify against the float64 oracle within TOLERANCES.
RUN = [
    ("float16", "cpu"), ("bfloat16", "cpu"), ("mixed_float16", "cpu"), ("mixed_bfloat16", "cpu"),
    ("float16", "cpu-x86_64"), ("float16", "vulkan-ampere"),
]
# Compiled for hardware this machine lacks.
COMPILE_ONLY = [("float16", "cuda-sm80"), ("bfloat16", "cuda-sm80"), ("float16", "rocm-gfx942"),
                ("bfloat16", "rocm-gfx942"), ("float16", "metal"), ("float16", "cpu-aarch64"),
                ("bfloat16", "cpu-aarch64")]
REFUSED = [("float16", "vulkan"), ("float16", "vmvx"), ("bfloat16", "cpu-x86_64"),
           ("bfloat16", "vulkan-ampere"), ("bfloat16", "metal")]


def _spec(dtype: str) -> mhagen.Spec:
    return mhagen.Spec.load(SPEC).replace(call={"dtype": dtype})


@pytest.mark.parametrize("dtype,target", RUN, ids=[f"{d}-{t}" for d, t in RUN])
def test_verifies(dtype: str, target: str) -> None:
    tgt = get_target(target)
    if not availability(tgt).runs:
        pytest.skip(f"{target} cannot run here: {availability(tgt).run_reason}")
    missing = tgt.missing_cpu_features(mhagen.spec.DType.parse(dtype).compute)
    if missing:  # refused up front: test_host_dtype_needs_cpu_features
        pytest.skip(f"{target} computes in {dtype} only on CPUs with {', '.join(missing)}")
    spec = _spec(dtype)
    (row,) = verify_matrix(spec, [tgt])
    assert row.status == "pass", row.message
    assert row.max_abs is not None and row.max_abs > 0  # half precision really is lower precision


@pytest.mark.parametrize("dtype,target", COMPILE_ONLY, ids=[f"{d}-{t}" for d, t in COMPILE_ONLY])
def test_compiles(dtype: str, target: str) -> None:
    (row,) = verify_matrix(_spec(dtype), [get_target(target)])
    assert row.compiled, row.reason


@pytest.mark.parametrize("dtype,target", REFUSED, ids=[f"{d}-{t}" for d, t in REFUSED])
def test_refused_up_front(dtype: str, target: str) -> None:
    compute = mhagen.spec.DType.parse(dtype).compute
    with pytest.raises(mhagen.TargetError, match=f"cannot compute in {compute}: it supports"):
        check_dtype(get_target(target), compute)
    with pytest.raises(mhagen.TargetError):
        mhagen.build(_spec(dtype), target=target)


def test_host_dtype_needs_cpu_features(monkeypatch) -> None:
    """`cpu` computes in bfloat16 only where the host has AVX-512 BF16 (IREE 3.13 cannot link the
    conversion without it); elsewhere it is refused before compiling, with the feature named."""
    import mhagen.targets

    cpu = get_target("cpu")
    monkeypatch.setattr(mhagen.targets, "host_cpu_features", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(mhagen.TargetError, match="cannot compute in bfloat16 on this machine: it "
                                                 "needs the CPU feature.s. avx512_bf16"):
        check_dtype(cpu, "bfloat16")
    with pytest.raises(mhagen.TargetError, match="avx512_bf16"):
        mhagen.build(_spec("mixed_bfloat16"), target="cpu")
    check_dtype(cpu, "float16")
    monkeypatch.setattr(mhagen.targets, "host_cpu_features",
                        lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    check_dtype(cpu, "bfloat16")
    check_dtype(get_target("cpu-aarch64"), "bfloat16")   # not a host target: the flags decide


def test_mixed_policy_keeps_float32_weights_and_computes_in_half() -> None:
    spec = _spec("mixed_float16")
    weights = mhagen.init_weights(spec)
    assert all(w.dtype == np.float32 for w in weights)
    layer = mhagen.build(spec, target="cpu", weights=weights)
    from mhagen.verify import random_inputs

    out, scores = layer(**random_inputs(spec))
    assert out.dtype == np.float16 and scores.dtype == np.float16
    assert tolerance(spec) is TOLERANCES["float16"]


def test_half_precision_inputs_are_cast() -> None:
    spec = _spec("float16")
    layer = mhagen.build(spec, target="cpu")
    from mhagen.verify import random_inputs

    inputs = random_inputs(spec)  # float32 arrays: cast to float16 at the call
    out, _ = layer(**inputs)
    assert out.dtype == np.float16
    with pytest.raises(mhagen.CallError, match="`query` has dtype int32, expected float16"):
        layer(inputs["query"].astype(np.int32), inputs["value"])


@pytest.mark.parametrize("layer", [{"num_heads": 1, "key_dim": 1}, {"num_heads": 1, "key_dim": 2, "value_dim": 1}],
                         ids=["key_dim-1", "value_dim-1"])
def test_bfloat16_unit_projection_is_refused_on_llvm_cpu(layer) -> None:
    """reports/iree-llvmcpu-bf16-unit-projection (found by `mhagen fuzz --seed 7`): IREE 3.13's llvm-cpu
    fails to compile a bfloat16 projection onto one head of size 1; refused up front, float32 builds."""
    from mhagen.compile import check_supported
    from mhagen.errors import TargetError
    from mhagen.targets import get_target

    call = {"query": [1, 1, 8], "value": [1, 2, 8]}
    for dtype in ("bfloat16", "mixed_bfloat16"):
        spec = mhagen.Spec.from_dict({"layer": layer, "call": {**call, "dtype": dtype}})
        with pytest.raises(TargetError, match="cannot compile bfloat16 attention whose projections have one output"):
            check_supported(get_target("cpu"), spec)
    assert mhagen.build(mhagen.Spec.from_dict({"layer": layer, "call": call}), target="cpu").verified
    two_heads = mhagen.Spec.from_dict({"layer": {**layer, "num_heads": 2}, "call": {**call, "dtype": "bfloat16"}})
    check_supported(get_target("cpu"), two_heads)
