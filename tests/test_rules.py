"""The attention rules one by one, on small hand-built graphs (fast)."""
from __future__ import annotations

import numpy as np
import pytest

import forms
import graphs
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import Ratios
from onnxsnp.match import find_blocks
from onnxsnp.match.rules import ATTENTION_RULES
from onnxsnp.pipeline import make_plan
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.blocks import Candidate
from oracle import masked_original

FORMS = {name: (form.build, form.form) for name, form in forms.FORMS.items()  # the one registry (tests/forms.py)
         if form.family is forms.Family.ENCODER}


@pytest.mark.parametrize("form", FORMS)
def test_each_rule_finds_its_form(form):
    make, kind = FORMS[form]
    model = make()
    graphs.run(model, np.zeros((1, graphs.TOKENS, graphs.WIDTH), np.float32))  # a valid graph
    matches = find_blocks(ModelGraph(model))
    assert not [s for s in matches.skipped if s.kind is not Candidate.BLOCK]  # a lone attention is no whole block
    (block,) = matches.attention
    assert (block.form, block.heads, block.head_dim) == (kind, graphs.HEADS, graphs.HEAD_DIM) and block.form is kind
    assert block.out.in_features == graphs.WIDTH


def test_every_rule_is_registered_by_its_anchor():
    kinds = {(domain, op) for domain, op in ATTENTION_RULES.rules}
    assert {("", "Softmax"), ("", "Attention"), ("com.microsoft", "Attention"),
            ("com.microsoft", "MultiHeadAttention")} <= kinds


@pytest.mark.parametrize("op_type", ["PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"])
def test_unsupported_op_is_refused_by_name(op_type):
    matches = find_blocks(ModelGraph(graphs.contrib_attention(op_type)))
    assert not matches.attention
    (skipped,) = [s for s in matches.skipped if s.kind is Candidate.ATTENTION]
    assert op_type in skipped.reason and skipped.where.startswith(op_type)


def test_a_failed_match_says_why():
    model = graphs.softmax_attention()
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.input[0] = "x"  # the softmax no longer reads Q·Kᵀ
    matches = find_blocks(ModelGraph(model))
    assert [(s.where, s.reason) for s in matches.skipped if s.kind is not Candidate.BLOCK] == [(softmax.name, "no Q·Kᵀ MatMul before the softmax")]


@pytest.mark.parametrize("form", FORMS)
def test_each_form_prunes_like_zeroing(form):
    """Q/K and V of different widths, and half of the heads gone: equal to zeroing them."""
    model = FORMS[form][0]()
    g = ModelGraph(model)
    x = np.random.default_rng(0).standard_normal((4, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=0.5), "random", {"x": x}, batch=1, seed=3)
    (keep,) = plan.attention
    assert (len(keep.heads), keep.qk.shape[1], keep.v.shape[1]) == (1, 2, 3)
    pruned = rewrite(g, plan)
    for sample in x:
        np.testing.assert_allclose(graphs.run(pruned, sample[None]), graphs.run(masked_original(g, plan), sample[None]),
                                   atol=1e-5)


def test_fused_matmul_scale_is_put_in_standard_form():
    """FusedMatMul's alpha carries the scale: after Q/K pruning it holds 1/√d′ and q the rest."""
    g = ModelGraph(graphs.fused_matmul_scores())
    (block,) = find_blocks(g).attention
    assert [(s.attribute, s.constant) for s in block.constant_scales] == [("alpha", True)]
    x = np.random.default_rng(0).standard_normal((2, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.0, 0.0), "random", {"x": x}, batch=1, seed=3)
    pruned = rewrite(g, plan)
    (fused,) = [n for n in pruned.graph.node if n.op_type == "FusedMatMul"]
    alpha = next(a.f for a in fused.attribute if a.name == "alpha")
    assert alpha == pytest.approx((graphs.HEAD_DIM // 2) ** -0.5)


def test_per_channel_activation_quantization_is_refused_by_name():
    model = graphs.softmax_attention(qdq="channel")
    matches = find_blocks(ModelGraph(model))
    (skipped,) = [s for s in matches.skipped if s.kind is not Candidate.BLOCK]
    dequantize = next(n.name for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert not matches.attention and skipped.reason == f"DequantizeLinear node {dequantize} quantizes activations per channel"
