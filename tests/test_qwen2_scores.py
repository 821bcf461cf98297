"""Attention scores of a Qwen2-architecture decoder (grouped-query attention, rotary, q/k/v
biases), checked against an exact reference computed by transformers itself: pruning nothing
leaves the scores as they were, and removing one rotary Q/K pair changes every score of its
key/value group by exactly that pair's contribution, biases included."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from decoders import run, step_feed
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

HIDDEN, HEADS, KV_HEADS, VOCAB, TOKENS = 32, 4, 2, 100, 9
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    from decoder_export import export_dynamo

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      intermediate_size=64, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # the checkpoint's biases are far from zero; an initialised model's are zero
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 1.0)
    path = export_dynamo(model, tmp_path_factory.mktemp("qwen2") / "qwen2.onnx")
    return model, path


def reference_scores(model, ids: np.ndarray) -> np.ndarray:
    """Layer 0's pre-softmax scores q·kᵀ (unscaled), (batch, heads, N, N), by transformers' own
    modules: the projections with their biases, its rotary embedding, keys repeated per group."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

    captured = {}
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda _, args, kwargs: captured.update(kwargs, args=args),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor(ids))
        handle.remove()
        x = captured["hidden_states"] if "hidden_states" in captured else captured["args"][0]
        batch = x.shape[0]
        q = attention.q_proj(x).view(batch, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)
        k = attention.k_proj(x).view(batch, TOKENS, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *captured["position_embeddings"])
        k = repeat_kv(k, HEADS // KV_HEADS)
    return q.numpy().astype(np.float64), k.numpy().astype(np.float64)


def onnx_scores(model: onnx.ModelProto, ids: np.ndarray, softmax: str) -> np.ndarray:
    """Layer 0's scores as the ONNX model feeds them to its softmax (`softmax`: that node), softmax
    scale and causal mask included, (batch, heads, N, N); the masked entries are left out by the
    comparisons below."""
    node = next(n for n in model.graph.node if n.name == softmax)
    captured = onnx.ModelProto()
    captured.CopyFrom(model)
    captured.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
    return run(captured, step_feed(model, ids))[node.input[0]].astype(np.float64)


CAUSAL = np.tril(np.ones((TOKENS, TOKENS), bool))


def test_onnx_scores_equal_transformers_scores(qwen2):
    model, path = qwen2
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, TOKENS))
    q_ref, k_ref = reference_scores(model, ids)
    original = onnx.load(str(path))
    scores = onnx_scores(original, ids, find_blocks(ModelGraph(original)).attention[0].anchor)
    want = q_ref @ np.swapaxes(k_ref, -1, -2) / np.sqrt(HEAD_DIM)
    np.testing.assert_allclose(scores[..., CAUSAL], want[..., CAUSAL], atol=2e-4, rtol=1e-4)


def test_removing_one_rotary_pair_removes_exactly_its_contribution(qwen2):
    model, path = qwen2
    g = ModelGraph(onnx.load(str(path)))
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, TOKENS))
    calibration = step_feed(g.model, np.random.default_rng(4).integers(0, VOCAB, (4, TOKENS)))
    pairs = HEAD_DIM // 2
    # one rotary pair (two dims) of every key/value group, no rescale, V and FFN untouched
    plan = make_plan(g, find_blocks(g), Ratios(1 / pairs, 0.0, 0.0), "l2", calibration, batch=2)
    keep = plan.attention[0]
    assert keep.q_map is None and keep.k_map is None and keep.qk.shape == (KV_HEADS, HEAD_DIM - 2)
    q_ref, k_ref = reference_scores(model, ids)
    scores = onnx_scores(rewrite(g, plan), ids, keep.block.anchor)
    group = HEADS // KV_HEADS
    for head in range(HEADS):
        kept = keep.qk[head // group]
        removed = np.setdiff1d(np.arange(HEAD_DIM), kept)
        assert len(removed) == 2 and removed[1] - removed[0] == HEAD_DIM // 2  # one rotate_half pair
        # the softmax scale stays the original's: the kept scores are the scores as they were
        full = q_ref[:, head] @ np.swapaxes(k_ref[:, head], -1, -2) / np.sqrt(HEAD_DIM)
        contribution = q_ref[:, head][..., removed] @ np.swapaxes(k_ref[:, head][..., removed], -1, -2) / np.sqrt(HEAD_DIM)
        got = scores[:, head]
        np.testing.assert_allclose(got[..., CAUSAL], (full - contribution)[..., CAUSAL], atol=2e-4, rtol=1e-4)
        assert np.abs(contribution).max() > 1e-2  # the check can fail: the pair did contribute
