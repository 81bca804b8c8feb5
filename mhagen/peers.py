"""The same layer, with the same weights, in the runtimes a user would pick instead of mhagen.

The layer is written as an ONNX graph by hand (`onnx.helper`), in two forms:

- **plain**: MatMul + Add projections, Reshape and Transpose to heads, MatMul scores of the scaled
  queries, the masks through `Where` (masked scores replaced by -1e9, masked probabilities by 0, as
  Keras does), Softmax, MatMul with the values, and the output projection;
- **fused**: the projections, then ONNX Runtime's `com.microsoft.MultiHeadAttention` contrib op (the
  causal mask as its `unidirectional` attribute where T = S, other masks as an additive
  `attention_bias` of -1e9 where masked, and rows with every key masked set to 0 as Keras does),
  then the output projection.

Peers, by the name they have in the benchmark's results:

    onnxruntime         the plain graph in ONNX Runtime (CPU execution provider)
    onnxruntime_fused   the fused graph in ONNX Runtime
    openvino            the plain graph in OpenVINO, INFERENCE_PRECISION_HINT f32
    openvino_bf16       the plain graph in OpenVINO at its default precision, where that is bf16
                        (CPUs with AVX-512 BF16 or AMX): not float32, checked at bfloat16's tolerance

Every runtime gets the same number of threads (`threads`). The graphs cover 3-D inputs attending
over axis 1, self and cross attention (a separate key too), attention masks, the causal mask, a
sliding window, the gate and multi-axis outputs, in float32; other specs are skipped with the reason
(`unsupported`).

    peer = make_peer("onnxruntime", spec, weights, inputs, threads=2)
    out = peer.to_host(peer.call())                     # (B, T, E)
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MhagenError, invalid
from .spec import Spec

__all__ = ["PEERS", "PEER_FAMILIES", "Peer", "PeerSkipped", "parse_peers", "unsupported", "onnx_model",
           "make_peer", "default_threads"]

# What `--peers` accepts, and the results each family adds.
PEER_FAMILIES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime_fused"),
    "openvino": ("openvino", "openvino_bf16"),
}
PEERS: tuple[str, ...] = tuple(p for family in PEER_FAMILIES.values() for p in family)
# The Python package each family needs (import name, pip name).
_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "onnxruntime": (("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "openvino": (("onnx", "onnx"), ("openvino", "openvino")),
}
INSTALL_HINT = "pip install 'mhagen[bench]'"
# Keras' fill of masked scores in float32 (`_large_negative_number`).
LARGE_NEGATIVE = -1e9
ONNX_OPSET = 17


class PeerSkipped(MhagenError):
    """A peer cannot run this spec here; the message says why."""


@dataclass
class Peer:
    """A built peer: `call()` runs it on inputs already in place; `to_host` gives the output."""

    name: str
    precision: str                          # "float32", or "bfloat16" for OpenVINO's bf16 default
    call: Callable[[], Any]
    to_host: Callable[[Any], np.ndarray]
    description: str
    # The input arrays the runtime reads in place (OpenVINO's shared-memory tensors, ORT's bound
    # inputs): held here for as long as the peer lives. Without it OpenVINO read freed memory (a
    # converted mask: wrong outputs, |err| 0.32 on cross-attention; a segfault in a fresh process).
    inputs: dict[str, np.ndarray] | None = None


def default_threads() -> int:
    """The cores this process may run on (`taskset -c 0` gives 1)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        return os.cpu_count() or 1


