"""The latency allocation's loss bound (allocation.py): an attention move that looks cheap per
millisecond but loses more per FLOP than the FFN neurons at the margin is refused; and the FFN-only
allocation the timed search uses once the attention is fixed (`fixed`)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnxsnp.match.blocks import KvCache, Part
from onnxsnp.plan import AttentionWidth, Widths
from onnxsnp.score.allocation import DECODER_GROUPS_ALLOCATED, LOSS_BOUND, allocate, unit_costs
from onnxsnp.score.sensitivity import Curve, LayerSensitivity

FFN_STEEP = 1.0  # an FFN's loss with every neuron gone (linear in the neurons removed)
MS_PER_FLOP = 20.0  # how much more an attention unit weighs in the fake latency units than in FLOPs


@pytest.fixture(scope="module")
def digits(digits_costs):
    _, matches, costs = digits_costs
    return matches, unit_costs(costs, matches, "flops"), costs.macs_total * 2


def _linear(width: int, steep: float) -> Curve:
    kept = np.arange(1, width + 1, dtype=float)
    return Curve(kept, steep * (width - kept) / width)


def _curves(matches, flops, attention_per_flop: float) -> list[LayerSensitivity]:
    """Linear curves: every FFN loses FFN_STEEP over its neurons, so its loss per FLOP is the same
    at every width; attention (a head, or a per-head width step of Q/K and V together) loses
    `attention_per_flop` × that per FLOP it saves."""
    result = []
    for layer, u in zip(matches.layers, flops):
        block, hidden = layer.attention, layer.ffn.hidden
        ffn_per_flop = FFN_STEEP / (hidden * u.ffn)
        d, heads = block.head_dim, block.groups
        # one head fewer: loss heads_steep / heads for d·(qk + v) + head FLOPs
        heads_steep = attention_per_flop * ffn_per_flop * heads * (d * (u.qk + u.v) + u.head)
        # a step of s dims in Q/K and V: loss 2·s·width_steep / d for heads·s·(qk + v) FLOPs
        width_steep = attention_per_flop * ffn_per_flop * heads * d * (u.qk + u.v) / 2
        result.append(LayerSensitivity(layer.name, _linear(d, width_steep), _linear(d, width_steep),
                                       _linear(heads, heads_steep), _linear(hidden, FFN_STEEP), 1e6))
    return result


def _milliseconds(flops):
    """Fake latency units: attention MS_PER_FLOP times heavier than its FLOPs, the FFN as its FLOPs
    (a decode step's attention reads the KV cache: time its FLOPs do not count)."""
    return [replace(u, qk=MS_PER_FLOP * u.qk, v=MS_PER_FLOP * u.v, head=MS_PER_FLOP * u.head) for u in flops]


def _attention_whole(matches, widths) -> bool:
    return all(widths.attention[b.name] == AttentionWidth(b.groups, b.head_dim, b.head_dim) for b in matches.attention)


@pytest.mark.parametrize("one_head_size", [False, True])
def test_an_attention_cut_losing_more_per_flop_than_the_ffn_is_refused(digits, one_head_size):
    matches, flops, total_flops = digits
    ms = _milliseconds(flops)
    total = total_flops + sum(b.groups * b.head_dim * (u.qk + u.v) + b.groups * u.head
                              for b, u in zip(matches.attention, flops)) * (MS_PER_FLOP - 1)
    curves = _curves(matches, flops, attention_per_flop=3 * LOSS_BOUND)
    goal = total - 0.5 * sum(l.ffn.hidden * u.ffn for l, u in zip(matches.layers, ms))  # half the FFNs' cost
    free, _ = allocate(curves, matches, ms, total, goal, one_head_size=one_head_size)
    # per millisecond attention loses 3 / MS_PER_FLOP of the FFN's: the allocation alone takes it
    assert not _attention_whole(matches, free)
    bounded, _ = allocate(curves, matches, ms, total, goal, one_head_size=one_head_size, flops=flops)
    assert _attention_whole(matches, bounded)  # per FLOP it loses 3x the FFN's: refused
    removed = sum((l.ffn.hidden - bounded.ffn[l.ffn.name]) * u.ffn for l, u in zip(matches.layers, ms))
    assert total - removed <= goal  # the budget met by the FFNs alone


def test_an_attention_cut_losing_less_per_flop_than_the_ffn_is_taken(digits):
    matches, flops, total_flops = digits
    ms = _milliseconds(flops)
    total = total_flops + sum(b.groups * b.head_dim * (u.qk + u.v) + b.groups * u.head
                              for b, u in zip(matches.attention, flops)) * (MS_PER_FLOP - 1)
    curves = _curves(matches, flops, attention_per_flop=0.5 * LOSS_BOUND)
    goal = total - 0.5 * sum(l.ffn.hidden * u.ffn for l, u in zip(matches.layers, ms))
    free, _ = allocate(curves, matches, ms, total, goal, one_head_size=True)
    bounded, _ = allocate(curves, matches, ms, total, goal, one_head_size=True, flops=flops)
    assert not _attention_whole(matches, bounded) and bounded == free


def test_fixed_attention_moves_only_the_ffn(digits):
    """The timed search's allocation: the attention widths and removed blocks given, the budget
    met by FFN neurons alone, with the same greedy order the free allocation uses for them."""
    matches, flops, total = digits
    curves = _curves(matches, flops, attention_per_flop=0.5)
    layers = matches.layers
    # a removed block's attention is written with all its heads (as allocate writes it)
    fixed = Widths({b.name: AttentionWidth(b.groups - (i > 0), b.head_dim // 2, b.head_dim // 2)
                    for i, b in enumerate(matches.attention)}, {b.name: b.hidden for b in matches.ffn}, (0,))
    widths, _ = allocate(curves, matches, flops, total, 0.5 * total, fixed=fixed)
    assert widths.attention == fixed.attention and widths.removed_layers == (0,)
    assert widths.ffn[layers[0].ffn.name] == layers[0].ffn.hidden  # a removed block's FFN is not cut
    assert any(widths.ffn[l.ffn.name] < l.ffn.hidden for l in layers[1:])
    kept = sum(u.ffn * widths.ffn[l.ffn.name] for l, u in zip(layers[1:], flops[1:]))
    attention = sum(w.heads * (w.qk * u.qk + w.v * u.v + u.head) for w, u in
                    ((fixed.attention[l.attention.name], u) for l, u in zip(layers[1:], flops[1:])))
    whole = sum(l.attention.groups * (l.attention.head_dim * (u.qk + u.v) + u.head) + l.ffn.hidden * u.ffn + u.rest
                for l, u in zip(layers, flops))
    cost = total - whole + sum(u.rest for u in flops[1:]) + attention + kept
    step = max(u.ffn * max(1, l.ffn.hidden // 64) for l, u in zip(layers, flops))
    assert 0.5 * total - 4 * step <= cost <= 0.5 * total


@pytest.mark.parametrize("causal", [False, True])
def test_a_decoders_whole_groups_are_left_to_heads(digits, causal):
    """Heads that their curves call nearly free: an encoder's allocation takes them, a causal
    decoder's does not (DECODER_GROUPS_ALLOCATED: a key/value group's in-layer curve was measured to
    miss what removing it costs downstream) and meets the budget with the other moves."""
    matches, flops, total = digits
    if causal:
        # a KV cache makes the block a decoder's (AttentionBlock.causal); the allocation reads no more of it
        cache = (KvCache("past", "present", Part.KEY),)
        layers = tuple(replace(l, attention=replace(l.attention, kv_caches=cache)) for l in matches.layers)
        matches = replace(matches, layers=layers, attention=tuple(l.attention for l in layers))
    curves = [replace(c, heads=Curve(c.heads.kept, c.heads.loss * 1e-6))
              for c in _curves(matches, flops, attention_per_flop=1.0)]
    goal = total - 0.25 * sum(l.ffn.hidden * u.ffn for l, u in zip(matches.layers, flops))
    widths, _ = allocate(curves, matches, flops, total, goal)
    kept_heads = [widths.attention[l.attention.name].heads for l in matches.layers]
    groups = [l.attention.groups for l in matches.layers]
    assert (kept_heads == groups) == (causal and not DECODER_GROUPS_ALLOCATED)
