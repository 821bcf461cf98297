"""Decoders as onnxruntime's optimizers save them: the tiny Llama with a KV cache exported by torch's
dynamo exporter and by optimum (`text-generation-with-past`), each saved by an InferenceSession at
the basic, extended and all levels (SessionOptions.optimized_model_filepath: rotate_half's
Slices made one Split, the scores a FusedMatMul, SiLU a QuickGelu, RMSNorm a
SimplifiedLayerNormalization), and optimum's export through `optimum-cli onnxruntime optimize`
-O1 … -O3 (SkipSimplifiedLayerNormalization). Every block is found; the pruned model equals the
original with the removed units zeroed, in prefill and in a decode step through its own cache;
the pruned model's cached decode equals running the whole sequence at once; the default flow prunes."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

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
# family-exporter-optimizer: ort-<level> the session optimizer, O<n> optimum-cli's, tf onnxruntime's
# transformers optimizer (model_type "gpt2": its fusions for GPT-2-like decoders; tf0 at opt_level 0, where
# no session optimization runs first and its rotary fusion writes com.microsoft.RotaryEmbedding)
FORMS = ([f"{family}-{exporter}-ort-{level}" for family, exporter in (("llama", "dynamo"), ("llama", "optimum"),
                                                                      ("gpt2", "optimum")) for level in LEVELS]
         + [f"llama-optimum-O{level}" for level in (1, 2, 3)] + ["llama-optimum-tf", "llama-optimum-tf0", "gpt2-optimum-tf"])
# the last block of GPT-2 through the transformers optimizer: its join is a SkipLayerNormalization
# that writes no sum (the final LayerNorm fused with the last residual Add), so it stays
ONE_BLOCK_STAYS = {"gpt2-optimum-tf": "SkipLayerNorm_AddBias_1 adds to the stream and normalises in one op"}


def transformers_optimize(path: Path, out: Path, level: int | None) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(path), model_type="gpt2", num_heads=4, hidden_size=32, opt_level=level).save_model_to_file(str(out))
    return out


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The form's model, exported once per family and exporter and saved by the optimizer the form names."""
    folder = tmp_path_factory.mktemp("decoder-sessions")
    sources: dict[str, Path] = {}

    def get(form: str) -> Path:
        family, exporter, optimizer = form.split("-", 2)
        if optimizer.startswith("O"):
            return export_optimum(folder / form, family, f"optimum-{optimizer}")
        key = f"{family}-{exporter}"
        if key not in sources:
            if exporter == "dynamo":
                from decoder_export import export_dynamo, tiny_llama
                exported = export_dynamo(tiny_llama(), folder / "dynamo.onnx")
            else:
                exported = export_optimum(folder / key, family, "optimum")
            sources[key] = folder / f"{key}-whole.onnx"
            onnx.save(onnx.load(str(exported)), str(sources[key]))  # its weights read in: the copies below are whole
        path = folder / f"{form}.onnx"
        if not path.exists():
            if optimizer.startswith("tf"):
                return transformers_optimize(sources[key], path, int(optimizer[2:]) if optimizer[2:] else None)
            onnx.save(onnx.load(str(sources[key])), str(path))
            session_optimize(path, optimizer.rsplit("-", 1)[1])
        return path

    return get


def test_each_optimizer_leaves_its_fusions_in_the_saved_decoder(saved):
    """The forms are what they are named for: the ops each optimizer writes in place of the export's."""
    ops = {form: Counter(n.op_type for n in onnx.load(str(saved(form))).graph.node)
           for form in ("llama-dynamo-ort-extended", "gpt2-optimum-ort-basic", "llama-optimum-O2", "gpt2-optimum-tf",
                        "llama-optimum-tf0")}
    assert ops["llama-dynamo-ort-extended"]["FusedMatMul"] == 2 and ops["llama-dynamo-ort-extended"]["QuickGelu"] == 2
    assert ops["llama-dynamo-ort-extended"]["Split"] >= 4  # rotate_half's Slices: one Split each for q and k
    assert ops["gpt2-optimum-ort-basic"]["Gemm"] >= 4
    assert ops["llama-optimum-O2"]["SkipSimplifiedLayerNormalization"] == 4
    assert ops["gpt2-optimum-tf"]["SkipLayerNormalization"] == 4 and ops["gpt2-optimum-tf"]["FastGelu"] == 2
    assert ops["llama-optimum-tf0"]["RotaryEmbedding"] == 4  # q and k of each layer


@pytest.mark.parametrize("form", FORMS)
def test_every_block_of_a_saved_decoder_is_found(saved, form):
    matches = inspect_model(saved(form)).matches
    stays = ONE_BLOCK_STAYS.get(form)
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 1 if stays else 2), matches.skipped
    assert [stays in s.reason for s in matches.skipped] == ([True] if stays else []), matches.skipped
    llama = form.startswith("llama")
    for block in matches.attention:
        assert block.groups == (2 if llama else 4) and len(block.kv_caches) == 2
        assert len(block.rotary) == (2 if llama else 0)
        # RotaryEmbedding's caches hold one column per pair for all heads: each head keeps the same pairs
        assert [r.shared for r in block.rotary] == [form.endswith("tf0")] * len(block.rotary)
        assert (block.pairs_shared is not None) == form.endswith("tf0")
    assert all((ffn.gate is not None) == llama for ffn in matches.ffn)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_a_pruned_saved_decoder_equals_the_masked_original_and_decodes_as_it_prefills(saved, tmp_path, form, heads):
    path = unshare(saved(form), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=heads), "random", feed, batch=2, seed=3)
    keep = plan.attention[0]
    groups = keep.block.groups
    assert len(keep.heads) == (groups // 2 if heads else groups) and keep.qk.shape[1] < keep.block.head_dim
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


@pytest.mark.parametrize("form", ["llama-dynamo-ort-extended", "llama-optimum-ort-all", "llama-optimum-O3",
                                  "gpt2-optimum-ort-extended", "gpt2-optimum-tf", "llama-optimum-tf0"])
def test_the_default_flow_prunes_a_saved_decoder(saved, form, caplog):
    """Block by block, the default on a decoder; where the last block's join writes no sum the
    model cannot be cut into blocks, and the one-pass flow runs, saying why."""
    path = saved(form)
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    with caplog.at_level(logging.INFO, logger="onnxsnp"):
        pruned, report = prune(str(path), ratio=0.5, calib=calibration(100))
    if form in ONE_BLOCK_STAYS:
        assert report.reconstruction is None
        assert "one-pass compensation: the model cannot be cut into transformer blocks" in caplog.text
    else:
        assert report.reconstruction is not None
    assert not [s for s in report.skipped if s.kind is not Candidate.BLOCK], report.skipped
    assert report.flops_after < 0.75 * report.flops_before
    _, step = prefill_and_step(pruned, ids, ids[:, :1])  # runs with its own, narrower cache
    assert np.isfinite(step["logits"]).all()
    narrower = step_feed(pruned, ids)["past_key_values.0.key"].shape[3]
    assert narrower < step_feed(onnx.load(str(path)), ids)["past_key_values.0.key"].shape[3]
