"""The oracle itself, checked against plain loops written from the Keras formulas (no JAX here)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

import mhagen
from conftest import make_spec


def _loops(spec, w, q, v, k, mask):
    """3-D Keras MHA with explicit loops over batch, heads, queries and keys."""
    names = mhagen.weights.weight_names(spec)
    W = dict(zip(names, [np.asarray(a, np.float64) for a in w]))
    B, T, _ = q.shape
    S = v.shape[1]
    N, H = W["query/kernel"].shape[1:]
    Hv = W["value/kernel"].shape[2]
    out = np.zeros((B, T) + W["attention_output/kernel"].shape[2:])
    for b in range(B):
        ctx = np.zeros((T, N, Hv))
        for n in range(N):
            Q = q[b] @ W["query/kernel"][:, n, :] + W["query/bias"][n]
            K = k[b] @ W["key/kernel"][:, n, :] + W["key/bias"][n]
            V = v[b] @ W["value/kernel"][:, n, :] + W["value/bias"][n]
            for t in range(T):
                logits = [(Q[t] / np.sqrt(H)) @ K[s] for s in range(S)]
                allowed = [bool(mask[b, t, s]) and t >= s for s in range(S)]
                if not any(allowed):
                    continue
                top = max(x for x, a in zip(logits, allowed) if a)
                e = [np.exp(x - top) if a else 0.0 for x, a in zip(logits, allowed)]
                p = np.array(e) / sum(e)
                ctx[t, n] = p @ V
        out[b] = np.einsum("tnh,nhe->te", ctx, W["attention_output/kernel"]) + W["attention_output/bias"]
    return out


def test_oracle_matches_loops() -> None:
    spec = make_spec({"num_heads": 2, "key_dim": 3, "value_dim": 4},
                     {"query": [2, 4, 5], "value": [2, 6, 3], "key": [2, 6, 7], "attention_mask": True,
                      "use_causal_mask": True})
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(a.shape) for a in mhagen.init_weights(spec)]
    q, v, k = (rng.standard_normal(s) for s in ((2, 4, 5), (2, 6, 3), (2, 6, 7)))
    mask = rng.random((2, 4, 6)) < 0.6
    mask[0, 2] = False  # a fully masked row
    got = mhagen.reference(spec, w, q, v, k, mask)
    np.testing.assert_allclose(got, _loops(spec, w, q, v, k, mask), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[0, 2], w[-1], atol=1e-12)  # attends to nothing: output bias


def test_oracle_does_not_import_jax() -> None:
    source = (Path(mhagen.__file__).parent / "oracle.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "jax" not in imported and "trace" not in imported
