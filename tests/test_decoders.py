"""Decoder language models exported at test time from local folders with random weights: optimum
`text-generation-with-past` of a Llama-architecture model (grouped-query attention, rotary,
SwiGLU, RMSNorm) and of GPT-2 (fused c_attn, learned positions), and torch's dynamo exporter of
the Llama model with a KV cache. Ratio 0 is identical; a pruned prefill and a decode step through
the pruned cache equal the original with the removed units zeroed; the default flow (block by
block reconstruction) prunes them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import export_optimum
from decoders import calibration, prefill_and_step, step_feed
from onnxsnp import prune
from onnxsnp.calibration import input_specs, validate_calibration
from onnxsnp.graph import ModelGraph
from onnxsnp.matching import find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewriting import rewrite
from oracle import unshare, zeroed_original

pytestmark = pytest.mark.slow
FORMS = ["llama-optimum", "gpt2-optimum", "llama-dynamo"]
GROUPS = {"llama-optimum": 2, "gpt2-optimum": 4, "llama-dynamo": 2}  # key/value heads per layer


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    cache: dict[str, object] = {}

    def get(form: str):
        if form not in cache:
            family, exporter = form.split("-")
            if exporter == "optimum":
                cache[form] = export_optimum(folder / form, family, "optimum")
            else:
                from decoder_export import export_dynamo, tiny_llama

                cache[form] = export_dynamo(tiny_llama(), folder / f"{form}.onnx")
        return cache[form]

    return get


@pytest.mark.parametrize("form", FORMS)
def test_decoder_blocks_are_found(decoder, form):
    matches = find_blocks(ModelGraph(onnx.load(str(decoder(form)))))
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2), matches.skipped
    for block in matches.attention:
        assert block.groups == GROUPS[form] and len(block.kv_caches) == 2
        assert len(block.rotary) == (0 if form.startswith("gpt2") else 2)
    assert all((ffn.gate is not None) == form.startswith("llama") for ffn in matches.ffn)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_pruned_decoder_equals_zeroed_original_through_the_cache(decoder, tmp_path, form, heads):
    path = unshare(decoder(form), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")  # caches empty, positions 0…
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=heads), "random", feed, batch=2, seed=3)
    pruned, zeroed = rewrite(g, plan), zeroed_original(g, plan)
    rng = np.random.default_rng(0)
    ids, next_ids = rng.integers(0, 100, (2, 6)), rng.integers(0, 100, (2, 1))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids, next_ids), prefill_and_step(pruned, ids, next_ids)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=2e-5, rtol=1e-3)
    keep = plan.attention[0]
    assert got["present.0.key"].shape == (2, len(keep.heads), 6, keep.qk.shape[1])
    assert got["present.0.value"].shape == (2, len(keep.heads), 6, keep.v.shape[1])


@pytest.mark.parametrize("form", FORMS)
def test_ratio_zero_is_identical_and_half_prunes(decoder, form):
    path = decoder(form)
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    original = onnx.load(str(path))
    unchanged, report = prune(str(path), ratio=0.0, calib=calibration(100))
    np.testing.assert_allclose(prefill_and_step(unchanged, ids, ids[:, :1])[1]["logits"],
                               prefill_and_step(original, ids, ids[:, :1])[1]["logits"], atol=1e-5)
    assert report.params_after == report.params_before
    pruned, report = prune(str(path), ratio=0.5, calib=calibration(100))
    assert report.reconstruction is not None  # the default: block by block, on the decoder
    assert report.flops_after < 0.75 * report.flops_before
    assert report.fidelity.output_cosine > 0.5
    prefill_and_step(pruned, ids, ids[:, :1])  # runs with its own, narrower cache
    assert step_feed(pruned, ids)["past_key_values.0.key"].shape[3] < step_feed(original, ids)["past_key_values.0.key"].shape[3]
