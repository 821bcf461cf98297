"""Removing neurons must equal zeroing them; shared weights and the softmax scale stay intact."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from dataclasses import replace

from conftest import feed_for, run
from exports import FORM_IDS, FORMS
from onnxsnp.compensate.masking import plan_weights, with_weights
from onnxsnp.plan import Ratios, Refit
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, plan_for, unshare


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_pruned_model_equals_masked_original(exported, tmp_path, family, attention, dynamic, exporter):
    path = unshare(exported(family, attention, dynamic, exporter), tmp_path)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5))
    pruned = rewrite(g, plan)
    feed = feed_for(path, batch=2)
    tolerance = 2e-2 if exporter.endswith("fp16") else 2e-5  # fp16 sums round differently
    for want, got in zip(run(masked_original(g, plan), feed), run(pruned, feed)):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)
    kinds = lambda m: sorted({t.data_type for t in m.graph.initializer if t.data_type in (1, 10)})  # noqa: E731
    assert kinds(pruned) == kinds(g.model)  # an fp16 model stays fp16


def test_shared_initializer_is_not_sliced_in_place(exported):
    path = exported("bert", "eager", False)
    model = onnx.load(str(path))
    shared = {n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    assert shared, "the legacy exporter should have routed shared weights through Identity"
    g, plan = plan_for(path, Ratios(0.5, 0.5, 0.5))
    pruned = rewrite(g, plan)
    before = {t.name: tuple(t.dims) for t in model.graph.initializer}
    after = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    for name in shared & after.keys():
        assert after[name] == before[name]
    assert model.SerializeToString() == onnx.load(str(path)).SerializeToString()  # g.model untouched


def test_sdpa_scale_is_frozen_to_the_original(exported):
    """torch's SDPA export computes the scale from q's width; after pruning Q/K it must stay
    1/sqrt(original d), so the manual and SDPA exports of the same weights prune identically."""
    outputs = []
    for attention in ("manual", "sdpa"):
        path = exported("vit", attention, True)
        g, plan = plan_for(path, Ratios(0.5, 0.0, 0.0), criterion="l2")
        pruned = rewrite(g, plan)
        ops = {n.op_type for n in pruned.graph.node}
        if attention == "sdpa":
            assert "Sqrt" not in ops  # the Shape→…→Sqrt chain was replaced by its constant value
        outputs.append(run(pruned, feed_for(path, batch=2))[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_head_pruning_equals_zeroed_heads(exported, tmp_path, family, attention, dynamic, exporter):
    """Removing whole heads (with neurons of the kept ones) equals zeroing their q, k and v."""
    path = unshare(exported(family, attention, dynamic, exporter), tmp_path)
    g, plan = plan_for(path, Ratios(0.25, 0.5, 0.0, heads=0.5))
    assert [len(k.heads) for k in plan.attention] == [2, 2], [k.block.heads_fixed for k in plan.attention]
    pruned = rewrite(g, plan)
    feed = feed_for(path, batch=3 if dynamic else 2, seq=5 if dynamic else 8)
    tolerance = 2e-2 if exporter.endswith("fp16") else 2e-5
    for want, got in zip(run(masked_original(g, plan), feed), run(pruned, feed)):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_masked_weights_compute_what_the_rewrite_does(exported, family, attention, dynamic, exporter):
    """masking.py (full-width weights, removed units zeroed through the same dependency groups)
    and the rewrite agree."""
    from onnxsnp.compensate.masking import plan_weights, with_weights

    path = exported(family, attention, dynamic, exporter)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5, heads=0.5))
    feed = feed_for(path, batch=2)
    tolerance = 2e-2 if exporter.endswith("fp16") else 2e-5
    for want, got in zip(run(with_weights(g.model, plan_weights(g, plan)), feed), run(rewrite(g, plan), feed)):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)


def with_maps_and_refits(plan, seed: int = 0):
    """The plan with random maps for every kept Q, K and V position and random refits of every
    output projection and fc2: what the projection compensation and the refits produce."""
    rng = np.random.default_rng(seed)
    keeps = []
    refits = {}
    for keep in plan.attention:
        d, heads = keep.block.head_dim, len(keep.heads)
        maps = {name: rng.standard_normal((heads, d, kept.shape[1])) / np.sqrt(d)
                for name, kept in (("q_map", keep.qk), ("k_map", keep.qk), ("v_map", keep.v))}
        keeps.append(replace(keep, **maps))
        out = keep.block.out
        refits[out.node] = Refit(rng.standard_normal((len(keep.v_columns()), out.out_features)) * 0.1,
                                 rng.standard_normal(out.out_features) * 0.1 if out.bias is not None else None)
    for keep in plan.ffn:
        fc2 = keep.block.fc2
        refits[fc2.node] = Refit(rng.standard_normal((len(keep.hidden), fc2.out_features)) * 0.05,
                                 rng.standard_normal(fc2.out_features) * 0.1 if fc2.bias is not None else None)
    return replace(plan, attention=tuple(keeps), refits=refits)


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_mapped_and_refitted_plan_rewrites_equal_to_its_masked_weights(exported, family, attention, dynamic,
                                                                       exporter):
    """Every form: mapped Q/K/V positions, removed heads and refitted layers, once by slicing
    (rewriting) and once as full-width weights with the removed units zeroed (masking)."""
    path = exported(family, attention, dynamic, exporter)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5, heads=0.5))
    plan = with_maps_and_refits(plan)
    feed = feed_for(path, batch=2)
    tolerance = 2e-2 if exporter.endswith("fp16") else 2e-5
    for want, got in zip(run(with_weights(g.model, plan_weights(g, plan)), feed), run(rewrite(g, plan), feed)):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)


def test_initializers_keep_the_original_order_and_new_ones_follow_in_theirs():
    from onnx import numpy_helper

    from onnxsnp.rewrite.rewriting import _keep_initializer_order

    def model(names):
        graph = onnx.GraphProto()
        graph.initializer.extend(numpy_helper.from_array(np.full(3, i, np.float32), n) for i, n in enumerate(names))
        return onnx.ModelProto(graph=graph)

    target = model(["c", "new_1", "a", "new_0", "b"])
    values = {t.name: numpy_helper.to_array(t).copy() for t in target.graph.initializer}
    _keep_initializer_order(model(["a", "b", "c"]), target)
    assert [t.name for t in target.graph.initializer] == ["a", "b", "c", "new_1", "new_0"]
    for tensor in target.graph.initializer:  # the messages moved whole
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), values[tensor.name])


def test_export_writes_the_bytes_graphsurgeons_export_writes():
    """rewriting._export (each weight copied once) against gs.export_onnx on a graph with weights
    loaded lazily, edited in numpy, added, and of other types (fp16, bf16 kept as stored, int64)."""
    import onnx_graphsurgeon as gs
    from onnx import helper, numpy_helper

    from onnxsnp.rewrite.rewriting import _export

    rng = np.random.default_rng(0)
    bf16 = helper.make_tensor("bf16", onnx.TensorProto.BFLOAT16, [2, 3], rng.integers(0, 2**15, 6).tolist())
    initializers = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.standard_normal(3).astype(np.float16), "h"),
                    numpy_helper.from_array(np.array([1, 3], np.int64), "shape"), bf16]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Cast", ["h"], ["h32"], to=1),
             helper.make_node("Add", ["y", "h32"], ["z"]), helper.make_node("Reshape", ["z", "shape"], ["r"]),
             helper.make_node("Cast", ["bf16"], ["b32"], to=1), helper.make_node("Identity", ["b32"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
                              [helper.make_tensor_value_info("r", 1, [1, 3]), helper.make_tensor_value_info("b", 1, None)],
                              initializers)
    model = helper.make_model(graph)

    def edited() -> gs.Graph:
        g = gs.import_onnx(model)
        tensors = g.tensors()
        tensors["w"].values = tensors["w"].values[:, :3] * 2  # edited: a numpy array now
        tensors["new"] = gs.Constant("new", rng.standard_normal(3).astype(np.float32))
        g.nodes.append(gs.Node("Cast", inputs=[tensors["new"]], outputs=[gs.Variable("n32", np.float32)],
                               attrs={"to": 1}))
        return g

    want = gs.export_onnx(edited(), do_type_check=False)
    rng = np.random.default_rng(0)
    rng.standard_normal((4, 3)), rng.standard_normal(3), rng.integers(0, 2**15, 6)  # the same draws again
    got = _export(edited())
    assert len(got.graph.initializer) == 5
    assert got.SerializeToString() == want.SerializeToString()
