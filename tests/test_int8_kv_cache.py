"""A static int8 decoder attention (onnxruntime's quantize_static, QDQ, every op) with a KV cache:
the cache Concat reads the past through an activation pair and writes the present through
another. The view pruning works on bypasses both, the present's under the output's name (so the
matcher sees the cache); putting the pairs back gives the input model; the past's pair is
rescaled as its present's; the cache outputs are known through the pairs."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import decoder_graphs as dg
from onnxsnp.data.activation_ranges import activation_view
from onnxsnp.data.kv_cache import cache_outputs
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

pytest.importorskip("onnxruntime.quantization")


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(float model, its static QDQ model): calibrated on prefills and decode steps through the
    float model's own cache (on empty caches only the past would get a scale of 1)."""
    from quantize import quantize_static_qdq

    folder = tmp_path_factory.mktemp("int8_cache")
    model = dg.decoder_attention(kv_heads=2, rotary="half")
    onnx.save(model, str(folder / "float.onnx"))
    feeds = []
    for seed in range(4):
        first = dg.feed(model, 6, seed=seed)
        out = _run(model, first)
        feeds += [first, dg.feed(model, 2, {"past_key": out["present_key"], "past_value": out["present_value"]},
                                 seed=seed + 10)]
    quantize_static_qdq(folder / "float.onnx", folder / "int8.onnx", feeds, per_channel=False)
    return model, onnx.load(str(folder / "int8.onnx"))


def test_the_cache_is_matched_through_its_pairs(quantized):
    _, model = quantized
    assert cache_outputs(model) == {"present_key", "present_value"}
    view = activation_view(model)
    assert view is not None and set(view.renamed) == {"present_key", "present_value"}
    producers = {o: n for n in view.model.graph.node for o in n.output}
    assert [producers[name].op_type for name in ("present_key", "present_value")] == ["Concat", "Concat"]
    assert set(view.past) == {"past_key", "past_value"}
    assert {view.past[name] for name in view.past} == set(view.renamed.values())
    matches = find_blocks(ModelGraph(view.model))
    assert len(matches.attention) == 1  # (no residual Add here: not removable as a whole block)
    assert len(matches.attention[0].kv_caches) == 2


def test_pairs_put_back_give_the_input_model(quantized):
    _, model = quantized
    view = activation_view(model)
    feed = dg.feed(model, 5, seed=3)
    restored = view.restore(model, view.model, feed, batch=1)
    kinds = ("QuantizeLinear", "DequantizeLinear")
    assert Counter(n.op_type for n in restored.graph.node if n.op_type in kinds) == \
        Counter(n.op_type for n in model.graph.node if n.op_type in kinds)
    onnx.checker.check_model(restored)
    for name, want in _run(model, feed).items():  # nothing moved: every scale kept bit for bit
        np.testing.assert_array_equal(_run(restored, feed)[name], want, err_msg=name)


def test_the_past_pair_follows_its_present(quantized):
    """Pruning that doubles the keys' range (here: the view's new keys doubled before the cache
    Concat) rescales the present key's pair and the past key's with it — the calibration feed has
    empty caches, and in decoding the past is the last step's present; the values' pairs stay."""
    from onnx import helper, numpy_helper

    _, model = quantized
    view = activation_view(model)
    changed = onnx.ModelProto()
    changed.CopyFrom(view.model)
    concat = next(n for n in changed.graph.node if n.output[0] == "present_key")
    changed.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    changed.graph.node.append(helper.make_node("Mul", [concat.input[1], "two"], ["keys_doubled"], name="double"))
    concat.input[1] = "keys_doubled"
    changed.graph.node.sort(key=lambda n: n.name != "double")  # before its reader
    changed = onnx.ModelProto.FromString(changed.SerializeToString())
    feed = dg.feed(model, 6, seed=3)
    restored = view.restore(model, changed, feed, batch=1)

    def scales(m: onnx.ModelProto) -> dict[str, float]:
        values = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return {n.input[0]: float(values[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}

    before, after = scales(model), scales(restored)
    present_key, present_value = view.renamed["present_key"], view.renamed["present_value"]
    growth = after[present_key] / before[present_key]
    assert 1.5 < growth <= 2.0 + 1e-6  # the range's larger end doubled (its zero point kept)
    assert after["past_key"] / before["past_key"] == pytest.approx(growth, rel=0.25)
    assert after["past_value"] == before["past_value"] and after[present_value] == before[present_value]
