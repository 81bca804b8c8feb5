"""Any batch by default: a bundle compiled for batch B serves batch 1, B and B + 3 with the
oracle's answer on every target that runs here (rows run B at a time; a short chunk is padded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES

import mhagen
from mhagen.bundle import build_bundle
from mhagen.targets import availability, get_target
from mhagen.verify import check_outputs, expected_outputs, random_inputs

RUNNABLE = [t for t in ("cpu", "vmvx", "vulkan") if availability(get_target(t)).runs]


@pytest.fixture(scope="module", params=sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def example_bundle(request, tmp_path_factory) -> tuple[mhagen.Spec, Path]:
    spec = mhagen.Spec.load(EXAMPLES / f"{request.param}.toml")
    out = tmp_path_factory.mktemp("any_batch") / request.param
    build_bundle(spec, [get_target(t) for t in RUNNABLE], out, verify=False)
    return spec, out


@pytest.mark.parametrize("target", RUNNABLE)
def test_bundle_serves_any_batch(example_bundle, target: str) -> None:
    spec, out = example_bundle
    layer = mhagen.load(out, target)
    declared = spec.call.query[0]
    weights = mhagen.init_weights(spec)
    for batch in (1, declared, declared + 3):
        sub = spec.at_size(batch, None, None)
        inputs = random_inputs(sub, seed=batch)
        result = layer(**inputs)
        got = list(result) if isinstance(result, tuple) else [result]
        for check in check_outputs(sub, got, expected_outputs(sub, weights, inputs)):
            assert check.passed, f"batch {batch}: {check.message}"
