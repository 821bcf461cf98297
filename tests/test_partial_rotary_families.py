"""Small decoders with a partial rotary embedding, exported with a KV cache by torch's dynamo
exporter (tools/decoder_export.py) and by optimum's `text-generation-with-past` (the legacy
exporter: rotate_half's split computed at run time; tools/optimum_export.py): StableLM 2 (a quarter of each head's dims rotated, grouped-query
attention, LayerNorm with bias) and Phi-2 (half of them rotated; attention and MLP in parallel on
one LayerNorm). Every attention is matched; the pruned model equals the original with the removed
units zeroed, in prefill and through its cache; ratio 0 changes nothing; the default flow prunes
them — StableLM block by block, Phi-2's parallel blocks, which the block-by-block refit does not
model, with the one-pass refit — and a cached decode step equals an uncached run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exports import cached_exports, export_optimum
from decoders import calibration, prefill_and_step, run, step_feed
from onnxsnp import prune
from onnxsnp.errors import SnpError
from onnxsnp.data.calibration import input_specs, validate_calibration
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import Candidate
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, through_the_cache, unshare

pytestmark = pytest.mark.slow
FAMILIES = ["stablelm-dynamo", "stablelm-optimum", "phi-dynamo", "phi-optimum"]
ROTATED = {"stablelm": 0.25, "phi": 0.5}  # partial_rotary_factor of both tools' tiny models
SEQUENTIAL = {form: form.startswith("stablelm") for form in FAMILIES}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    def make(folder, form: str):
        from decoder_export import export_dynamo, tiny_partial_rotary

        family, exporter = form.split("-")
        return export_optimum(folder / form, family, "optimum") if exporter == "optimum" else \
            export_dynamo(tiny_partial_rotary(family), folder / f"{form}.onnx")

    return cached_exports(tmp_path_factory.mktemp("partial_rotary"), make)


def _ids(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 100, (2, length))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_of_the_family_is_matched_with_its_partial_rotary(family_model, family):
    matches = find_blocks(ModelGraph(onnx.load(str(family_model(family)))))
    assert (len(matches.attention), len(matches.ffn)) == (2, 2), matches.skipped
    for block in matches.attention:
        assert [r.rotated for r in block.rotary] == [int(block.head_dim * ROTATED[family.split("-")[0]])] * 2
        assert len(block.kv_caches) == 2 and block.pairs_shared
    if SEQUENTIAL[family]:
        assert len(matches.layers) == 2 and not matches.skipped
    else:  # the parallel blocks are named, with the reason
        assert not matches.layers
        assert [s.kind for s in matches.skipped] == [Candidate.BLOCK] * 2
        assert all("a parallel block" in s.reason for s in matches.skipped)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_family_equals_masked_original_through_the_cache(family_model, tmp_path, family):
    path = unshare(family_model(family), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=0.5), "random", feed, batch=2, seed=3)
    for keep in plan.attention:  # half the Q/K dims, the same in every head
        assert keep.qk.shape[1] == keep.block.head_dim // 2 and (keep.qk == keep.qk[:1]).all()
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    got = through_the_cache(pruned, zeroed)
    keep = plan.attention[0]
    assert got["present.0.key"].shape == (2, len(keep.heads), 6, keep.qk.shape[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_identical_and_the_default_flow_prunes_and_decodes_through_its_cache(family_model, family):
    path = str(family_model(family))
    ids = _ids(2, 8)
    original = onnx.load(path)
    unchanged, report = prune(path, ratio=0.0, calib=calibration(100, 16, 8), measure_latency=False)
    assert report.params_after == report.params_before
    np.testing.assert_allclose(prefill_and_step(unchanged, ids[:, :7], ids[:, 7:])[1]["logits"],
                               prefill_and_step(original, ids[:, :7], ids[:, 7:])[1]["logits"], atol=1e-5)
    pruned, report = prune(path, ratio=0.5, heads=0.5, calib=calibration(100, 32, 12), measure_latency=False)
    assert (report.reconstruction is not None) == SEQUENTIAL[family]
    assert report.flops_after < 0.75 * report.flops_before
    _, step = prefill_and_step(pruned, ids[:, :7], ids[:, 7:])
    whole = run(pruned, step_feed(pruned, ids))
    np.testing.assert_allclose(step["logits"][:, -1], whole["logits"][:, -1], atol=1e-4, rtol=1e-3)


def test_whole_stablelm_blocks_go_with_blocks(family_model):
    pruned, report = prune(str(family_model("stablelm-dynamo")), ratio=0.25, blocks=1, calib=calibration(100, 32, 12),
                           measure_latency=False)
    assert len([n for n in pruned.graph.node if n.op_type == "Softmax"]) == 1
    ids = _ids(3, 6)
    _, step = prefill_and_step(pruned, ids[:, :5], ids[:, 5:])
    np.testing.assert_allclose(step["logits"][:, -1], run(pruned, step_feed(pruned, ids))["logits"][:, -1],
                               atol=1e-4, rtol=1e-3)


def test_blocks_on_phi_says_its_blocks_are_parallel(family_model):
    with pytest.raises(SnpError, match="a parallel block: attention and FFN .* both read"):
        prune(str(family_model("phi-dynamo")), ratio=0.25, blocks=1, calib=calibration(100, 8, 8), measure_latency=False)
