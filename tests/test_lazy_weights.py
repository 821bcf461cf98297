"""A float model's external weights left in their file until read (onnxsnp/ir/external.py,
io/loading.py's `lazy`): the stubs decode to the same arrays and sizes, the protobuf holds no
weight bytes, a short data file fails at load, and a prune from the path gives the same pruned
model, byte for byte, as a prune of the model loaded whole."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxsnp.errors import SnpError
from onnxsnp.io.loading import load_model, weight_bytes
from onnxsnp.ir import external
from onnxsnp.ir.sizes import raw_bytes
from onnxsnp.pipeline import make_options, prune_model
from test_weight_file import _chain


def _saved(tmp_path, model: onnx.ModelProto):
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def test_lazy_stubs_decode_to_the_loaded_arrays_and_sizes(tmp_path):
    model = _chain(64, 3)
    path = _saved(tmp_path, model)
    whole, lazy = load_model(path).model, load_model(path, lazy=True).model
    stubs = [t for t in lazy.graph.initializer if external.is_lazy(t)]
    assert len(stubs) == 3  # the three 64 × 64 weights; the biases and small tensors stay inline
    assert not any(t.HasField("raw_data") for t in stubs)
    assert weight_bytes(lazy) == weight_bytes(whole)
    for stub, full in zip(lazy.graph.initializer, whole.graph.initializer):
        assert raw_bytes(stub) == raw_bytes(full)
        np.testing.assert_array_equal(external.to_array(stub), numpy_helper.to_array(full))
        assert external.inline(stub).SerializeToString() == full.SerializeToString()
    assert len(lazy.SerializeToString()) < weight_bytes(whole) / 10  # paths and dims, no weights
    external.materialize(lazy)
    assert lazy.SerializeToString() == whole.SerializeToString()


def test_a_short_data_file_fails_at_load(tmp_path):
    path = _saved(tmp_path, _chain(64, 3))
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(SnpError, match="external data"):
        load_model(path, lazy=True)


@pytest.mark.parametrize("spill_above", [external.SPILL_MIN_BYTES, 0])
def test_pruning_from_the_path_gives_the_whole_models_pruned_bytes(exported, tmp_path, monkeypatch, spill_above):
    """`spill_above` 0: every pruned weight goes through the rewrite's file (external.Spill)."""
    monkeypatch.setattr(external, "SPILL_MIN_BYTES", spill_above)
    spilled = []
    monkeypatch.setattr(external.Spill, "put", _counting(external.Spill.put, spilled))
    source = exported("vit", "manual", True, "dynamo")
    assert (source.parent / f"{source.name}.data").exists()
    assert external.has_lazy(load_model(source, lazy=True).model)
    options = make_options(0.5, calib_samples=8, progress=False)
    from_path = prune_model(source, options).model
    from_whole = prune_model(load_model(source).model, options).model
    assert not external.has_lazy(from_path)
    assert from_path.SerializeToString() == from_whole.SerializeToString()
    assert spilled  # the path's prune went through the spill, the whole model's did not
    if spill_above == 0:
        assert sum(external.is_lazy(stub) for stub in spilled) > len(spilled) // 2


def _counting(put, stubs: list):
    def counted(self, tensor):
        stub = put(self, tensor)
        stubs.append(stub)
        return stub
    return counted


@pytest.mark.slow  # torch exports the decoder
def test_a_decoder_with_a_flops_target_prunes_to_the_same_bytes_from_its_path(tmp_path):
    """The survey reads weights the rewrite then exports from their decoded arrays (rotary tables,
    norms): exported with the data location a whole load gives them (prune_identity's
    llama-target-flops case)."""
    from decoder_export import export_dynamo, tiny_llama
    from decoders import calibration

    path = tmp_path / "llama.onnx"
    export_dynamo(tiny_llama(), path)
    assert external.has_lazy(load_model(path, lazy=True).model)
    options = make_options(target_flops=0.7, progress=False)
    calib = calibration(100)
    from_path = prune_model(path, options, calib=calib).model
    from_whole = prune_model(load_model(path).model, options, calib=calib).model
    assert from_path.SerializeToString() == from_whole.SerializeToString()
