"""ModernBERT (a 2024 encoder: one Wqkv projection reshaped to (…, 3, H, d), a rotary embedding
written out, a GELU-gated MLP whose Wi holds gate | up, local and global attention layers),
exported by torch's legacy and dynamo exporters from a random-weight transformers model. The
legacy export casts q and k to float twice and takes Wi apart with bounds computed from its
width at run time (torch's `chunk`). Every attention and FFN is matched, and the pruned model
equals the original with the removed units zeroed."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exports import torch_or_skip
from onnxsnp import prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, unshare

pytestmark = pytest.mark.slow
LAYERS, HEADS, HIDDEN, INTERMEDIATE, VOCAB = 3, 4, 64, 96, 100


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory):
    torch = torch_or_skip()
    import transformers as T

    folder = tmp_path_factory.mktemp("modernbert")
    torch.manual_seed(0)
    config = T.ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
                                global_attn_every_n_layers=3, local_attention=8, pad_token_id=0)
    model = T.ModernBertModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(1, VOCAB, (2, 16))
    paths = {}
    for exporter in ("legacy", "dynamo"):
        paths[exporter] = folder / f"{exporter}.onnx"
        options = ({"dynamo": True, "dynamic_shapes": tuple({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
                                                            for _ in range(2))} if exporter == "dynamo" else
                   {"dynamo": False, "opset_version": 17,
                    "dynamic_axes": {name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask")}})
        with torch.no_grad():
            torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(paths[exporter]),
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], **options)
    return paths


def _feed(samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1, VOCAB, (samples, 16))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_modernbert_is_matched_and_pruned_exactly(modernbert, tmp_path, exporter, heads):
    g = ModelGraph(onnx.load(str(unshare(modernbert[exporter], tmp_path))))
    matches = find_blocks(g)
    assert (len(matches.attention), len(matches.ffn)) == (LAYERS, LAYERS), matches.skipped
    assert all(len(b.rotary) == 2 for b in matches.attention)
    assert all(f.gate is not None and f.gate.node == f.fc1.node and f.hidden == INTERMEDIATE for f in matches.ffn)
    plan = make_plan(g, matches, Ratios(0.5, 0.25, 0.5, heads=heads), "random", _feed(4), batch=2, seed=3)
    assert all(len(keep.hidden) == INTERMEDIATE // 2 for keep in plan.ffn)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    np.testing.assert_allclose(_run(pruned, _feed(2, 1)), _run(zeroed, _feed(2, 1)), atol=1e-5, rtol=1e-4)


def test_the_default_prune_of_modernbert_runs(modernbert):
    pruned, report = prune(str(modernbert["legacy"]), ratio=0.25, calib=_feed(24, 2), measure_latency=False)
    assert report.flops_after < report.flops_before and report.fidelity.output_cosine > 0.5
    assert _run(pruned, _feed(2, 3)).shape == (2, 16, HIDDEN)
