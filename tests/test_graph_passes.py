"""Each graph pass on a graph of a few nodes, run with ONNX Runtime (and OpenVINO where it matters)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdedge.export import graph_passes as gp


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _model(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture
def mlp():
    """x (B, 64) -> MatMul(w1) -> Identity -> Relu -> Gemm(w2, transB) -> y (B, 16)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Identity", ["h"], ["h2"], name="id"),
             helper.make_node("Relu", ["h2"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm", transB=1)]
    return _model(nodes, [w1, w2, b2], [_f("x", ["B", 64])], [_f("y", ["B", 16])])


def test_eliminate_identity_rewires_and_keeps_outputs(mlp):
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = _run(mlp, {"x": x})
    out = gp.eliminate_identity(mlp)
    assert gp.count_ops(out)["Identity"] == 0
    np.testing.assert_array_equal(_run(out, {"x": x}), ref)


def test_eliminate_identity_keeps_one_that_names_a_graph_output():
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])], [],
               [_f("x", [2])], [_f("y", [2])])
    assert gp.count_ops(gp.eliminate_identity(m))["Identity"] == 1


def test_quantize_weights_int8_per_channel(mlp):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    ref = _run(mlp, {"x": x})
    before = sum(len(i.raw_data) for i in mlp.graph.initializer)
    out = gp.quantize_weights_int8(mlp, min_elements=100)
    ops = gp.count_ops(out)
    assert ops["DequantizeLinear"] == 2  # w1 (axis 1 for MatMul) and w2 (axis 0: Gemm transB)
    axes = {n.input[0]: n.attribute[0].i for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"w1_int8": 1, "w2_int8": 0}
    int8 = {i.name for i in out.graph.initializer if i.data_type == TensorProto.INT8}
    assert {"w1_int8", "w2_int8"} <= int8 and "b2" in {i.name for i in out.graph.initializer}
    after = sum(len(i.raw_data) for i in out.graph.initializer)
    assert after < before / 3
    y = _run(out, {"x": x})
    cos = float(np.sum(y * ref) / np.linalg.norm(y) / np.linalg.norm(ref))
    assert cos > 0.999 and np.max(np.abs(y - ref)) < 0.05 * np.max(np.abs(ref))


def test_quantize_weights_int8_conv_and_gather_and_skips_shared_use():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    emb = numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "emb")
    shared = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "shared")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "shared"], ["m"]),
             helper.make_node("Add", ["shared", "shared"], ["y2"])]  # `shared` also used by an Add: stays float
    m = _model(nodes, [w, emb, shared], [_f("x", [1, 4, 5, 5]), helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
               [_f("c", [1, 8, 5, 5]), _f("m", [3, 16]), _f("y2", [16, 16])])
    feeds = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32), "ids": np.array([1, 7, 49])}
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    out = gp.quantize_weights_int8(m, min_elements=100)
    names = {i.name for i in out.graph.initializer}
    assert {"w_int8", "emb_int8", "shared"} <= names and "w" not in names and "emb" not in names
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(sess.run(None, feeds), ref):
        assert np.max(np.abs(a - b)) < 0.03 * np.max(np.abs(b)) + 0.05


def test_store_weights_fp16_halves_bytes_and_keeps_fp32_compute(mlp):
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    ref = _run(mlp, {"x": x})
    out = gp.store_weights_fp16(mlp, min_elements=100)
    assert gp.count_ops(out)["Cast"] == 2
    assert {i.data_type for i in out.graph.initializer if i.name.endswith("_fp16")} == {TensorProto.FLOAT16}
    y = _run(out, {"x": x})
    assert y.dtype == np.float32 and np.max(np.abs(y - ref)) < 1e-3 * np.max(np.abs(ref))


def _qdq_chain():
    """x -> Q -> DQ -> Relu(name 'keep/relu') and x -> Q2 -> DQ2 -> Sigmoid('other/sig')."""
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q1"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq1"),
             helper.make_node("Relu", ["dq"], ["y1"], name="keep/relu"),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q2"], name="q2"),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["dq2"], name="dq2"),
             helper.make_node("Sigmoid", ["dq2"], ["y2"], name="other/sig")]
    return _model(nodes, [s, z], [_f("x", [5])], [_f("y1", [5]), _f("y2", [5])])


def test_remove_qdq_pairs_only_for_the_named_nodes():
    m = gp.remove_qdq_pairs(_qdq_chain(), ["keep/"])
    ops = gp.count_ops(m)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # the pair feeding Relu is gone
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    assert relu.input[0] == "x"
    x = np.array([-1.0, 0.0123, 0.5, 3.0, 20.0], np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    y1, y2 = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y1, np.maximum(x, 0))  # exact: no longer quantised
    assert not np.allclose(y2, 1 / (1 + np.exp(-x)), atol=1e-4)  # still quantised (clipped at 12.75)


def test_remove_qdq_pairs_leaves_weight_dequantisation():
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "w_int8")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w_int8", "s"], ["w"], name="dqw"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="keep/mm")]
    m = gp.remove_qdq_pairs(_model(nodes, [w, s], [_f("x", [1, 4])], [_f("y", [1, 4])]), ["keep/"])
    assert gp.count_ops(m)["DequantizeLinear"] == 1