def parse_peers(value: str) -> tuple[str, ...]:
    """`"onnxruntime,openvino"` -> the peers those families add, in order. Refuses unknown names and,
    in one line with the install command, families whose packages are missing."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    valid = list(PEER_FAMILIES) + [p for p in PEERS if p not in PEER_FAMILIES]
    out: list[str] = []
    for name in names:
        if name in PEER_FAMILIES:
            family = PEER_FAMILIES[name]
        elif name in PEERS:
            family = (name,)
        else:
            raise invalid("peers", f"a comma-separated list of {valid}", value, cls=MhagenError)
        missing = [pip for family_name in {_family(p) for p in family}
                   for module, pip in _PACKAGES[family_name] if importlib.util.find_spec(module) is None]
        if missing:
            raise MhagenError(f"--peers {name} needs {', '.join(sorted(set(missing)))}, which is not "
                              f"installed: {INSTALL_HINT}")
        out += [p for p in family if p not in out]
    if not out:
        raise invalid("peers", f"a comma-separated list of {valid}", value, cls=MhagenError)
    return tuple(out)


def _family(peer: str) -> str:
    return next(f for f, members in PEER_FAMILIES.items() if peer in members)


def unsupported(spec: Spec) -> str:
    """Why the ONNX graphs cannot express `spec`, or "" when they can."""
    g, layer, call = spec.geometry, spec.layer, spec.call
    if g.rank != 3 or g.attention_axes != (1,):
        return "the ONNX graphs here cover 3-D inputs attending over axis 1"
    if call.dtype_policy.compute != "float32" or call.dtype_policy.variable != "float32":
        return f"the ONNX graphs here are float32 (the spec computes in {call.dtype_policy.compute})"
    if call.return_attention_scores:
        return "the spec returns the attention scores"
    if spec.has_dropout:
        return "the spec applies dropout (a random keep-mask no peer draws alike)"
    if layer.masking == "keras2":
        return "tf.keras 2.x masking (masking = \"keras2\")"
    return ""


# ---- the ONNX graphs ---------------------------------------------------------------------------
def _weights_by_name(spec: Spec, weights: Sequence[Any] | Mapping[str, Any]) -> dict[str, np.ndarray]:
    from .weights import normalize_weights, weight_names

    arrays = normalize_weights(spec, weights)
    return {n: np.asarray(a, dtype=np.float32) for n, a in zip(weight_names(spec), arrays)}


def onnx_model(spec: Spec, weights: Sequence[Any] | Mapping[str, Any], *, fused: bool = False) -> Any:
    """The layer as an `onnx.ModelProto`: inputs query `(B, T, Dq)`, value `(B, S, Dv)`, key
    `(B, S, Dk)` when the spec has one, attention_mask (bool, the spec's mask shape) when it has
    one; output `(B, T, *output_dims)`. `fused` uses `com.microsoft.MultiHeadAttention` (ONNX Runtime only).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    why = unsupported(spec)
    if why:
        raise PeerSkipped(why)
    g, layer, call = spec.geometry, spec.layer, spec.call
    N, H, Hv = g.num_heads, g.key_dim, g.value_dim
    B, T, Dq = g.query_shape
    S = g.value_shape[1]
    out_dims = tuple(g.output_dims)
    w = _weights_by_name(spec, weights)
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, array: Any, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(array, dtype=dtype)), name))
        return name

    def node(op: str, inputs: list[str], out: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def dense(x: str, group: str, width: int, scale: float = 1.0) -> str:
        """(B, L, D) -> (B, L, width): x @ kernel (D, width) + bias, optionally scaled (Keras scales q)."""
        kernel = w[f"{group}/kernel"].reshape(-1, width) * np.float32(scale)
        y = node("MatMul", [x, const(f"{group}_kernel", kernel)], f"{group}_mm")
        if layer.use_bias:
            bias = w[f"{group}/bias"].reshape(width) * np.float32(scale)
            y = node("Add", [y, const(f"{group}_bias", bias)], f"{group}_proj")
        return y

    key_input = "key" if spec.has_key else "value"
    # Keras divides the projected query by sqrt(H); folding it into the kernel and bias rounds
    # differently by at most one ulp per element, far inside float32's tolerance.
    scale = 1.0 / math.sqrt(H)
    q = dense("query", "query", N * H, scale)
    k = dense(key_input, "key", N * H)
    v = dense("value", "value", N * Hv)

    allowed = None          # bool, broadcasting to (B, N, T, S)
    if g.mask_shape is not None:
        m = "attention_mask"
        if len(g.mask_shape) == 3:                       # (B, T, S) -> (B, 1, T, S)
            m = node("Unsqueeze", [m, const("axis1", [1], np.int64)], "mask4")
        elif len(g.mask_shape) == 2:                     # (T, S) -> (1, 1, T, S)
            m = node("Unsqueeze", [m, const("axes01", [0, 1], np.int64)], "mask4")
        allowed = m
    # The fused op's `unidirectional` aligns the diagonal bottom-right (query i sees keys up to
    # i + S - T, as with a past cache); Keras' causal mask is top-left aligned. They agree at T = S.
    unidirectional = fused and call.use_causal_mask and T == S
    if layer.sliding_window is not None or (call.use_causal_mask and not unidirectional):
        i, j = np.arange(T)[:, None], np.arange(S)[None, :]
        band = np.ones((T, S), dtype=bool)
        if call.use_causal_mask:
            band &= i >= j
        if layer.sliding_window is not None:
            band &= np.abs(i - j) < layer.sliding_window
        c = const("band", band[None, None], np.bool_)
        allowed = c if allowed is None else node("And", [allowed, c], "allowed")

    if fused:
        attrs: dict[str, Any] = {"num_heads": N, "scale": 1.0, "mask_filter_value": LARGE_NEGATIVE}
        if unidirectional:
            attrs["unidirectional"] = 1
        inputs = [q, k, v]
        if allowed is not None:                          # additive: 0 where allowed, -1e9 where masked
            bias = node("Where", [allowed, const("zero", 0.0), const("neg", LARGE_NEGATIVE)], "attention_bias")
            inputs += ["", "", bias]
        ctx = node("MultiHeadAttention", inputs, "context", domain="com.microsoft", **attrs)
        if allowed is not None:
            # An additive bias gives a row with every key masked the mean of the values; Keras
            # gives it 0. Rows with any key allowed keep their context, the others get 0.
            f = node("Cast", [allowed], "allowed_f", to=TensorProto.FLOAT)
            any_key = node("ReduceMax", [f], "row_any", axes=[-1], keepdims=1)
            row_allowed = node("Squeeze", [any_key, const("axis1_", [1], np.int64)], "row_any_bt")
            ctx = node("Mul", [ctx, row_allowed], "context_rows")
    else:
        def heads(x: str, width: int, perm: list[int], name: str) -> str:
            r = node("Reshape", [x, const(f"{name}_shape", [0, 0, N, width], np.int64)], f"{name}_heads")
            return node("Transpose", [r], f"{name}_t", perm=perm)

        qh = heads(q, H, [0, 2, 1, 3], "q")               # (B, N, T, H)
        kh = heads(k, H, [0, 2, 3, 1], "k")               # (B, N, H, S)
        vh = heads(v, Hv, [0, 2, 1, 3], "v")              # (B, N, S, Hv)
        s = node("MatMul", [qh, kh], "scores")            # (B, N, T, S)
        if allowed is not None:
            s = node("Where", [allowed, s, const("neg", LARGE_NEGATIVE)], "scores_masked")
        p = node("Softmax", [s], "probs", axis=-1)
        if allowed is not None:
            p = node("Where", [allowed, p, const("zero", 0.0)], "probs_masked")
        c = node("MatMul", [p, vh], "ctx_heads")          # (B, N, T, Hv)
        c = node("Transpose", [c], "ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [c, const("ctx_shape", [0, 0, N * Hv], np.int64)], "context")
    if layer.use_gate:                                    # context * sigmoid(query @ gate), per head
        gate = node("Sigmoid", [dense("query", "gate", N * Hv)], "gate_sigmoid")
        ctx = node("Mul", [ctx, gate], "context_gated")
    width = math.prod(out_dims)
    out = node("MatMul", [ctx, const("attention_output_kernel",
                                     w["attention_output/kernel"].reshape(N * Hv, width))], "out_mm")
    if layer.use_bias:
        out = node("Add", [out, const("attention_output_bias", w["attention_output/bias"].reshape(width))],
                   "out_proj")
    if len(out_dims) != 1:
        out = node("Reshape", [out, const("out_shape", [0, 0, *out_dims], np.int64)], "out_reshaped")
    nodes[-1].output[0] = "output"

    f32 = TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info("query", f32, [B, T, Dq]),
                    helper.make_tensor_value_info("value", f32, list(g.value_shape))]
    if spec.has_key:
        graph_inputs.append(helper.make_tensor_value_info("key", f32, list(g.key_shape)))
    if g.mask_shape is not None:
        graph_inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, list(g.mask_shape)))
    graph = helper.make_graph(nodes, "mhagen_attention", graph_inputs,
                              [helper.make_tensor_value_info("output", f32, [B, T, *out_dims])], inits)
    opsets = [helper.make_opsetid("", ONNX_OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mhagen")
    model.ir_version = 8
    if not fused:
        onnx.checker.check_model(model)
    return model


def _feeds(spec: Spec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {"query": inputs["query"], "value": inputs["value"]}
    if spec.has_key:
        feeds["key"] = inputs["key"]
    if spec.geometry.mask_shape is not None:
        feeds["attention_mask"] = np.asarray(inputs["attention_mask"]) != 0
    return {k: np.ascontiguousarray(v, dtype=np.bool_ if k == "attention_mask" else np.float32)
            for k, v in feeds.items()}


# ---- the runtimes ------------------------------------------------------------------------------
def make_peer(name: str, spec: Spec, weights: Sequence[Any] | Mapping[str, Any],
              inputs: Mapping[str, np.ndarray], *, threads: int | None = None) -> Peer:
    """Build peer `name` for `spec` with `weights`, bound to `inputs` (already converted), on
    `threads` threads (default: the cores this process may use). Raises `PeerSkipped` with the
    reason where the peer cannot run the spec."""
    if name not in PEERS:
        raise invalid("peer", f"one of {list(PEERS)}", name, cls=MhagenError)
    why = unsupported(spec)
    if why:
        raise PeerSkipped(why)
    threads = threads or default_threads()
    feeds = _feeds(spec, inputs)
    if name.startswith("onnxruntime"):
        return _onnxruntime(name, onnx_model(spec, weights, fused=name == "onnxruntime_fused"), feeds, threads)
    return _openvino(name, onnx_model(spec, weights), feeds, threads)


def _onnxruntime(name: str, model: Any, feeds: dict[str, np.ndarray], threads: int) -> Peer:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT refuses the graph (an op or attribute it lacks)
        raise PeerSkipped(f"ONNX Runtime {ort.__version__} refused the graph: {_first_line(exc)}") from None
    # Inputs bound once, as mhagen's are on its device: the timed call is the run alone.
    binding = session.io_binding()
    for key, array in feeds.items():
        binding.bind_cpu_input(key, array)
    binding.bind_output("output")

    def call(inputs: dict[str, np.ndarray] = feeds) -> Any:    # holds the bound arrays (see Peer.inputs)
        session.run_with_iobinding(binding)
        return binding

    def to_host(result: Any) -> np.ndarray:
        return np.asarray(result.copy_outputs_to_cpu()[0])

    what = "com.microsoft.MultiHeadAttention" if name.endswith("fused") else "plain ONNX graph"
    return Peer(name, "float32", call, to_host, f"ONNX Runtime {ort.__version__}, {what}, {threads} threads",
                inputs=feeds)


def _import_openvino() -> Any:
    """`import openvino`, without its telemetry: the import starts OpenVINO's usage telemetry,
    which forks a process (in a process where JAX runs threads, a fork can deadlock) to send
    data over the network, unless the environment looks like CI."""
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino as ov
    finally:
        if saved is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = saved
    return ov


def _openvino(name: str, model: Any, feeds: dict[str, np.ndarray], threads: int) -> Peer:
    ov = _import_openvino()

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                              "NUM_STREAMS": 1}
    if name == "openvino":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    with tempfile.TemporaryDirectory(prefix="mhagen-peer-") as tmp:
        path = Path(tmp) / "layer.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            compiled = core.compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO refuses the graph
            raise PeerSkipped(f"OpenVINO {ov.__version__} refused the graph: {_first_line(exc)}") from None
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if name == "openvino_bf16" and "bf16" not in precision and "bfloat16" not in precision:
        raise PeerSkipped(f"OpenVINO's default precision on this CPU is {precision}, as `openvino`'s")
    request = compiled.create_infer_request()
    for key, array in feeds.items():
        request.set_tensor(key, ov.Tensor(array, shared_memory=True))

    def call(inputs: dict[str, np.ndarray] = feeds) -> Any:    # holds the shared arrays (see Peer.inputs)
        request.infer()
        return request

    def to_host(result: Any) -> np.ndarray:
        return np.array(result.get_output_tensor(0).data, copy=True)

    return Peer(name, "bfloat16" if name == "openvino_bf16" else "float32", call, to_host,
                f"OpenVINO {ov.__version__}, plain ONNX graph, {precision}, {threads} threads", inputs=feeds)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
