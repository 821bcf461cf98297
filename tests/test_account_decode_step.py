"""tools/account_decode_step.py: the node groups and the split of a decode step's excess over its
FLOPs cut (issue 28)."""
from __future__ import annotations

import pytest

import account_decode_step as tool


@pytest.mark.parametrize("op, group, expected", [
    ("MatMulNBits", "/model/layers.*/mlp/gate_proj/MatMul_Q4", "FFN products"),
    ("MatMulNBits", "/model/layers.*/attn/o_proj/MatMul_Q4", "qkv + o projections"),
    ("MatMulNBits", "/lm_head/MatMul_Q4", "lm_head"),
    ("GroupQueryAttention", "/model/layers.*/attn/GroupQueryAttention", "GroupQueryAttention"),
    ("MatMul", "node_linear_7", "other products (MatMul)"),
])
def test_groups(op, group, expected):
    assert tool.group_of(op, group) == expected


def test_the_excesses_sum_to_the_time_beyond_the_cut():
    cut = 1.6
    before = {"FFN products": 8.0, "lm_head": 2.0, "GroupQueryAttention": 2.0}
    after = {"FFN products": 8.0 / 3.2, "lm_head": 2.0, "GroupQueryAttention": 2.0 / cut, "added": 0.25}
    rows = tool.excess(before, after, cut)
    assert sum(r[3] for r in rows) == pytest.approx(sum(after.values()) - sum(before.values()) / cut)
    by = {r[0]: r[3] for r in rows}
    assert by["GroupQueryAttention"] == pytest.approx(0.0)  # shrank by the cut: no excess
    assert by["lm_head"] == pytest.approx(2.0 * (1 - 1 / cut))  # kept its time
    assert by["added"] == pytest.approx(0.25) and by["FFN products"] < 0  # cut deeper than the budget
    assert rows[0][0] == "lm_head"  # largest excess first


def test_the_op_mix_ideal_cuts_each_product_group_by_its_own_work():
    import collections
    before = {"FFN products": 6.0, "lm_head": 2.0, "run() outside the kernels": 2.0}
    work = [collections.Counter({"FFN products": 300, "lm_head": 100}),
            collections.Counter({"FFN products": 100, "lm_head": 100})]
    assert tool.op_mix_ideal(before, work) == pytest.approx(10.0 / (2.0 + 2.0 + 2.0))
