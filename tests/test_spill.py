"""Held-back outputs spilled to a temporary folder (onnxsnp.verify.spill): the same numbers as in
memory, and the folder gone once the outputs are dropped, also after an error."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from onnxsnp.verify import spill, verification
from onnxsnp.verify.spill import OnDisk, Outputs

SAMPLES, TOKENS, VOCABULARY, BATCH = 7, 6, 50, 3


def _logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(SAMPLES, TOKENS, VOCABULARY)).astype(np.float32)


def _gathered(arrays: list[np.ndarray], threshold: int, monkeypatch) -> Outputs:
    monkeypatch.setattr(spill, "SPILL_BYTES", threshold)
    outputs = Outputs(SAMPLES)
    for start in range(0, SAMPLES, BATCH):  # the last batch is shorter
        outputs.add([a[start:start + BATCH] for a in arrays])
    return outputs


def test_spilled_outputs_read_back_as_the_arrays_written(monkeypatch):
    logits, classes = _logits(0), _logits(1)[:, 0]
    spilled = _gathered([logits, classes], 0, monkeypatch).joined()
    assert all(isinstance(a, OnDisk) for a in spilled)
    kept = _gathered([logits, classes], 2**40, monkeypatch).joined()
    assert all(isinstance(a, np.ndarray) for a in kept)
    for array, disk, memory in zip((logits, classes), spilled, kept):
        np.testing.assert_array_equal(memory, array)
        assert (disk.shape, disk.dtype, disk.ndim, disk.size, len(disk)) == \
               (array.shape, array.dtype, array.ndim, array.size, len(array))
        for key in (2, slice(1, 5), slice(None), (3, slice(None, -1)), (slice(2, 4), 0)):
            np.testing.assert_array_equal(disk[key], array[key])


def test_fidelity_of_spilled_outputs_is_bit_for_bit_the_in_memory_fidelity(monkeypatch):
    original = [_logits(2), _logits(3)[:, 0]]
    pruned = [o + np.float32(0.3) * _logits(4)[:, :o.shape[1]].reshape(o.shape) if o.ndim == 3
              else o + np.float32(0.3) * _logits(5)[:, 0] for o in original]
    ids = np.random.default_rng(6).integers(0, VOCABULARY, (SAMPLES, TOKENS))
    feed = {"input_ids": ids}
    monkeypatch.setattr(verification, "_CHUNK_BYTES", 8 * TOKENS * VOCABULARY * 2)  # two samples at a time
    whole = verification.fidelity(original, pruned)
    language = verification.language_model_fidelity(["logits", "other"], original, pruned, feed, None)
    on_disk = [_gathered(original, 0, monkeypatch).joined(), _gathered(pruned, 0, monkeypatch).joined()]
    assert isinstance(on_disk[0][0], OnDisk)
    assert verification.fidelity(*on_disk) == whole
    assert verification.language_model_fidelity(["logits", "other"], *on_disk, feed, None) == language
    assert language["tokens"] == SAMPLES * (TOKENS - 1) and whole.samples == SAMPLES


def test_the_folder_goes_when_the_outputs_do(monkeypatch):
    spilled = _gathered([_logits(7)], 0, monkeypatch).joined()
    folder = spilled[0].path.parent
    assert folder.is_dir() and spilled[0].path.is_file()
    del spilled
    gc.collect()
    assert not folder.exists()


def test_the_folder_goes_after_an_error_while_writing(monkeypatch):
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    outputs = Outputs(SAMPLES)
    outputs.add([_logits(8)[:BATCH]])
    folder = outputs.spill.folder
    assert folder.is_dir()
    with pytest.raises(ValueError):  # a batch of another width cannot be written into the file
        outputs.add([np.zeros((BATCH, TOKENS, VOCABULARY + 1), np.float32)])
    assert not folder.exists()


@pytest.mark.slow
def test_a_decoder_pruned_with_its_held_back_logits_on_disk_is_the_one_pruned_in_memory(tmp_path, monkeypatch):
    import tempfile

    from decoder_export import export_dynamo, tiny_llama
    from decoders import calibration
    from onnxsnp import prune

    path = export_dynamo(tiny_llama(), tmp_path / "llama.onnx")
    calib = calibration(100, samples=40)
    in_memory, kept = prune(str(path), ratio=0.5, calib=calib, measure_latency=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the spill's folder goes
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    made = []
    monkeypatch.setattr(spill.Spill, "array", lambda self, *a, _f=spill.Spill.array: made.append(1) or _f(self, *a))
    on_disk, spilled = prune(str(path), ratio=0.5, calib=calib, measure_latency=False)
    assert made  # the held-back logits did go to disk (original and pruned model)
    assert on_disk.SerializeToString() == in_memory.SerializeToString()
    assert spilled.fidelity == kept.fidelity and spilled.fidelity.perplexity_before is not None
    del on_disk, spilled
    gc.collect()
    assert not any(scratch.iterdir())  # every spill folder removed
