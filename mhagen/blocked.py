"""Blocked attention: the attention core without a (T, S) score matrix (flash-style).

Keras' formulation materialises the scores `(B, N, T, S)`: 2 GiB per tensor at T = S = 8192 with 8
heads. When the spec does not ask for the scores, the traced program can instead walk (batch, query)
blocks and, for each, the key blocks it may see, keeping a running maximum and an unnormalised
context and denominator (the online softmax). Memory is then O(T); with a causal mask or a sliding
window, key blocks that no query of the block may attend to are skipped. Short sequences take all
keys in one step, for a batch group or a block of query rows small enough that the step's scores
stay in the caches, which is faster than Keras' formulation on CPU as well. Past LOOP_STEPS steps
the blocks are walked by loops (a scan over query blocks, a loop over the key blocks in reach),
so the program and its compile time stay the same at any T.

The result is Keras' explicit path up to float rounding: masked scores are replaced by
`large_negative` before the softmax (a NaN score there is dropped, as Keras drops it) and masked
probabilities are replaced by 0, so a query row with every key masked gets a zero context. The
denominator sums the allowed terms only; Keras' also counts the masked ones, but they underflow
to exactly 0 unless the whole row is masked, and then the context is 0 either way.

NaN lands where Keras puts it, with one exception: key blocks that no query of a block may see
under the causal mask or the sliding window are never read, so a NaN (or infinite) *value* there
does not reach the output, where Keras' `probs @ V` gives 0 * NaN = NaN in every row of its batch
element (a NaN *key* there is dropped by both). Reading those blocks only to copy that would cost
the time and memory the blocks save.

    ctx = attention(q, k, v, causal=True)        # q (B, T, N, H), k (B, S, N, H), v (B, S, N, Hv)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import SpecError
from .spec import Spec

__all__ = ["AttentionPath", "ProjectedRows", "attention", "blocked_eligible", "choose_path",
           "default_block", "loops", "static_steps", "DEFAULT_BLOCK", "LOOP_STEPS", "MIN_QUERY_BLOCK",
           "QUERY_BLOCK_SCORES_BYTES", "SINGLE_BLOCK_MAX_SCORES", "STEP_BUDGET", "STEP_SCORES_BYTES"]

# Up to this many scores per (batch, head), T * S, a step covers all keys (BERT at T = 512,
# cross-attention at 128 x 1024; queries split as QUERY_BLOCK_SCORES_BYTES says); longer sequences
# are blocked with DEFAULT_BLOCK.
SINGLE_BLOCK_MAX_SCORES = 1 << 20
# Query and key block sizes past SINGLE_BLOCK_MAX_SCORES. At T = 8192 (causal, 8 heads x 64) 256 x 256
# ran in 0.76-0.86 s; 128 x 512, 128 x 1024, 512 x 256 and 64 x 1024 took 0.9-1.8 s, and smaller
# blocks need twice the compile time for 5 % less memory.
DEFAULT_BLOCK = (256, 256)
# Up to SINGLE_BLOCK_MAX_SCORES, the queries of one batch element are still split into blocks of
# rows (T halved, rounding up, down to MIN_QUERY_BLOCK) until one step's scores (N, bq, S) fit this many
# bytes, so that the scores go from the matmul through the softmax to the second matmul within
# the caches. BERT-base at B = 1, T = 512 (12.6 MB of scores): 128-row blocks ran in 22.3-23.5 ms
# against 24.5-25.3 ms in one step (jax.jit 28.2-28.4 ms, interleaved in one process).
QUERY_BLOCK_SCORES_BYTES = 4 << 20
MIN_QUERY_BLOCK = 32
# Batch elements per step: as many as keep one step's scores (b, N, bq, bk) within this many bytes,
# so that the softmax passes stay in the caches. BERT-base at B = 8, T = 512: 245 ms with the whole
# batch in one step, 167 ms with one element per step (jax.jit: 216-254 ms); at B = 8, T = 128:
# 45.0 ms against 43.5 ms.
STEP_SCORES_BYTES = 1 << 20
# The most static steps (see `static_steps`) a traced program may unroll, over all its buckets.
# Measured on 2 cores: T = 8192 causal (528 steps) traced in 1.5 s and compiled in 35 s; T = 16384
# causal (2080 steps) in 8.4 s and 265 s; T = 16384 (4096 steps) traced in 10.6 s, so it compiles in
# about 9 minutes; T = 32768 causal (8256 steps) took 38 s to trace. T = 10^6 would be 15 million
# steps. Past LOOP_STEPS the path loops, so only many buckets of unrolled steps can reach it.
STEP_BUDGET = 4096
# Past this many unrolled steps, `attention` loops instead: a scan over query blocks and, in each,
# a loop over the key blocks in reach, so the program and its compile time do not grow with T.
# Causal, 8 heads x 64, 256 x 256 blocks, on 2 loaded cores (load average 8-12; calls interleaved
# in one process): T = 4096 looped ran in 0.99x the unrolled time (136 steps) and T = 8192 in 0.75x
# (528 steps); 512 x 512 looped blocks took 1.29x at T = 4096. Trace + compile from a cold cache:
# unrolled T = 4096 7.2 + 151 s; looped T = 4096 1.0 + 37 s, T = 65536 0.6 + 24 s (the same
# program). Up to 64 steps (BERT, cross-attention, causal T <= 2048) the steps stay unrolled.
LOOP_STEPS = 64


class AttentionPath(enum.Enum):
    """How `trace.forward` computes the attention core."""

    AUTO = "auto"        # blocked wherever it computes the same result, else keras
    KERAS = "keras"      # Keras' own einsum-softmax-einsum, (T, S) scores materialised
    BLOCKED = "blocked"  # query x key blocks with an online softmax (this module)

    @classmethod
    def parse(cls, value: object) -> "AttentionPath":
        for member in cls:
            if value is member or value == member.value:
                return member
        raise SpecError(f"Received an invalid value for argument `attention`, expected one of "
                        f"{[m.value for m in cls]}. Received: attention={value!r}")


def blocked_eligible(spec: Spec) -> tuple[bool, str]:
    """(True, "") when the blocked path computes this spec exactly, else (False, why not)."""
    g = spec.geometry
    if g.rank != 3 or g.attention_axes != (1,):
        return False, "the blocked path needs 3-D inputs attending over axis 1"
    if spec.call.return_attention_scores:
        return False, "the spec returns the attention scores, which are the (T, S) matrix"
    if spec.has_dropout:
        return False, "dropout draws its keep-mask over the whole (T, S) matrix"
    if spec.layer.masking == "keras2" and (spec.has_mask or spec.call.use_causal_mask
                                           or spec.layer.sliding_window is not None):
        return False, "tf.keras 2.x masking (masking = \"keras2\") gives a fully masked row the mean of every value"
    return True, ""


def choose_path(spec: Spec, attention: AttentionPath | str = AttentionPath.AUTO) -> AttentionPath:
    """Resolve `auto` for `spec`; refuse `blocked` where it would change the result."""
    path = AttentionPath.parse(attention)
    ok, why = blocked_eligible(spec)
    if path is AttentionPath.BLOCKED and not ok:
        raise SpecError(f"Received an invalid value for argument `attention`, expected a path this "
                        f"spec supports ({why}). Received: attention='blocked'")
    if path is AttentionPath.AUTO:
        return AttentionPath.BLOCKED if ok else AttentionPath.KERAS
    return path


def default_block(T: int, S: int, heads: int, itemsize: int) -> tuple[int, int]:
    """(query rows, keys) per step: all keys up to SINGLE_BLOCK_MAX_SCORES, with the queries halved
    until a step's scores fit QUERY_BLOCK_SCORES_BYTES; DEFAULT_BLOCK past that.

    >>> default_block(512, 512, 12, 4)      # BERT-base at T = 512: 4 steps of 128 query rows
    (128, 512)
    """
    if T * S > SINGLE_BLOCK_MAX_SCORES:
        return DEFAULT_BLOCK
    bq = T
    while bq > MIN_QUERY_BLOCK and heads * bq * S * itemsize > QUERY_BLOCK_SCORES_BYTES:
        bq = (bq + 1) // 2
    return bq, S


def _batch_block(B: int, T: int, S: int, N: int, itemsize: int, block: tuple[int, int]) -> int:
    """Batch elements per step: as many as keep one step's scores within STEP_SCORES_BYTES."""
    step = N * min(block[0], T) * min(block[1], S) * itemsize
    return max(1, min(B, STEP_SCORES_BYTES // max(1, step)))


def static_steps(B: int, T: int, S: int, heads: int, itemsize: int, *, causal: bool = False,
                 window: int | None = None, limit: int | None = None) -> tuple[int, bool]:
    """(steps, exact): how many steps the program `attention` traces holds for q (B, T, N, H) and
    k (B, S, N, H) with its default blocks, counted without tracing: unrolled, one per (batch group,
    query block, key block in reach), a query block with no key in reach counting one (its zero
    context); looped (`loops`), the loop bodies and ragged edges, at most 4. With a causal mask or a
    window and more query blocks than `limit`, the unrolled count stops at a lower bound (exact False).

    >>> static_steps(1, 2048, 2048, 8, 4, causal=True)       # 8 query blocks of 256, 1..8 key blocks
    (36, True)
    >>> static_steps(1, 8192, 8192, 8, 4, causal=True)       # 528 unrolled: looped, one scan body
    (1, True)
    """
    bq, bk = default_block(T, S, heads, itemsize)
    if loops(B, T, S, heads, itemsize, causal=causal, window=window, block=(bq, bk)):
        return (1 + (T % bq > 0)) * (1 + (S % bk > 0)), True
    return _unrolled_steps(B, T, S, heads, itemsize, causal=causal, window=window, limit=limit, block=(bq, bk))


def loops(B: int, T: int, S: int, heads: int, itemsize: int, *, causal: bool = False,
          window: int | None = None, block: tuple[int, int] | None = None) -> bool:
    """Whether `attention` loops over the blocks (more than LOOP_STEPS unrolled steps) rather than
    unrolling them."""
    block = block or default_block(T, S, heads, itemsize)
    steps, _ = _unrolled_steps(B, T, S, heads, itemsize, causal=causal, window=window, limit=LOOP_STEPS,
                               block=block)
    return steps > LOOP_STEPS


def _unrolled_steps(B: int, T: int, S: int, heads: int, itemsize: int, *, causal: bool, window: int | None,
                    limit: int | None, block: tuple[int, int]) -> tuple[int, bool]:
    bq, bk = block
    groups = -(-B // _batch_block(B, T, S, heads, itemsize, (bq, bk)))
    rows = -(-T // bq)
    if not causal and window is None:
        return groups * rows * -(-S // bk), True
    if limit is not None and groups * rows > limit:
        return groups * rows, False
    total = 0
    for r0 in range(0, T, bq):
        lo, hi = _key_range(r0, min(T, r0 + bq), S, causal=causal, window=window)
        total += groups * max(1, -(-(hi - lo) // bk))
    return total, True


def _projected_shape(x: Any) -> Any:
    """Shape and dtype of `x`, or of its projection when `x` is `ProjectedRows`."""
    import jax

    if not isinstance(x, ProjectedRows):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    one_row = jax.eval_shape(x.project, jax.ShapeDtypeStruct((1, 1, *x.source.shape[2:]), x.source.dtype))
    return jax.ShapeDtypeStruct((*x.source.shape[:2], *one_row.shape[2:]), one_row.dtype)


def _key_range(r0: int, r1: int, s_len: int, *, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that some query row in [r0, r1) may see under the causal mask and window."""
    lo, hi = 0, s_len
    if causal:                                   # key j <= row (top-left aligned, as Keras)
        hi = min(hi, r1)
    if window is not None:                       # |row - j| < window
        lo = max(lo, r0 - window + 1)
        hi = min(hi, r1 + window - 1)
    return lo, max(lo, hi)


def _all_allowed(r0: int, r1: int, c0: int, c1: int, *, causal: bool, window: int | None) -> bool:
    """Whether every (row, key) of the block passes the causal mask and the window."""
    if causal and c1 - 1 > r0:
        return False
    if window is not None and max(r1 - 1 - c0, c1 - 1 - r0) >= window:
        return False
    return True


class ProjectedRows(NamedTuple):
    """A projection computed block by block: `project(source[b0:b1, r0:r1])` gives rows [r0, r1)
    of the projected (and, for queries, scaled) heads `(b1 - b0, r1 - r0, N, H)` of the layer input
    `source` `(B, T, D)`."""

    source: Any
    project: Callable[[Any], Any]


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    sliding_window: int | None = None,
    large_negative: float = -1e9,
    block: tuple[int, int] | None = None,
    batch_block: int | None = None,
) -> Any:
    """The attention context `(B, T, N, Hv)` of projected, scaled q `(B, T, N, H)`, k `(B, S, N, H)`
    and v `(B, S, N, Hv)`, without materialising the scores.

    `q`, `k` and `v` may also be `ProjectedRows`: each block is then projected where it is first
    used (once, then reused by later steps), so the whole Q is never held, and K and V are made
    block by block instead of whole and then sliced, which costs IREE a copy of every block.

    `mask` is a boolean array that broadcasts to `(B, N, T, S)` (Keras' expanded attention mask:
    `(B, 1, T, S)`, `(B, N, T, S)`, `(1, 1, T, S)`, size-1 axes allowed); `causal` and
    `sliding_window` are Keras' causal mask and window along T and S. `block` is the (query, key)
    block sizes and `batch_block` how many batch elements a step takes (default: as many as keep
    one step's scores within `STEP_SCORES_BYTES`).

    Up to LOOP_STEPS steps the blocks are static: the program holds one step per (batch, query
    block, key block) that some query may attend to, and no loop (IREE syncs with the host on every
    iteration of a loop whose offsets are computed on the device). Past that, a scan over query
    blocks and a loop over the key blocks each may see (`_looped`): the program's size no longer
    grows with T. Each step's scores `(N, bq, bk)` are meant to stay in the CPU's caches.
    """
    import jax.numpy as jnp
    from jax import lax

    B, T = _projected_shape(q).shape[:2]
    k_shape, v_shape = _projected_shape(k), _projected_shape(v)
    S, N, Hv = k_shape.shape[1], k_shape.shape[2], v_shape.shape[3]
    dtype = k_shape.dtype
    itemsize = jnp.dtype(dtype).itemsize
    bq, bk = block or default_block(T, S, N, itemsize)
    if loops(B, T, S, N, itemsize, causal=causal, window=sliding_window, block=(bq, bk)):
        return _looped(q, k, v, mask=mask, causal=causal, window=sliding_window,
                       large_negative=large_negative, block=(min(bq, T), min(bk, S)))
    if bk >= S:                           # one key block: one projection each, as large as it gets
        q, k, v = (x.project(x.source) if isinstance(x, ProjectedRows) else x for x in (q, k, v))
    projected: dict[tuple[int, ...], Any] = {}

    def take(x: Any, b0: int, b1: int, c0: int, c1: int) -> Any:
        """Rows [c0, c1) of batch [b0, b1) of x, projected once per block when x is `ProjectedRows`."""
        if not isinstance(x, ProjectedRows):
            return x[b0:b1, c0:c1]
        key = (id(x), b0, b1, c0, c1)
        if key not in projected:
            projected[key] = x.project(x.source[b0:b1, c0:c1])
        return projected[key]
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    penalty = jnp.asarray(large_negative, dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        while mask.ndim < 4:
            mask = mask[None]

    def allowed(b0: int, b1: int, r0: int, r1: int, c0: int, c1: int) -> Any:
        """Boolean (.., r1 - r0, c1 - c0) of the block, or None when every pair is allowed."""
        ok = None
        if not _all_allowed(r0, r1, c0, c1, causal=causal, window=sliding_window):
            # Row minus key within the block, compared with the block's offset c0 - r0 (a Python
            # int): blocks of one shape share one constant `d` (the causal diagonal blocks at
            # T = 8192 kept 16 MB of per-block row and key indices in the module).
            shape = (r1 - r0, c1 - c0)
            d = lax.broadcasted_iota(jnp.int32, shape, 0) - lax.broadcasted_iota(jnp.int32, shape, 1)
            offset = c0 - r0
            if causal:                                  # r0 + a >= c0 + b
                ok = d >= offset
            if sliding_window is not None:              # |r0 + a - c0 - b| < window
                near = (d > offset - sliding_window) & (d < offset + sliding_window)
                ok = near if ok is None else ok & near
        if mask is not None:
            bs = slice(b0, b1) if mask.shape[0] > 1 else slice(None)
            rs = slice(r0, r1) if mask.shape[2] > 1 else slice(None)
            cs = slice(c0, c1) if mask.shape[3] > 1 else slice(None)
            m = mask[bs, :, rs, cs]
            ok = m if ok is None else ok & m
        return ok

    if batch_block is None:
        batch_block = _batch_block(B, T, S, N, itemsize, (bq, bk))
    out = []
    for b0 in range(0, B, batch_block):
        b1 = min(B, b0 + batch_block)
        blocks = []
        for r0 in range(0, T, bq):
            r1 = min(T, r0 + bq)
            qi = take(q, b0, b1, r0, r1)
            lo, hi = _key_range(r0, r1, S, causal=causal, window=sliding_window)
            single = hi - lo <= bk                  # one key block: no online rescaling
            state = None                    # running max, sum_j p v and sum_j p over the key blocks
            for c0 in range(lo, hi, bk):
                c1 = min(hi, c0 + bk)
                # (b, bq, N, H) x (b, bk, N, H) -> (b, N, bq, bk)
                s = lax.dot_general(qi, take(k, b0, b1, c0, c1), (((3,), (3,)), ((0, 2), (0, 2))))
                ok = allowed(b0, b1, r0, r1, c0, c1)
                if ok is not None:
                    s = jnp.where(ok, s, penalty)            # Keras: masked scores replaced (NaN too)
                m = jnp.max(s, axis=-1, keepdims=True)
                if state is not None:
                    m = jnp.maximum(state[0], m)
                p = jnp.exp(s - m)
                if ok is not None:
                    p = jnp.where(ok, p, zero)               # Keras: masked probs replaced by 0
                num = lax.dot_general(p, take(v, b0, b1, c0, c1), (((3,), (1,)), ((0, 1), (0, 2))))
                den = jnp.sum(p, axis=-1, keepdims=True)
                if single:
                    state = (m, num, den)
                    continue
                # [sum_j p v | sum_j p]: the context and its denominator rescale as one array
                # (two arrays left IREE holding 9 MB more at T = 8192).
                pv = jnp.concatenate([num, den], axis=-1)
                if state is not None:                        # online softmax: rescale the past
                    pv = jnp.exp(state[0] - m) * state[1] + pv
                state = (m, pv)
            if state is None:                                # no key in reach: zero context
                blocks.append(jnp.zeros((b1 - b0, r1 - r0, N, Hv), dtype))
                continue
            num, den = (state[1], state[2]) if single else (state[1][..., :Hv], state[1][..., Hv:])
            ctx = num / jnp.where(den > 0, den, one)         # all-masked rows: 0 / 1
            blocks.append(jnp.transpose(ctx, (0, 2, 1, 3)))
        out.append(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)


def _looped(q: Any, k: Any, v: Any, *, mask: Any, causal: bool, window: int | None, large_negative: float,
            block: tuple[int, int]) -> Any:
    """`attention` as loops: `lax.scan` over the full query blocks, and in each a `fori_loop` over
    the full key blocks some row of the block may see (bounds computed from the block's offset
    under the causal mask and the window); a ragged last query block and a ragged last key block
    are one more step each, outside the loops. Same arguments and result as `attention`.

    K and V are projected whole before the loops (each key block is used by every query block);
    Q is projected one block at a time inside the scan. Every step applies the masks with offsets
    computed on the device, so blocks that need no mask pay for a compare and two selects.
    """
    import jax.numpy as jnp
    from jax import lax

    bq, bk = block
    k, v = (x.project(x.source) if isinstance(x, ProjectedRows) else x for x in (k, v))
    B, T = _projected_shape(q).shape[:2]
    S, N, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = k.dtype
    penalty = jnp.asarray(large_negative, dtype)
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        while mask.ndim < 4:
            mask = mask[None]

    def query_rows(r0: Any, rows: int) -> Any:
        if isinstance(q, ProjectedRows):
            return q.project(lax.dynamic_slice_in_dim(q.source, r0, rows, axis=1))
        return lax.dynamic_slice_in_dim(q, r0, rows, axis=1)

    def allowed(r0: Any, c0: Any, rows: int, cols: int) -> Any:
        """Boolean (.., rows, cols) for the block at (r0, c0), or None when nothing is masked."""
        ok = None
        if causal or window is not None:
            shape = (rows, cols)
            d = lax.broadcasted_iota(jnp.int32, shape, 0) - lax.broadcasted_iota(jnp.int32, shape, 1)
            offset = c0 - r0
            if causal:                                  # r0 + a >= c0 + b
                ok = d >= offset
            if window is not None:                      # |r0 + a - c0 - b| < window
                near = (d > offset - window) & (d < offset + window)
                ok = near if ok is None else ok & near
        if mask is not None:
            m = mask
            if m.shape[2] > 1:
                m = lax.dynamic_slice_in_dim(m, r0, rows, axis=2)
            if m.shape[3] > 1:
                m = lax.dynamic_slice_in_dim(m, c0, cols, axis=3)
            ok = m if ok is None else ok & m
        return ok

    def step(state: tuple[Any, Any], qi: Any, r0: Any, c0: Any, rows: int, cols: int) -> tuple[Any, Any]:
        """One key block [c0, c0 + cols) into the running (max, [sum_j p v | sum_j p])."""
        kj = lax.dynamic_slice_in_dim(k, c0, cols, axis=1)
        vj = lax.dynamic_slice_in_dim(v, c0, cols, axis=1)
        s = lax.dot_general(qi, kj, (((3,), (3,)), ((0, 2), (0, 2))))       # (B, N, rows, cols)
        ok = allowed(r0, c0, rows, cols)
        if ok is not None:
            s = jnp.where(ok, s, penalty)
        m = jnp.maximum(state[0], jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m)
        if ok is not None:
            p = jnp.where(ok, p, zero)
        num = lax.dot_general(p, vj, (((3,), (1,)), ((0, 1), (0, 2))))      # (B, N, rows, Hv)
        pv = jnp.concatenate([num, jnp.sum(p, axis=-1, keepdims=True)], axis=-1)
        return m, jnp.exp(state[0] - m) * state[1] + pv

    full_keys = S // bk

    def row_block(r0: Any, rows: int) -> Any:
        """Context rows [r0, r0 + rows): (B, rows, N, Hv)."""
        qi = query_rows(r0, rows)
        lo, hi = 0, S
        if causal:
            hi = jnp.minimum(hi, r0 + rows)
        if window is not None:
            lo = jnp.maximum(lo, r0 - window + 1)
            hi = jnp.minimum(hi, r0 + rows + window - 1)
        j0 = lo // bk
        j1 = jnp.minimum((hi + bk - 1) // bk, full_keys)
        state = (jnp.full((B, N, rows, 1), -jnp.inf, dtype), jnp.zeros((B, N, rows, Hv + 1), dtype))
        state = lax.fori_loop(j0, jnp.maximum(j0, j1),
                              lambda j, st: step(st, qi, r0, j * bk, rows, bk), state)
        if S % bk:                          # the ragged last key block, masked like any other
            state = step(state, qi, r0, full_keys * bk, rows, S % bk)
        num, den = state[1][..., :Hv], state[1][..., Hv:]
        ctx = num / jnp.where(den > 0, den, one)                 # no key in reach: 0 / 1
        return jnp.transpose(ctx, (0, 2, 1, 3))

    full_rows = T // bq
    _, blocks = lax.scan(lambda carry, i: (carry, row_block(i * bq, bq)), None,
                         jnp.arange(full_rows, dtype=jnp.int32))
    out = jnp.moveaxis(blocks, 0, 1).reshape(B, full_rows * bq, N, Hv)
    if T % bq:
        out = jnp.concatenate([out, row_block(full_rows * bq, T % bq)], axis=1)
    return out
