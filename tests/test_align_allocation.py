"""`--align` in the budgeted allocation (allocation.py): every FFN width it reaches is a multiple of
the alignment wherever the full width is, also where a sixty-fourth of the FFN (the allocation's
step) is not (SmolLM2's 1536 / 64 = 24 under `--align 16`)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnxsnp.match.blocks import Matches
from onnxsnp.score.allocation import allocate, unit_costs
from onnxsnp.score.sensitivity import Curve, LayerSensitivity


def _linear(width: int, steep: float) -> Curve:
    kept = np.arange(1, width + 1, dtype=float)
    return Curve(kept, steep * (width - kept) / width)


def _widened(matches: Matches, hidden: int) -> Matches:
    """The digits ViT's blocks with every FFN `hidden` neurons wide (the unit costs are per neuron)."""
    layers = tuple(replace(l, ffn=replace(l.ffn, fc1=replace(l.ffn.fc1, out_features=hidden))) for l in matches.layers)
    return replace(matches, ffn=tuple(l.ffn for l in layers), layers=layers)


@pytest.mark.parametrize("hidden, align", [(1536, 16), (3072, 32), (1536, 8), (1536, 1)])
def test_the_ffn_widths_are_multiples_of_align(digits_costs, hidden, align):
    _, matches, costs = digits_costs
    units = unit_costs(costs, matches, "flops")  # per neuron: the same for the widened blocks
    matches = _widened(matches, hidden)
    ffn_cost = [hidden * u.ffn for u in units]
    total = sum(ffn_cost) + sum(b.groups * b.head_dim * (u.qk + u.v) + b.groups * u.head + u.rest
                                for b, u in zip(matches.attention, units))
    # the FFNs' losses differ by block, so the allocation cuts them unevenly (one step at a time)
    curves = [LayerSensitivity(l.name, _linear(l.attention.head_dim, 1e3), _linear(l.attention.head_dim, 1e3),
                               _linear(l.attention.groups, 1e3), _linear(hidden, 1.0 + i), 1e6)
              for i, l in enumerate(matches.layers)]
    goal = total - 0.4 * sum(ffn_cost)
    widths, _ = allocate(curves, matches, units, total, goal, align=align)
    kept = [widths.ffn[l.ffn.name] for l in matches.layers]
    step = max(align, hidden // 64)  # the step before: a sixty-fourth of the FFN, or align where larger
    assert all(k % align == 0 for k in kept), kept
    assert len(set(kept)) > 1  # an uneven cut: the test sees more than one width
    assert total - sum((hidden - k) * u.ffn for k, u in zip(kept, units)) <= goal  # the budget met
    if step % align == 0:  # where the old step was aligned, the widths are the ones it reached
        assert all((hidden - k) % step == 0 for k in kept)
