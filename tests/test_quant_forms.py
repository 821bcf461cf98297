"""`inspect` names the quantized form of onnxruntime's quantizers' outputs; a QOperator model
with an op its QDQ reading does not know is refused naming the node, with exit status 2 and no
traceback (tests/test_qoperator.py prunes the ones it knows)."""
from __future__ import annotations

import json

import pytest

from conftest import feed_for
from onnxsnp.cli import main
from onnxsnp.report.inspection import inspect_model
from onnxsnp.ir.quant_form import QuantForm
from onnxsnp.match import Placement

quantization = pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """Every form onnxruntime's quantizers write of the tiny BERT, by name."""
    from quantize import calibration_reader, quantize_dynamic_int8, quantize_static_qdq

    source = exported("bert", "eager", True)
    folder = tmp_path_factory.mktemp("forms")
    inputs = [feed_for(source, batch=2, seed=20 + i) for i in range(2)]
    paths = {"qdq-tensor": quantize_static_qdq(source, folder / "qdq_t.onnx", inputs, per_channel=False),
             "qdq-channel": quantize_static_qdq(source, folder / "qdq_c.onnx", inputs, per_channel=True),
             "qdq-matmul": quantize_static_qdq(source, folder / "qdq_m.onnx", inputs, False, ["MatMul"]),
             "dynamic-tensor": quantize_dynamic_int8(source, folder / "dyn_t.onnx", per_channel=False),
             "dynamic-channel": quantize_dynamic_int8(source, folder / "dyn_c.onnx", per_channel=True)}
    quantization.quantize_static(str(source), str(folder / "qop.onnx"), calibration_reader(inputs),
                                 quant_format=quantization.QuantFormat.QOperator)
    paths["qoperator"] = folder / "qop.onnx"
    return paths


@pytest.mark.parametrize("name,form,weights", [("qdq-tensor", "static_qdq", "per tensor"),
                                               ("qdq-channel", "static_qdq", "per channel"),
                                               ("dynamic-tensor", "dynamic", "per tensor"),
                                               ("dynamic-channel", "dynamic", "per channel")])
def test_inspect_names_the_form(quantized, capsys, name, form, weights):
    assert main(["inspect", str(quantized[name]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["quantized_form"], found["weights"], found["unsupported"]) == (form, weights, None)
    assert len(found["attention"]) == len(found["ffn"]) == 2
    assert main(["inspect", str(quantized[name])]) == 0
    assert f"quantized form: {QuantForm[form.upper()].value}, weights {weights}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qdq-tensor", "qdq-channel", "qdq-matmul", "dynamic-tensor"])
def test_whole_layers_are_matched_through_activation_pairs(quantized, name):
    """A static QDQ model rounds the stream into each layer (after every op with the defaults,
    only into the products with op_types_to_quantize=["MatMul"], where the residual Add reads the
    rounded norm output too): attention and FFN still pair into transformer blocks, so the
    block-by-block reconstruction runs as on the float model."""
    found = inspect_model(quantized[name])
    assert len(found.matches.layers) == 2 and [layer.norm for layer in found.matches.layers] == [Placement.POST] * 2
    assert found.reconstruction is None


def test_unknown_qoperator_reader_is_refused_by_node(quantized, capsys, tmp_path):
    """An op the QDQ reading cannot dequantize around (here an Abs on an integer activation, as
    a hand-edited or another tool's graph could have): refused before anything is pruned."""
    import onnx
    from onnx import helper

    model = onnx.load(str(quantized["qoperator"]))
    integer = next(n.output[0] for n in model.graph.node if n.op_type == "QLinearSoftmax")
    model.graph.node.append(helper.make_node("Abs", [integer], ["abs_of_integers"], name="odd/Abs"))
    model.graph.output.append(helper.make_tensor_value_info("abs_of_integers", onnx.TensorProto.INT8, None))
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path)]) == 2
    out = capsys.readouterr().out
    assert f"quantized form: {QuantForm.QOPERATOR.value}" in out
    assert "cannot prune this form: Abs node odd/Abs reads the integer tensor " in out
    assert main([str(path), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxsnp: error: Abs node odd/Abs reads the integer tensor ") and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out.onnx").exists()
