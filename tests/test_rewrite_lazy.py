"""The rewrite's weights not held twice (rewrite/lazy.py), the reconstruction's refits held in
their weights' dtypes: a weight read for its slice stays lazy, a large new weight goes to the
spill file as the editor makes it and reads back as made, and the refits held at the stored
width rewrite to the same bytes as refits held in float64; and a large prune fixes glibc's mmap
threshold (heap.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from conftest import feed_for
from onnxsnp.compensate.reconstruction import Reconstructor
from onnxsnp.io.loading import load_model
from onnxsnp.ir import external
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.plan import AttentionWidth, PrunePlan, Widths
from onnxsnp.rewrite.editor import Editor
from onnxsnp.rewrite.lazy import is_spilled
from onnxsnp.rewrite.rewriting import _read_lazily, rewrite

SIDE = 512  # a 512 × 512 float32 weight: 1 MiB, the spill's threshold (external.SPILL_MIN_BYTES)


def _lazy_matmul(tmp_path) -> tuple[ModelGraph, np.ndarray]:
    weight = np.random.default_rng(0).standard_normal((SIDE, SIDE)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1, SIDE])],
                              [helper.make_tensor_value_info("y", 1, [1, SIDE])],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "matmul.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="matmul.onnx.data",
                    size_threshold=1024)
    return ModelGraph(load_model(path, lazy=True).model), weight


def _editor(g: ModelGraph, spill: external.Spill | None = None) -> Editor:
    graph = gs.import_onnx(g.model)
    _read_lazily(graph)
    return Editor(g, graph, spill)


def test_a_weight_read_for_its_slice_is_not_kept_by_the_graph(tmp_path):
    g, weight = _lazy_matmul(tmp_path)
    editor = _editor(g)
    node = editor.graph.nodes[0]
    original = node.inputs[1]
    np.testing.assert_array_equal(editor.current(node, 1), weight)
    assert editor.shape(node, 1) == weight.shape
    assert is_spilled(original)  # still a stub of the input's file: decoded for the caller only
    editor.take(node, 1, np.arange(0, SIDE, 2), 1)
    np.testing.assert_array_equal(editor.current(node, 1), weight[:, ::2])
    assert is_spilled(original) and node.inputs[1] is not original


def test_a_large_new_weight_goes_to_the_spill_as_it_is_made(tmp_path):
    g, weight = _lazy_matmul(tmp_path)
    spill = external.Spill()
    try:
        editor = _editor(g, spill)
        node = editor.graph.nodes[0]
        editor.scale_along(node, 1, np.arange(3), np.full(3, 2.0), 1)  # the whole weight, rewritten
        written = node.inputs[1]
        assert is_spilled(written)
        assert spill.path.stat().st_size == weight.nbytes
        want = weight.copy()
        want[:, :3] *= np.float32(2.0)
        np.testing.assert_array_equal(editor.current(node, 1), want)
        assert is_spilled(written)  # read back, not kept
        small = editor.constant("small", np.ones(8, np.float32))
        assert not is_spilled(small) and spill.path.stat().st_size == weight.nbytes
        editor.take(node, 1, np.arange(SIDE // 2), 1)  # half the columns of the written weight: below the threshold
        assert not is_spilled(node.inputs[1])
        np.testing.assert_array_equal(editor.current(node, 1), want[:, :SIDE // 2])
    finally:
        spill.close()


def _reconstructed(g: ModelGraph, path) -> PrunePlan:
    matches = find_blocks(g)
    widths = Widths({b.name: AttentionWidth(b.groups, b.head_dim // 2, b.head_dim // 2) for b in matches.attention},
                    {b.name: b.hidden // 2 for b in matches.ffn})
    feed = feed_for(path, batch=4)
    reconstructor = Reconstructor(g, matches)
    result = reconstructor.run(reconstructor.prepare(feed, 2, "attention_mask" if "attention_mask" in feed else None),
                               widths)
    return PrunePlan(result.attention, result.ffn, result.scale_values, refits=result.refits)


def test_refits_are_held_in_their_weights_dtypes_and_rewrite_as_float64_ones(exported, monkeypatch):
    path = exported("bert", "eager", True, "legacy")  # biases on every projection
    g = ModelGraph(onnx.load(str(path)))
    plan = _reconstructed(g, path)
    linears = {linear.node: linear for layer in find_blocks(g).layers for linear in (layer.attention.out,
                                                                                    layer.ffn.fc2)}
    assert plan.refits and plan.refits.keys() <= linears.keys()
    for node, refit in plan.refits.items():
        linear = linears[node]
        assert refit.weight.dtype == g.constant(linear.weight).dtype == np.float32
        assert refit.bias is not None and refit.bias.dtype == g.constant(linear.bias).dtype
    monkeypatch.setattr(Reconstructor, "_as_stored", lambda self, refit, linear: refit)  # as they were held before
    wide = _reconstructed(g, path)
    assert all(refit.weight.dtype == np.float64 for refit in wide.refits.values())
    for node, refit in plan.refits.items():
        np.testing.assert_array_equal(refit.weight, wide.refits[node].weight.astype(np.float32))
    assert rewrite(g, plan).SerializeToString() == rewrite(g, wide).SerializeToString()


def test_a_large_prune_fixes_the_heaps_mmap_threshold_unless_the_user_set_one(monkeypatch):
    """pipeline._memory_releaser: above TRIM_ABOVE_BYTES, mallopt(M_MMAP_THRESHOLD, 128 KiB), so
    that glibc stops raising the threshold (heap.py); a smaller model, or a threshold the user
    set in the environment, leaves the allocator as it is."""
    from onnxsnp import heap, pipeline

    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))

        def malloc_trim(self, pad):
            pass

    monkeypatch.setattr(heap, "_libc", lambda: Libc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    pipeline._memory_releaser(pipeline.TRIM_ABOVE_BYTES)
    assert calls == []
    pipeline._memory_releaser(pipeline.TRIM_ABOVE_BYTES + 1)
    assert calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    pipeline._memory_releaser(pipeline.TRIM_ABOVE_BYTES + 1)
    assert len(calls) == 1
