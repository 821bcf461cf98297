"""The attention rules one by one, on small hand-built graphs (fast)."""
from __future__ import annotations

import numpy as np
import pytest

import graphs
from onnxsnp.graph import ModelGraph
from onnxsnp.matching import find_blocks
from onnxsnp.matching.rules import ATTENTION_RULES

FORMS = {"softmax": (graphs.softmax_attention, "separate"), "onnx-attention": (graphs.onnx_attention, "separate"),
         "ort-attention": (graphs.ort_attention, "ort-attention"), "ort-mha": (graphs.ort_multi_head_attention, "ort-mha")}


@pytest.mark.parametrize("form", FORMS)
def test_each_rule_finds_its_form(form):
    make, kind = FORMS[form]
    model = make()
    graphs.run(model, np.zeros((1, graphs.TOKENS, graphs.WIDTH), np.float32))  # a valid graph
    matches = find_blocks(ModelGraph(model))
    assert not matches.skipped
    (block,) = matches.attention
    assert (block.form, block.heads, block.head_dim) == (kind, graphs.HEADS, graphs.HEAD_DIM)
    assert block.out.in_features == graphs.WIDTH


def test_every_rule_is_registered_by_its_anchor():
    kinds = {(domain, op) for domain, op in ATTENTION_RULES.rules}
    assert {("", "Softmax"), ("", "Attention"), ("com.microsoft", "Attention"),
            ("com.microsoft", "MultiHeadAttention")} <= kinds


def test_unsupported_op_is_refused_by_name():
    matches = find_blocks(ModelGraph(graphs.group_query_attention()))
    assert not matches.attention
    (skipped,) = [s for s in matches.skipped if s.kind == "attention"]
    assert "GroupQueryAttention" in skipped.reason and skipped.where.startswith("GroupQueryAttention")


def test_a_failed_match_says_why():
    model = graphs.softmax_attention()
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.input[0] = "x"  # the softmax no longer reads Q·Kᵀ
    matches = find_blocks(ModelGraph(model))
    assert [(s.where, s.reason) for s in matches.skipped] == [(softmax.name, "no Q·Kᵀ MatMul before the softmax")]
