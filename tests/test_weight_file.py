"""Sessions that read their weights from a temporary file (onnxsnp/data/weight_file.py): the same
outputs, bit for bit, as a session over arrays handed over in memory; the folder gone once the
session exists; and the memory it saves: a session that owns its weights frees each one it
pre-packs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsnp.data import calibration
from onnxsnp.verify.observation import _probe_run

ROOT = Path(__file__).resolve().parent.parent


def _chain(width: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """x → (MatMul, Add bias, Relu) × layers; one small weight too (stays in the graph), and a
    weight in typed float_data rather than raw_data (stays in the graph too)."""
    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / width ** 0.5,
                                             f"w{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        last = f"r{i}"
    inits.append(numpy_helper.from_array(np.full(4, 0.5, np.float32), "tiny"))
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [width], rng.standard_normal(width).tolist())
    inits.append(typed)
    nodes += [helper.make_node("Mul", [last, "typed"], ["scaled"]),
              helper.make_node("ReduceSum", ["scaled"], ["s"], keepdims=1),
              helper.make_node("Mul", ["s", "tiny"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_session_from_the_weight_file_gives_the_in_memory_sessions_outputs_bit_for_bit(tmp_path, monkeypatch):
    model = _chain(64, 3)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    in_memory = calibration.session(model, extra_outputs=["r1"], weights=lambda name: None)  # arrays decoded here
    expected = in_memory.run(None, {"x": x})
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(calibration, "FILE_SESSION_BYTES", 0)  # this small model takes the file route too
    assert calibration._file_worthy(model)
    from_file = calibration.session(model, extra_outputs=["r1"])
    got = from_file.run(None, {"x": x})
    assert [o.name for o in from_file.get_outputs()] == ["y", "r1"]
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.iterdir())  # the folder went as soon as the session was built
    before = model.SerializeToString()
    with calibration.weight_file(model) as written:  # one file for several sessions
        stubs = {t.name: t for t in written.stubs}
        # the MatMul weights (16 KiB) went to the file; the biases (256 B: under the 1 KiB a
        # tensor needs to be handed over apart), the tiny and the typed one stayed in the graph
        assert 64 * 4 < calibration._IN_MEMORY_MIN_BYTES <= 64 * 64 * 4
        assert {n for n, t in stubs.items() if t.data_location == onnx.TensorProto.EXTERNAL} == {"w0", "w1", "w2"}
        assert stubs["typed"].float_data and stubs["tiny"].HasField("raw_data")
        for outputs in (["r0"], []):
            light = calibration.without_initializers(model)
            calibration._add_outputs(light, outputs)
            again = written.session(light, calibration._session_options())
            np.testing.assert_array_equal(again.run(["y"], {"x": x})[0], expected[0])
    assert model.SerializeToString() == before  # the caller's model untouched
    assert not list(tmp_path.iterdir())


def test_the_verification_of_a_model_without_shared_weights_reads_them_from_a_file(monkeypatch):
    """_probe_run (the pruned model's verification) builds its sessions from one weight file."""
    model = _chain(64, 2)
    feed = {"x": np.random.default_rng(2).standard_normal((20, 64)).astype(np.float32)}
    _, expected, _ = _probe_run(model, "pruned model", ["r0"], feed, 4, None, weights=lambda name: None)
    made = []
    original = calibration.WeightFile.session

    def counted(self, light, options):
        made.append(self)
        return original(self, light, options)

    monkeypatch.setattr(calibration.WeightFile, "session", counted)
    monkeypatch.setattr(calibration, "FILE_SESSION_BYTES", 0)
    maps, outputs, _ = _probe_run(model, "pruned model", ["r0"], feed, 4, None)
    assert len(made) == 2 and made[0] is made[1]  # the probed samples' session and the rest's: one file
    assert maps["r0"].shape == (16, 64)  # the probes of the first MAP_SAMPLES samples
    np.testing.assert_array_equal(outputs[0], expected[0])


def test_a_prune_whose_sessions_read_their_weights_from_files_writes_the_same_model(monkeypatch):
    """The whole pipeline with every session over undecoded weights taking the file route (the
    threshold at 0: the shipped ViT is far below it): the same pruned bytes and the same fidelity;
    the input model observed from a file, after the matching's decoded weights were dropped."""
    import onnxsnp.pipeline as pipeline
    from onnxsnp.options import make_options

    model, calib = ROOT / "models" / "digits_vit.onnx", ROOT / "models" / "digits_vit_calib.npz"
    options = make_options(ratio=0.5, measure_latency=False)
    expected = pipeline.prune_model(str(model), options, calib=str(calib))
    events = []
    forget, observe, written = pipeline.ModelGraph.forget_constants, pipeline.observe, calibration.WeightFile.__init__

    def forgetting(self):
        events.append("forget")
        forget(self)

    def observing(*args, **kwargs):
        events.append("observe")
        return observe(*args, **kwargs)

    def writing(self, *args, **kwargs):
        events.append("file")
        written(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.ModelGraph, "forget_constants", forgetting)
    monkeypatch.setattr(pipeline, "observe", observing)
    monkeypatch.setattr(calibration.WeightFile, "__init__", writing)
    monkeypatch.setattr(calibration, "FILE_SESSION_BYTES", 0)
    got = pipeline.prune_model(str(model), options, calib=str(calib))
    assert got.model.SerializeToString() == expected.model.SerializeToString()
    assert got.report.fidelity == expected.report.fidelity
    first = events.index("observe")
    assert events[first - 1:first + 2] == ["forget", "observe", "file"]  # dropped, then read from a file
    assert events.count("file") >= 2  # the input model's observation and the pruned model's verification

