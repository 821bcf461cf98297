"""Never half-prune: blocks that cannot be proven safe are skipped, and outputs never clobber inputs."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import feed_for, run
from onnxsnp import SnpError, prune
from onnxsnp.cli import main
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

HEADS, HEAD_DIM = 2, 4
WIDTH = HEADS * HEAD_DIM


def attention_model(extra_q_reader: bool = False, length_scale: bool = False, chained_mlp: bool = False) -> onnx.ModelProto:
    """A hand-built single-block attention (x: (B, N, 8)) with optional traps."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"W{p}") for p in "qkvo"]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("split", [0, 0, HEADS, HEAD_DIM]), ("merge", [0, 0, WIDTH]), ("one", 1))]
    inits.append(numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale"))
    nodes = []
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{p}"], [f"{p}_lin"]),
                  helper.make_node("Reshape", [f"{p}_lin", "split"], [f"{p}_heads"])]
    nodes += [helper.make_node("Transpose", ["q_heads"], ["q"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k_heads"], ["kT"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v_heads"], ["v"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["q", "kT"], ["scores"])]
    if length_scale:  # scores / sqrt(N), N read at run time: not the head width, must not be frozen
        nodes += [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"]),
                  helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
                  helper.make_node("Sqrt", ["n_float"], ["root"]), helper.make_node("Div", ["scores", "root"], ["scaled"])]
    else:
        nodes.append(helper.make_node("Mul", ["scores", "scale"], ["scaled"]))
    nodes += [helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["context"]),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "merge"], ["merged"]),
              helper.make_node("MatMul", ["merged", "Wo"], ["attn_out"])]
    output = "attn_out"
    if extra_q_reader:  # something outside the attention reads q's projection
        nodes += [helper.make_node("ReduceMean", ["q_lin"], ["q_mean"], keepdims=1),
                  helper.make_node("Add", ["attn_out", "q_mean"], ["gated"])]
        output = "gated"
    if chained_mlp:  # A → Relu → B → Relu → C: B is fc2 of one "FFN" and fc1 of the next
        for name in "ABC":
            inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"W{name}"))
        nodes += [helper.make_node("MatMul", [output, "WA"], ["a"]), helper.make_node("Relu", ["a"], ["a_r"]),
                  helper.make_node("MatMul", ["a_r", "WB"], ["b"]), helper.make_node("Relu", ["b"], ["b_r"]),
                  helper.make_node("MatMul", ["b_r", "WC"], ["c"])]
        output = "c"
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", WIDTH])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["B", "N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def calib() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((16, 6, WIDTH)).astype(np.float32)}


def test_plain_hand_built_attention_is_pruned():
    pruned, report = prune(attention_model(), ratio=0.5, calib=calib())
    assert [(b.qk_dim_after, b.v_dim_after) for b in report.blocks if b.kind == "attention"] == [(2, 2)]


def test_outside_reader_of_q_skips_the_block():
    matches = find_blocks(ModelGraph(attention_model(extra_q_reader=True)))
    assert not matches.attention
    assert "ReduceMean" in matches.skipped[0].reason
    with pytest.raises(SnpError, match="no prunable attention"):
        prune(attention_model(extra_q_reader=True), ratio=0.5, calib=calib())


def test_length_dependent_scale_is_not_frozen():
    matches = find_blocks(ModelGraph(attention_model(length_scale=True)))
    assert not matches.attention and "run-time values" in matches.skipped[0].reason


def test_chained_mlp_is_not_pruned_twice():
    matches = find_blocks(ModelGraph(attention_model(chained_mlp=True)))
    assert len(matches.attention) == 1 and not matches.ffn
    assert sum("chained" in s.reason for s in matches.skipped) == 2
    prune(attention_model(chained_mlp=True), ratio=0.5, calib=calib())  # verifies and runs


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_external_data_layout_is_kept(exported, tmp_path):
    source = exported("vit", "manual", True, "dynamo")
    assert (source.parent / f"{source.name}.data").exists()
    out = tmp_path / "pruned.onnx"
    assert main([str(source), str(out), "--ratio", "0.5", "--calib-samples", "8", "-q"]) == 0
    assert (tmp_path / "pruned.onnx.data").exists()
    outputs = run(onnx.load(str(out)), feed_for(source, batch=3))
    assert outputs[0].shape == (3, 10)


@pytest.mark.parametrize("target", ["data_of_input", "report_is_output"])
def test_outputs_never_overwrite_inputs(exported, tmp_path, target, capsys):
    original = exported("vit", "manual", True, "dynamo")
    source = tmp_path / "model.onnx"
    source.write_bytes(original.read_bytes())
    data = tmp_path / "model.onnx.data"
    data.write_bytes((original.parent / f"{original.name}.data").read_bytes())
    before = (digest(source), digest(data))
    if target == "data_of_input":
        argv = [str(source), str(data)]
    else:
        argv = [str(source), str(tmp_path / "out.onnx"), "--report", str(tmp_path / "out.onnx")]
    assert main(argv + ["-q"]) == 2
    assert "onnxsnp: error" in capsys.readouterr().err
    assert (digest(source), digest(data)) == before
    assert not (tmp_path / "out.onnx").exists()


def test_models_too_big_for_one_protobuf_go_through_external_data(exported, tmp_path, monkeypatch):
    """Above 2 GB nothing may be serialised whole; the same path is forced here on a small model."""
    import onnxsnp.io.loading

    source = exported("bert", "sdpa", True)
    normal = tmp_path / "normal.onnx"
    assert main([str(source), str(normal), "--ratio", "0.5", "--calib-samples", "8", "-q"]) == 0
    monkeypatch.setattr(onnxsnp.io.loading, "PROTOBUF_LIMIT", 1000)
    big = tmp_path / "big.onnx"
    assert main([str(source), str(big), "--ratio", "0.5", "--calib-samples", "8", "-q"]) == 0
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    assert not (tmp_path / "normal.onnx.data").exists()
    feed = feed_for(source, batch=2, seq=6)
    for want, got in zip(run(onnx.load(str(normal)), feed), run(onnx.load(str(big)), feed)):
        np.testing.assert_allclose(got, want, atol=1e-6)
