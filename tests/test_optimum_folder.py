"""optimum's export of a Llama folder as transformers 5 saves it (decoder_export.export_optimum_folder,
the path of `tools/bench_real_decoders.py --model smollm2-optimum`): the rotary base survives the
config's rewrite into the older form (the export's logits are the torch model's), and every block
is matched."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from decoders import prefill_and_step
from exports import optimum_python
from onnxsnp.report.inspection import inspect_model

pytestmark = pytest.mark.slow


def test_a_transformers5_llama_folder_exports_through_optimum(tmp_path):
    import onnx

    from decoder_export import export_optimum_folder, save_folder, tiny_llama

    optimum_python()  # skips where the optimum venv cannot be made
    # a rotary base other than the default 10,000: a rewrite that dropped it would change the logits
    model = tiny_llama(vocab=300, hidden=128, layers=2)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    model = type(model)(model.config).eval()
    folder = save_folder(model, tmp_path / "folder")
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())  # the form being rewritten
    path = export_optimum_folder(folder, tmp_path / "optimum" / "onnx")
    assert (path.parent / "tokenizer.json").exists()
    exported = onnx.load(str(path))
    ids = np.random.default_rng(0).integers(0, 300, (2, 9))
    got, got_step = prefill_and_step(exported, ids[:, :8], ids[:, 8:])
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got["logits"], want[:, :8], atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"][:, -1], want[:, 8], atol=2e-4, rtol=1e-3)
    matches = inspect_model(path).matches
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2), matches.skipped
    assert all(len(block.rotary) == 2 and block.groups == 2 for block in matches.attention)
    assert all(ffn.gate is not None for ffn in matches.ffn)
