"""Decoders as onnxruntime's optimizers save them: the tiny Llama with a KV cache exported by torch's
dynamo exporter and by optimum (`text-generation-with-past`), each saved by an InferenceSession at
the basic, extended and all levels (SessionOptions.optimized_model_filepath: rotate_half's
Slices made one Split, the scores a FusedMatMul, SiLU a QuickGelu, RMSNorm a
SimplifiedLayerNormalization), and optimum's export through `optimum-cli onnxruntime optimize`
-O1 … -O3 (SkipSimplifiedLayerNormalization). Every block is found; the pruned model equals the
original with the removed units zeroed, in prefill and in a decode step through its own cache;
the pruned model's cached decode equals running the whole sequence at once; the default flow prunes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from decoders import calibration, prefill_and_step, step_feed
from exports import export_optimum, session_optimize
from onnxsnp import prune
from onnxsnp.data.calibration import input_specs, validate_calibration
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import Candidate
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.report.inspection import inspect_model
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, unshare

pytestmark = pytest.mark.slow
LEVELS = ("basic", "extended", "all")
FORMS = ([f"llama-dynamo-ort-{level}" for level in LEVELS] + [f"llama-optimum-ort-{level}" for level in LEVELS]
         + [f"llama-optimum-O{level}" for level in (1, 2, 3)])


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The form's model, exported once per exporter and saved by the optimizer the form names."""
    folder = tmp_path_factory.mktemp("decoder-sessions")
    sources: dict[str, onnx.ModelProto] = {}

    def get(form: str):
        _, exporter, optimizer = form.split("-", 2)
        if optimizer.startswith("O"):
            return export_optimum(folder / form, "llama", f"optimum-{optimizer}")
        if exporter not in sources:
            if exporter == "dynamo":
                from decoder_export import export_dynamo, tiny_llama
                path = export_dynamo(tiny_llama(), folder / "dynamo.onnx")
            else:
                path = export_optimum(folder / "optimum", "llama", "optimum")
            sources[exporter] = onnx.load(str(path))  # its weights read in: the copies below are whole
        path = folder / f"{form}.onnx"
        if not path.exists():
            onnx.save(sources[exporter], str(path))
            session_optimize(path, optimizer.rsplit("-", 1)[1])
        return path

    return get


@pytest.mark.parametrize("form", FORMS)
def test_every_block_of_a_saved_decoder_is_found(saved, form):
    matches = inspect_model(saved(form)).matches
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2), matches.skipped
    for block in matches.attention:
        assert block.groups == 2 and len(block.kv_caches) == 2 and len(block.rotary) == 2
    assert all(ffn.gate is not None for ffn in matches.ffn)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_a_pruned_saved_decoder_equals_the_masked_original_and_decodes_as_it_prefills(saved, tmp_path, form, heads):
    path = unshare(saved(form), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=heads), "random", feed, batch=2, seed=3)
    keep = plan.attention[0]
    assert len(keep.heads) == (1 if heads else 2) and keep.qk.shape[1] < keep.block.head_dim
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    rng = np.random.default_rng(0)
    ids, next_ids = rng.integers(0, 100, (2, 6)), rng.integers(0, 100, (2, 1))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids, next_ids), prefill_and_step(pruned, ids, next_ids)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=2e-5, rtol=1e-3)
    assert got["present.0.key"].shape == (2, len(keep.heads), 6, keep.qk.shape[1])
    # the step through the pruned cache equals the pruned model on the whole sequence at once
    whole, _ = prefill_and_step(pruned, np.concatenate([ids, next_ids], axis=1), next_ids)
    np.testing.assert_allclose(got_step["logits"][:, -1], whole["logits"][:, -1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("form", ["llama-dynamo-ort-extended", "llama-optimum-ort-all", "llama-optimum-O3"])
def test_the_default_flow_prunes_a_saved_decoder(saved, form):
    path = saved(form)
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    pruned, report = prune(str(path), ratio=0.5, calib=calibration(100))
    assert report.reconstruction is not None  # the default: block by block, on the decoder
    assert not [s for s in report.skipped if s.kind is not Candidate.BLOCK], report.skipped
    assert report.flops_after < 0.75 * report.flops_before
    _, step = prefill_and_step(pruned, ids, ids[:, :1])  # runs with its own, narrower cache
    assert np.isfinite(step["logits"]).all()
    narrower = step_feed(pruned, ids)["past_key_values.0.key"].shape[3]
    assert narrower < step_feed(onnx.load(str(path)), ids)["past_key_values.0.key"].shape[3]
