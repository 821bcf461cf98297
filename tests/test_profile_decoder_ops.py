"""tools/profile_decoder_ops.py's bookkeeping: which nodes fall in one group, the work each product
scales with, the speedup an op mix allows if every product shrank by its own cut, and the split of
the profiler's events into the prefill and the decode steps."""
from __future__ import annotations

import onnx
import pytest
from onnx import helper

import profile_decoder_ops as prof

HIDDEN, HEADS, KV_HEADS = 64, 4, 2


def genai_like(head: int, ffn: int, layers: int = 2) -> onnx.ModelProto:
    """Per layer, onnxruntime-genai's node names: a packed qkv MatMulNBits feeding a
    GroupQueryAttention, an output projection and a gate/down FFN (only the attributes the tool reads)."""
    nodes = []
    for i in range(layers):
        def nbits(name, n, k, x, y):
            return helper.make_node("MatMulNBits", [x, f"{name}.weight_Q4", f"{name}.scales"], [y],
                                    name=f"/model/layers.{i}/{name}/MatMul_Q4", domain="com.microsoft",
                                    N=n, K=k, bits=4, block_size=32)
        nodes += [nbits("attn/qkv_proj", (HEADS + 2 * KV_HEADS) * head, HIDDEN, "x", f"qkv{i}"),
                  helper.make_node("GroupQueryAttention", [f"qkv{i}", "", "", f"past{i}k", f"past{i}v", "s", "t"],
                                   [f"att{i}", f"present{i}k", f"present{i}v"], name=f"/model/layers.{i}/attn/GQA",
                                   domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS),
                  nbits("attn/o_proj", HIDDEN, HEADS * head, f"att{i}", f"o{i}"),
                  nbits("mlp/gate_proj", ffn, HIDDEN, f"o{i}", f"g{i}"),
                  helper.make_node("Sigmoid", [f"g{i}"], [f"a{i}"], name=f"/model/layers.{i}/mlp/act"),
                  nbits("mlp/down_proj", HIDDEN, ffn, f"a{i}", f"y{i}")]
    graph = helper.make_graph(nodes, "g", [], [])
    return helper.make_model(graph)


def test_a_projection_of_every_layer_falls_in_one_group():
    groups = prof.node_groups(genai_like(16, 32))
    assert groups["/model/layers.0/mlp/down_proj/MatMul_Q4"] == groups["/model/layers.1/mlp/down_proj/MatMul_Q4"] \
        == "/model/layers.*/mlp/down_proj/MatMul_Q4"
    assert len(set(groups.values())) == 6  # the six nodes of a layer
    # a node the file does not hold (an onnxruntime fusion): its own name, layerless
    assert prof.node_group("/model/layers.7/mlp/Fused_kernel_time", groups) == "/model/layers.*/mlp/Fused"


def test_a_node_without_a_layer_in_its_name_takes_its_weights():
    node = helper.make_node("MatMul", ["x", "model.layers.3.mlp.down_proj.weight"], ["y"], name="node_linear_7")
    init = helper.make_tensor("model.layers.3.mlp.down_proj.weight", onnx.TensorProto.FLOAT, [2, 2], [0.0] * 4)
    model = helper.make_model(helper.make_graph([node], "g", [], [], [init]))
    assert prof.node_groups(model) == {"node_linear_7": "model.layers.*.mlp.down_proj.weight"}
    assert prof.product_work(model) == {"node_linear_7": 4}


def test_each_product_scales_with_its_own_widths():
    head, ffn = 16, 48
    work = prof.product_work(genai_like(head, ffn))
    assert work["/model/layers.0/attn/qkv_proj/MatMul_Q4"] == (HEADS + 2 * KV_HEADS) * head * HIDDEN
    assert work["/model/layers.0/attn/GQA"] == HEADS * head  # the head size read off the packed projection
    assert work["/model/layers.1/mlp/down_proj/MatMul_Q4"] == ffn * HIDDEN
    assert "/model/layers.0/mlp/act" not in work  # not a product: keeps its time in own_cut


def test_the_ideal_is_each_products_time_over_its_own_cut():
    before, after = genai_like(16, 48), genai_like(8, 12)  # heads at half width, the FFN at a quarter
    work = [prof.product_work(before), prof.product_work(after)]
    times = {"/model/layers.0/mlp/gate_proj/MatMul_Q4": 40.0, "/model/layers.0/attn/GQA": 20.0,
             "/model/layers.0/mlp/act": 10.0, "/model/layers.0/SkipLayerNorm": 30.0}  # the last: not in the file
    scaled = 40.0 / 4 + 20.0 / 2 + 10.0 + 30.0
    assert prof.own_cut(times, *work) == pytest.approx(100.0 / scaled)
    cuts = prof.group_cuts([before, after], work)
    assert cuts["MatMulNBits /model/layers.*/mlp/down_proj/MatMul_Q4"] == pytest.approx(4.0)
    assert cuts["GroupQueryAttention /model/layers.*/attn/GQA"] == pytest.approx(2.0)
    # a product the prune removed counts as 0
    assert prof.own_cut({"/model/layers.0/attn/GQA": 10.0, "gone": 10.0}, {"/model/layers.0/attn/GQA": 2, "gone": 1},
                        {"/model/layers.0/attn/GQA": 1}) == pytest.approx(20.0 / 5.0)


def test_events_split_into_the_prefill_and_the_decode_steps():
    steps, repeats = 2, 1
    runs = [{"cat": "Session", "name": "model_run", "ts": 100 * r} for r in range(steps + 1)]
    events = runs + [{"cat": "Node", "name": f"/model/layers.{r}/attn/GQA_kernel_time", "ts": 100 * r + 10,
                      "dur": 5 + r, "args": {"op_name": "GroupQueryAttention"}} for r in range(steps + 1)]
    events.append({"cat": "Node", "name": "Gather__snp1_kernel_time", "ts": 110, "dur": 3, "args": {"op_name": "Gather"}})
    times = prof._by_op(events, steps, repeats)
    assert times.prefill == {"GroupQueryAttention": 5}
    assert times.decode == {"GroupQueryAttention": 6 + 7, "Gather": 3}
    assert times.added == {("decode", "Gather"): 3}
    grouped = prof._by_op(events, steps, repeats, {})
    assert grouped.decode["GroupQueryAttention /model/layers.*/attn/GQA"] == 6 + 7
