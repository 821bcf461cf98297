"""The scoring criteria (criteria.py) on a small hand-built grouped-query attention: each returns
scores of the unit's shape, scores by what it says it reads, and an unknown name is refused."""
from __future__ import annotations

import numpy as np
import pytest

import decoder_graphs as dg
from onnxsnp.score.criteria import CRITERIA, CriterionName, criterion, input_weights, output_weights
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

KV_HEADS = 2


@pytest.fixture(scope="module")
def block():
    g = ModelGraph(dg.decoder_attention(kv_heads=KV_HEADS))
    return g, find_blocks(g).attention[0]


class Pairs:
    """Stand-in pair statistics: SNP's mean scores are whatever the statistics hold."""

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def mean_scores(self) -> np.ndarray:
        return self.scores


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_scores_every_unit_in_its_shape(block, name):
    g, b = block
    rng = np.random.default_rng(0)
    pairs = Pairs(np.arange(b.heads * b.head_dim, dtype=float).reshape(b.heads, b.head_dim))
    activations = lambda: np.ones(b.heads * b.head_dim)  # noqa: E731
    chosen = criterion(name)
    assert chosen.name is CriterionName(name)
    assert chosen.pair_scores(g, b, pairs, rng).shape == (b.heads, b.head_dim)
    assert chosen.value_scores(g, b, activations, rng).shape == (b.groups, b.head_dim)
    assert chosen.head_scores(g, b, activations, rng).shape == (b.groups,)
    assert chosen.channel_scores(5, lambda: np.zeros(5), rng).shape == (5,)


def test_l2_scores_a_pair_by_its_query_and_key_weight_norms(block):
    g, b = block
    d, (q_off, k_off, _) = b.head_dim, b.column_offsets
    q = np.linalg.norm(output_weights(g, b.q, q_off, b.heads * d), axis=0).reshape(b.heads, d)
    k = np.linalg.norm(output_weights(g, b.k, k_off, b.groups * d), axis=0).reshape(b.groups, d)
    scores = criterion("l2").pair_scores(g, b, None, np.random.default_rng(0))
    for head in range(b.heads):  # a query head reads its group's key
        np.testing.assert_allclose(scores[head], q[head] * k[head // b.group_size])


def test_snp_weighs_a_value_neuron_by_its_activation_and_outgoing_weights(block):
    g, b = block
    activation = np.arange(1, b.heads * b.head_dim + 1, dtype=float)
    outgoing = np.linalg.norm(input_weights(g, b.out), axis=1)
    scores = criterion("snp").value_scores(g, b, lambda: activation, np.random.default_rng(0))
    per_query_head = (activation * outgoing).reshape(b.heads, b.head_dim)
    # a key/value neuron feeds every query head of its group: their contributions add
    want = per_query_head.reshape(b.groups, b.group_size, b.head_dim).sum(axis=1)
    np.testing.assert_allclose(scores, want)


def test_only_criteria_that_read_activations_ask_for_them(block):
    g, b = block

    def never():
        raise AssertionError("a weight-only criterion read activations")

    for name in ("l2", "random", "snp-paper"):
        criterion(name).value_scores(g, b, never, np.random.default_rng(0))
    assert {c for c in CRITERIA if criterion(c).measures_hidden} == {"snp"}


def test_random_scores_follow_the_seed(block):
    g, b = block
    first = criterion("random").pair_scores(g, b, None, np.random.default_rng(7))
    again = criterion("random").pair_scores(g, b, None, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)


def test_an_unknown_criterion_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="snp, snp-paper, l2, random"):
        criterion("l1")
