"""Graph passes on ONNX models: each a small named function `ModelProto -> ModelProto` (in place, returned).

Every pass here keeps the graph portable (standard ONNX ops only), so one bundle runs on ONNX Runtime and
OpenVINO alike. Each is tested on a graph of a few nodes (tests/test_graph_passes.py).

- `eliminate_identity`       drop Identity nodes, rewiring their consumers (graph outputs kept)
- `quantize_weights_int8`    weight-only int8: float weights of Conv / MatMul / Gemm / Gather become int8 with a
                             per-channel scale and a DequantizeLinear in front (a quarter of the bytes; OpenVINO
                             keeps them compressed, ONNX Runtime dequantises on the fly)
- `store_weights_fp16`       large float weights stored as fp16 with a Cast to float in front (half the bytes,
                             fp32 compute: ONNX Runtime folds the Cast at load, OpenVINO decompresses)
- `remove_qdq_pairs`         undo activation quantisation in front of chosen nodes (the sensitivity sweep keeps
                             the layers that hurt parity most in fp32 this way, without re-quantising)
- `count_ops`                op-type histogram, for reports and tests

Fusions (attention, GroupNorm, bias+GELU) are left to the backends' own optimisers, which run at load and whose
result is cached: ONNX Runtime's graph optimiser at ORT_ENABLE_ALL fuses what its CPU kernels run, and
OpenVINO's transformations fuse GroupNorm, attention and the QDQ patterns into its int8 kernels. ONNX Runtime's
offline transformer optimiser (`onnxruntime.transformers.optimizer`, model_type "unet") writes com.microsoft
ops that OpenVINO cannot read, and fuses GroupNorm only for CUDA; see docs/cpu-engines.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "Gather")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def count_ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def eliminate_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Identity nodes; an Identity that produces a graph output is kept (the output name must stay)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            src = node.input[0]
            rename[node.output[0]] = rename.get(src, src)
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _weight_axis(node: onnx.NodeProto, index: int, shape: tuple[int, ...]) -> int | None:
    """The output-channel axis of a weight input, or None when this input is not a weight we quantise."""
    if node.op_type == "Conv" and index == 1 and len(shape) >= 3:
        return 0
    if node.op_type == "MatMul" and index == 1 and len(shape) == 2:
        return 1
    if node.op_type == "Gemm" and index == 1 and len(shape) == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "Gather" and index == 0 and len(shape) == 2:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return 0 if axis == 0 else None  # an embedding table: one scale per row
    return None


def quantize_weights_int8(model: onnx.ModelProto, ops: Iterable[str] = WEIGHT_OPS,
                          min_elements: int = 1024) -> onnx.ModelProto:
    """Weight-only int8: symmetric, per output channel, with DequantizeLinear(axis) feeding the original op.

    Only float32 initializers with at least `min_elements` values, used by nothing but the listed ops in a
    weight position, are converted (a tensor shared with another kind of use stays float).
    """
    graph = model.graph
    ops = tuple(ops)
    inits = {i.name: i for i in graph.initializer}
    users = _consumers(graph)
    new_inits, new_nodes, drop = [], [], set()
    for name, init in inits.items():
        if init.data_type != TensorProto.FLOAT or name not in users:
            continue
        uses = users[name]
        shape = tuple(init.dims)
        axes = {_weight_axis(n, i, shape) if n.op_type in ops else None for n, i in uses}
        if len(axes) != 1 or None in axes or int(np.prod(shape)) < min_elements:
            continue
        axis = axes.pop()
        w = numpy_helper.to_array(init).astype(np.float32)
        reduce = tuple(d for d in range(w.ndim) if d != axis)
        scale = np.max(np.abs(w), axis=reduce) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        bshape = [1] * w.ndim
        bshape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(bshape)), -127, 127).astype(np.int8)
        qname, sname, zname = _unique(graph, f"{name}_int8"), _unique(graph, f"{name}_scale"), _unique(graph, f"{name}_zp")
        deq = _unique(graph, f"{name}_dequantized")
        new_inits += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zname)]
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [deq], name=f"{name}_DequantizeLinear",
                                          axis=axis))
        for node, i in uses:
            node.input[i] = deq
        drop.add(name)
    _replace_initializers(graph, drop, new_inits)
    _prepend_nodes(graph, new_nodes)
    _ensure_opset(model, 13)
    return model


def store_weights_fp16(model: onnx.ModelProto, min_elements: int = 1024) -> onnx.ModelProto:
    """Large float32 initializers stored as float16, each followed by Cast(to=float): half the bytes."""
    graph = model.graph
    users = _consumers(graph)
    new_inits, new_nodes, drop = [], [], set()
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(tuple(init.dims))) < min_elements:
            continue
        if init.name not in users:
            continue
        w = numpy_helper.to_array(init)
        if np.max(np.abs(w), initial=0.0) > 65000:  # would overflow fp16
            continue
        hname, cname = _unique(graph, f"{init.name}_fp16"), _unique(graph, f"{init.name}_fp32")
        new_inits.append(numpy_helper.from_array(w.astype(np.float16), hname))
        new_nodes.append(helper.make_node("Cast", [hname], [cname], name=f"{init.name}_Cast", to=TensorProto.FLOAT))
        for node, i in users[init.name]:
            node.input[i] = cname
        drop.add(init.name)
    _replace_initializers(graph, drop, new_inits)
    _prepend_nodes(graph, new_nodes)
    return model


def remove_qdq_pairs(model: onnx.ModelProto, node_prefixes: Iterable[str]) -> onnx.ModelProto:
    """Undo activation quantisation feeding nodes whose name starts with one of `node_prefixes`.

    A QuantizeLinear → DequantizeLinear pair on an activation (not a constant weight) whose DequantizeLinear
    feeds such a node is bypassed for that node: it reads the float activation again. Weight DequantizeLinear
    nodes are left (the weights stay int8). Pairs no longer used by anything are removed.
    """
    prefixes = tuple(node_prefixes)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if not node.name.startswith(prefixes) or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            node.input[i] = q.input[0]
    _prune_dead(graph)
    return model


def _prune_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (repeatedly), then unused initializers."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {n for node in graph.node for n in node.input}
    inits = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _replace_initializers(graph: onnx.GraphProto, drop: set[str], new: list[onnx.TensorProto]) -> None:
    keep = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep + new)
    vis = [v for v in graph.input if v.name not in drop]  # old exporters list initializers as inputs too
    del graph.input[:]
    graph.input.extend(vis)


def _prepend_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    if not nodes:
        return
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def _ensure_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < version:
            op.version = version
