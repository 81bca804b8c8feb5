"""Verify checks every shape a build serves (issue 15, point 2): `mhagen verify` and the build's own
verify run the declared batch, batch 1 and declared + 3 (in chunks) of a static build, and every
bucket of a dynamic one (the smallest, middle and largest when there are many) plus a size between
buckets; the choice is stated in the matrix, its JSON and the bundle manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mhagen
from conftest import EXAMPLES, make_spec
from mhagen.cli import main
from mhagen.targets import parse_targets
from mhagen.verify import ALL_BUCKETS_UP_TO, shape_checks, verify_matrix


def _dyn(dynamic: list[str], **sizes: int) -> mhagen.Spec:
    return make_spec({"num_heads": 2, "key_dim": 4},
                     {"query": [2, 8, 8], "value": [2, 8, 8], "attention_mask": True, "dynamic": dynamic, **sizes})


@pytest.mark.parametrize("spec,labels,words", [
    pytest.param(mhagen.Spec.load(EXAMPLES / "encoder.toml"),
                 ["(2, 16, 32)", "(1, 16, 32) in chunks", "(5, 16, 32) in chunks"],
                 "batch 1 and batch 2+3, in chunks of 2", id="static"),
    pytest.param(make_spec({"num_heads": 2, "key_dim": 4}, {"query": [1, 4, 8], "value": [1, 4, 8]}),
                 ["(1, 4, 8)", "(4, 4, 8) in chunks"], "the declared batch and batch 1+3", id="static_batch_1"),
    pytest.param(make_spec({"num_heads": 2, "key_dim": 4, "dropout": 0.5, "seed": 1},
                           {"query": [2, 4, 8], "value": [2, 4, 8], "training": True}),
                 ["(2, 4, 8)"], "dropout fixes the batch", id="dropout"),
    pytest.param(_dyn(["batch"], max_batch=4), ["(3, 8, 8) padded", "(1, 8, 8)", "(2, 8, 8)", "(4, 8, 8)"],
                 "every bucket (3), a size between buckets", id="dynamic_batch"),
    pytest.param(_dyn(["batch", "seq"], max_batch=8, max_seq=32),
                 ["(3, 1, 8) padded", "(1, 8, 8)", "(4, 8, 8)", "(8, 32, 8)"],
                 "the smallest, middle and largest of 12 buckets", id="dynamic_many_buckets"),
    pytest.param(_dyn(["seq"], max_seq=16),
                 ["(2, 1, 8) padded", "(2, 8, 8)", "(2, 16, 8)", "(1, 8, 8) in chunks", "(5, 8, 8) in chunks"],
                 "batch 1 and 2+3 in chunks of 2", id="dynamic_seq_static_batch"),
])
def test_shape_checks_choose(spec: mhagen.Spec, labels: list[str], words: str) -> None:
    checks, chosen = shape_checks(spec)
    assert [c.label for c in checks] == labels
    assert words in chosen
    assert len([c for c in checks if not c.why]) <= max(ALL_BUCKETS_UP_TO, 3) + 1


@pytest.mark.parametrize("spec", [
    pytest.param(_dyn(["seq"], max_seq=16), id="dynamic_seq_static_batch"),
    pytest.param(make_spec({"num_heads": 2, "key_dim": 4}, {
        "query": [1, 8, 8], "value": [1, 8, 8], "return_attention_scores": True,
        "attention_mask": [1, 2, 8, 8]}), id="scores_and_a_4d_mask"),
    pytest.param(_dyn(["batch", "seq"], max_batch=4, max_seq=16), id="dynamic_batch_and_seq"),
])
def test_verify_matrix_runs_every_shape(spec: mhagen.Spec) -> None:
    """Each case once failed in the batch chunking (seq-dynamic rows, a (B, T, S) mask for a
    (B, N, T, S) declaration); now the compiled layer agrees with the oracle at every checked size."""
    (row,) = verify_matrix(spec, parse_targets("cpu"))
    assert row.status == "pass", row.message or row.reason
    assert row.shapes == [c.label for c in shape_checks(spec)[0]]


def test_verify_command_states_the_shapes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.json"
    assert main(["verify", str(EXAMPLES / "cross_attention.toml"), "--target", "cpu", "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("shapes checked: query (2, 12, 24), (1, 12, 24) in chunks, (5, 12, 24) in chunks (the declared "
            "batch, batch 1 and batch 2+3, in chunks of 2)") in printed
    (row,) = json.loads(out.read_text())["results"]
    assert row["shapes"] == ["(2, 12, 24)", "(1, 12, 24) in chunks", "(5, 12, 24) in chunks"]


def test_build_verifies_every_bucket_and_records_it(tmp_path: Path) -> None:
    from mhagen.bundle import build_bundle

    spec = _dyn(["batch", "seq"], max_batch=2, max_seq=8)
    build_bundle(spec, parse_targets("cpu"), tmp_path / "b")
    verify = json.loads((tmp_path / "b" / "manifest.json").read_text())["targets"][0]["verify"]
    assert verify["status"] == "pass"
    assert verify["shapes"] == ["(1, 1, 8) padded", "(1, 8, 8)", "(2, 8, 8)"]
    assert verify["shapes_chosen"] == "every bucket (2), a size between buckets (padded)"
    assert "(1, 1, 8) padded" in (tmp_path / "b" / "README.md").read_text()


def test_a_failing_shape_is_named(monkeypatch) -> None:
    """A layer wrong only past its compiled batch fails the verify, which names the shape."""
    from mhagen.runtime import CompiledLayer

    call = CompiledLayer.__call__

    def wrong_in_chunks(self, query, *args, **kwargs):
        out = call(self, query, *args, **kwargs)
        return out + 1.0 if query.shape[0] == 5 else out

    monkeypatch.setattr(CompiledLayer, "__call__", wrong_in_chunks)
    (row,) = verify_matrix(mhagen.Spec.load(EXAMPLES / "encoder.toml"), parse_targets("cpu"))
    assert row.status == "FAIL" and row.message.startswith("query (5, 16, 32): outputs[0][")
