"""Choosing the ratios that meet a FLOPs or parameter target with the least measured error.

A cost model predicts the MACs and parameters of a plan from the original model's per-node
MACs and initializer sizes (kept widths scale them linearly), so many plans can be costed
without rewriting. Several allocations of the cut between Q/K pairs, V neurons and FFN neurons
are each scaled to meet the target exactly; the one whose pruned model keeps the highest output
cosine on held-back calibration samples wins. The final numbers in the report are measured on
the written model, not predicted.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .costs import CostKind, CostModel, CutPart
from ..errors import SnpError
from .importance import Scorer
from ..match import Layer, Matches
from ..plan import AttentionWidth, PrunePlan, Ratios, Widths
from ..match import units as units_of

MAX_RATIO = 0.95
# (Q/K, V, FFN) shares of the cut tried for a target. SNP's Q/K criterion keeps attention
# scores well, so allocations that cut Q/K harder are among them.
ALLOCATIONS = ((1.0, 1.0, 1.0), (1.5, 1.0, 0.8), (2.0, 1.0, 1.0), (1.5, 0.5, 1.0), (0.5, 0.5, 1.2), (1.2, 1.2, 0.6))


@dataclass(frozen=True)
class Target:
    kind: CostKind
    value: float  # flops/params: a fraction of the original (0 < value < 1) or an absolute count (>= 1);
    #               latency: milliseconds per run of one sample, or with `speedup` that factor
    speedup: bool = False  # --target-speedup: the goal is the original's latency / value

    def absolute(self, original: float) -> float:
        if self.kind is CostKind.LATENCY:
            return original / self.value if self.speedup else self.value
        return self.value * original if self.value < 1 else self.value

    @property
    def flag(self) -> str:
        if self.kind is CostKind.LATENCY:
            return "--target-speedup" if self.speedup else "--target-latency"
        return f"--target-{self.kind.value}"


def parse_target(text: str | float, kind: str) -> Target:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SnpError(f"--target-{kind} must be a fraction of the original (0 < F < 1) or an absolute count, "
                       f"got {text!r}")
    return Target(CostKind(kind), value)


def parse_latency_target(speedup: str | float | None, milliseconds: str | float | None) -> Target:
    """--target-speedup S (S > 1) or --target-latency MS (MS > 0), one of them."""
    flag, text = ("--target-speedup", speedup) if speedup is not None else ("--target-latency", milliseconds)
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if speedup is not None and not (math.isfinite(value) and value > 1):
        raise SnpError(f"--target-speedup must be a factor above 1 (e.g. 2 for twice as fast), got {text!r}")
    if speedup is None and not (math.isfinite(value) and value > 0):
        raise SnpError(f"--target-latency must be milliseconds per sample above 0, got {text!r}")
    return Target(CostKind.LATENCY, value, speedup=flag == "--target-speedup")


def search(scorer: Scorer, base: Ratios, target: Target, costs: CostModel,
           measure: Callable[[PrunePlan], float], seed: int = 0) -> tuple[PrunePlan, Ratios, list[dict]]:
    """The plan meeting `target` with the highest measured fidelity among ALLOCATIONS.

    Heads, blocks and alignment from `base` are kept; each allocation's overall scale is found by
    bisection on the predicted cost. Returns the plan, its ratios and what was tried."""
    goal = target.absolute(costs.original(target.kind))
    tried, best = [], None
    for shares in ALLOCATIONS:
        ratios_for = lambda s, m=shares: replace(base, qk=min(MAX_RATIO, m[0] * s), v=min(MAX_RATIO, m[1] * s),  # noqa: E731
                                                 ffn=min(MAX_RATIO, m[2] * s))
        if costs.cost(scorer.plan(ratios_for(10.0), seed), target.kind) > goal:
            tried.append({"shares": shares, "reachable": False})
            continue
        low, high = 0.0, 10.0
        for _ in range(30):
            middle = (low + high) / 2
            if costs.cost(scorer.plan(ratios_for(middle), seed), target.kind) <= goal:
                high = middle
            else:
                low = middle
        ratios = ratios_for(high)
        plan = scorer.plan(ratios, seed)
        cosine = measure(plan)
        tried.append({"shares": shares, "ratios": (round(ratios.qk, 3), round(ratios.v, 3), round(ratios.ffn, 3)),
                      "predicted": costs.cost(plan, target.kind), "cosine": cosine})
        if best is None or cosine > best[0]:
            best = (cosine, plan, ratios)
    if best is None:
        raise SnpError(f"{target.flag} {target.value:g} cannot be met by neuron pruning alone (at most "
                       f"{MAX_RATIO:.0%} of a group is removed); add --heads or --blocks, or aim higher")
    return best[1], best[2], tried


# --- global allocation over measured curves -----------------------------------------------------
LOOKAHEAD = 4  # steps a move may take at once (a curve can be flat before it falls)
MIN_KEPT = 0.05  # every group keeps at least this share of its units
# a latency budget's moves other than FFN cuts lose at most this × the FFN's loss per FLOP at the margin
LOSS_BOUND = 1.0
# A decoder's key/value group removed costs far more than its curve predicts: the curve is the
# o_proj refit's in-layer loss, and what a group carries (positions, sinks) is read by every later
# layer. SmolLM2-135M (3 groups, 24 calibration windows): one group fewer in every layer, 7.4 % of
# the FLOPs, cost 1.85x perplexity (fp32) and 1.53x (genai int4), where the uniform --ratio 0.44
# (no groups) cost 1.77x for 30.8 %; the allocation that took a group at --target-flops 0.65 cost
# 3.37x against that (7.57x on 64 windows). docs/DECODERS_REAL.md.
DECODER_GROUPS_ALLOCATED = False


@dataclass(frozen=True)
class UnitCosts:
    """What one unit of each group costs in one block (FLOPs, parameters or milliseconds): a Q/K
    pair or a V neuron in one head, an FFN neuron; `head`: what a head costs beyond its pairs and
    neurons (its Softmax and mask: time, no FLOPs); `rest`: what the block costs besides (its
    norms and residual Adds), saved only when the whole block goes."""

    qk: float
    v: float
    ffn: float
    head: float = 0.0
    rest: float = 0.0


def unit_costs(costs: CostModel, matches: Matches, kind: CostKind | str) -> list[UnitCosts]:
    """Per transformer block, from the cost model (linear in the kept widths, so one unit's cost
    is the difference it makes to the whole)."""
    full = _full_plan(matches)
    base = costs.cost(full, kind)

    def without(plan: PrunePlan) -> float:
        return base - costs.cost(plan, kind)

    result = []
    for layer in matches.layers:
        block, ffn = layer.attention, layer.ffn
        d, heads = block.head_dim, block.groups  # with grouped-query attention a head is a key/value group
        keep = next(k for k in full.attention if k.block is block)

        def attention_plan(**changes) -> PrunePlan:
            changed = replace(keep, **changes)
            return replace(full, attention=tuple(changed if k is keep else k for k in full.attention))

        qk, v = (without(attention_plan(**{part: np.tile(np.arange(d - 1), (heads, 1))})) / heads
                 for part in ("qk", "v"))
        head = 0.0
        if heads > 1:
            fewer = np.tile(np.arange(d), (heads - 1, 1))
            head = without(attention_plan(qk=fewer, v=fewer, heads=np.arange(heads - 1))) - d * (qk + v)
        plan = replace(full, ffn=tuple(replace(k, hidden=np.arange(ffn.hidden - 1)) if k.block is ffn else k
                                       for k in full.ffn))
        unit_ffn = without(plan)
        whole = without(replace(full, removed_layers=(layer,)))
        rest = whole - heads * (d * (qk + v) + head) - ffn.hidden * unit_ffn
        result.append(UnitCosts(qk, v, unit_ffn, head, rest))
    return result


def widths_plan(matches: Matches, widths) -> PrunePlan:
    """A plan with the shapes of `widths` (reconstruction.Widths), keeping the first units of each
    group: what the cost model and the clock need (timed.py), not what pruning would keep. Q/K keep
    whole units (rotary pairs: under rotate_half the first dims of a head are not pairs), so that a
    timed candidate's rotary caches are what a pruned model's would be."""
    from ..match.units import dims_of, unit_size
    from ..plan import AttentionKeep, FfnKeep

    attention = []
    for b in matches.attention:
        w = widths.attention[b.name]
        qk = dims_of(b, np.tile(np.arange(w.qk // unit_size(b)), (w.heads, 1)))
        attention.append(AttentionKeep(b, qk, np.tile(np.arange(w.v), (w.heads, 1)), np.arange(w.heads)))
    ffn = tuple(FfnKeep(b, np.arange(widths.ffn[b.name])) for b in matches.ffn)
    return PrunePlan(tuple(attention), ffn, removed_layers=tuple(matches.layers[i] for i in widths.removed_layers))


def _full_plan(matches: Matches) -> PrunePlan:
    from ..plan import AttentionKeep, FfnKeep

    attention = tuple(AttentionKeep(b, np.tile(np.arange(b.head_dim), (b.groups, 1)),
                                    np.tile(np.arange(b.head_dim), (b.groups, 1)), np.arange(b.groups))
                      for b in matches.attention)
    return PrunePlan(attention, tuple(FfnKeep(b, np.arange(b.hidden)) for b in matches.ffn))


@dataclass
class _State:
    heads: int
    qk: int
    v: int
    ffn: int
    removed: bool = False


def allocate(curves: list, matches: Matches, units: list[UnitCosts], total: float, goal: float,
             align: int = 1, heads_ratio: float | None = None, max_blocks: int = 0, one_head_size: bool = False,
             flops: list[UnitCosts] | None = None, fixed: Widths | None = None):
    """Widths meeting `goal` (total cost after pruning) with the least predicted loss: starting
    from the full model, repeatedly take the move — fewer Q/K pairs, V neurons or FFN neurons in
    one block, one head fewer, or a whole block removed — that adds the least measured loss per
    unit of cost saved (curves: sensitivity.LayerSensitivity per block, in one unit). A head
    costs its kept pairs and neurons; a block's Q/K and V losses scale with the heads it keeps.
    `heads_ratio` (--heads): that share of every block's heads removed first, and no more.
    `one_head_size` (onnxruntime-genai folders: one KV-cache shape for the model): attention moves
    change every block at once, Q/K and V to the same per-head width, so that the budget is met by
    the widths the folder can hold (widened afterwards, a budget fell short by a third).
    `flops` (a latency budget: the FLOPs unit costs): the loss bound — a move other than an FFN
    cut is refused while its loss per FLOP saved exceeds LOSS_BOUND × the cheapest FFN move's
    (what the FLOPs allocation would have taken instead): per millisecond of a decode step a key/value
    group can look cheap that per FLOP loses far more than the FFN neurons (docs/DECODER_SPEED.md).
    `fixed`: the attention widths and removed blocks are these, and only FFN neurons move (the
    timed search, timed.py, once it has chosen the attention).
    A causal decoder's whole heads (key/value groups) are not allocated (DECODER_GROUPS_ALLOCATED):
    only --heads removes them.
    Returns (reconstruction.Widths, predicted loss per block)."""
    from ..plan import kept_count

    layers = matches.layers
    allow_heads = not heads_ratio and fixed is None and (DECODER_GROUPS_ALLOCATED
                                                         or not any(l.attention.causal for l in layers))
    attention_moves = fixed is None

    def layer_cost(i: int, s: _State, per: list[UnitCosts] = units) -> float:
        u = per[i]
        return 0.0 if s.removed else s.heads * (s.qk * u.qk + s.v * u.v + u.head) + s.ffn * u.ffn + u.rest

    whole = [_State(l.attention.groups, l.attention.head_dim, l.attention.head_dim, l.ffn.hidden) for l in layers]
    fixed_cost = total - sum(layer_cost(i, s) for i, s in enumerate(whole))
    if fixed is not None:
        states = [_State(fixed.attention[l.attention.name].heads, fixed.attention[l.attention.name].qk,
                         fixed.attention[l.attention.name].v, l.ffn.hidden, i in fixed.removed_layers)
                  for i, l in enumerate(layers)]
        max_blocks = sum(s.removed for s in states)
    else:
        # heads are key/value groups (each with its query heads), as the reconstruction removes them
        states = [replace(s, heads=kept_count(l.attention.groups, heads_ratio))
                  if heads_ratio and l.attention.heads_fixed is None else s for l, s in zip(layers, whole)]

    def layer_loss(i: int, s: _State) -> float:
        if s.removed:
            return curves[i].block
        heads, share, qk, v, ffn = _loss_terms(curves[i], layers[i].attention, s)
        return heads + share * (qk + v) + ffn

    current = fixed_cost + sum(layer_cost(i, s) for i, s in enumerate(states))
    while current > goal:
        moves = []  # (added loss per cost saved, the new states, cost saved, added loss, FLOPs saved, an FFN move)
        blocks_left = max_blocks - sum(x.removed for x in states)
        for i, s in enumerate(states):
            if s.removed:
                continue
            for candidate in _moves(layers[i], s, align, allow_heads and not one_head_size, blocks_left,
                                    attention=attention_moves and not one_head_size):
                saved = layer_cost(i, s) - layer_cost(i, candidate)
                if saved > 0:
                    added = max(layer_loss(i, candidate) - layer_loss(i, s), 0.0)
                    cut = layer_cost(i, s, flops) - layer_cost(i, candidate, flops) if flops else 0.0
                    moves.append((added / saved, states[:i] + [candidate] + states[i + 1:], saved, added, cut,
                                  candidate == replace(s, ffn=candidate.ffn)))
        for moved in (_tied_moves(layers, states, align, allow_heads) if one_head_size and attention_moves else ()):
            saved = sum(layer_cost(i, s) - layer_cost(i, m) for i, (s, m) in enumerate(zip(states, moved)))
            if saved > 0:
                added = max(sum(layer_loss(i, m) - layer_loss(i, s) for i, (s, m) in enumerate(zip(states, moved))), 0.0)
                cut = sum(layer_cost(i, s, flops) - layer_cost(i, m, flops)
                          for i, (s, m) in enumerate(zip(states, moved))) if flops else 0.0
                moves.append((added / saved, moved, saved, added, cut, False))
        if flops:
            moves = _loss_bounded(moves)
        if not moves:
            raise SnpError(f"the budget cannot be met: at most {1 - MIN_KEPT:.0%} of each group is removed "
                           f"({current / total:.0%} of the cost remains); aim higher or allow --blocks")
        best = min(moves, key=lambda m: m[0])
        states, saved = best[1], best[2]
        current -= saved
    if one_head_size or any(layer.attention.equal_widths for layer in layers):
        # attention moves that take Q/K and V (and every block) at once are coarse, so the last
        # one may overshoot the budget far: FFN neurons are given back while it still holds
        while True:
            refills = []
            for i, (layer, st) in enumerate(zip(layers, states)):
                step = _ffn_step(layer, align)
                if st.removed or st.ffn + step > layer.ffn.hidden:
                    continue
                wider = replace(st, ffn=st.ffn + step)
                added = layer_cost(i, wider) - layer_cost(i, st)
                if 0 < added and current + added <= goal:
                    refills.append(((layer_loss(i, st) - layer_loss(i, wider)) / added, i, wider, added))
            if not refills:
                break
            _, i, wider, added = max(refills, key=lambda r: r[0])
            states[i] = wider
            current += added
    widths = Widths({l.attention.name: AttentionWidth(s.heads if not s.removed else l.attention.groups, s.qk, s.v)
                     for l, s in zip(layers, states)},
                    {l.ffn.name: s.ffn for l, s in zip(layers, states)},
                    tuple(i for i, s in enumerate(states) if s.removed))
    assert abs(fixed_cost + sum(layer_cost(i, s) for i, s in enumerate(states)) - current) < 1e-6 * max(total, 1)
    return widths, [layer_loss(i, s) for i, s in enumerate(states)]


def _loss_bounded(moves: list[tuple]) -> list[tuple]:
    """The moves the loss bound allows: every FFN move, and another (fewer heads or pairs, a
    block) only where its loss per FLOP saved is at most LOSS_BOUND × the cheapest FFN move's
    (the FFN's loss per FLOP at the margin). Without FFN moves left, every move."""
    margin = [m[3] / m[4] for m in moves if m[5] and m[4] > 0]
    if not margin:
        return moves
    limit = LOSS_BOUND * min(margin)
    return [m for m in moves if m[5] or (m[4] > 0 and m[3] / m[4] <= limit)]


def _loss_terms(curve, block, s: _State) -> tuple[float, float, float, float, float]:
    """A kept block's predicted loss, by group: (heads, kept share of heads, Q/K, V, FFN); a
    block's Q/K and V losses scale with the share of heads it keeps."""
    return (curve.heads.at(s.heads), s.heads / block.groups, curve.qk.at(s.qk), curve.v.at(s.v),
            curve.ffn.at(s.ffn))


def part_losses(curves: list, matches: Matches, widths) -> list[dict[CutPart, float]]:
    """Per transformer block, the loss the allocation predicts for `widths` (reconstruction.Widths)
    split by the part of the cut it comes from (layer_loss's terms: they sum to its loss)."""
    result = []
    for i, (layer, curve) in enumerate(zip(matches.layers, curves)):
        if i in widths.removed_layers:
            result.append({CutPart.BLOCKS: curve.block})
            continue
        w = widths.attention[layer.attention.name]
        heads, share, qk, v, ffn = _loss_terms(curve, layer.attention,
                                               _State(w.heads, w.qk, w.v, widths.ffn[layer.ffn.name]))
        result.append({CutPart.HEADS: heads, CutPart.QK: share * qk, CutPart.V: share * v, CutPart.FFN: ffn})
    return result


def _qk_step(layer: Layer, align: int) -> int:
    block = layer.attention
    return math.lcm(_aligned(block.head_dim // 16, align), units_of.unit_size(block), block.width_multiple)  # whole rotary pairs


def _ffn_step(layer: Layer, align: int) -> int:
    return _aligned(layer.ffn.hidden // 64, align)


def _aligned(base: int, align: int) -> int:
    """A move's step: `base` (a fraction of the width) rounded up to a multiple of `align`, so that
    the widths the allocation reaches (width − k·step) are multiples of `align` wherever the full
    width is. (The larger of the two, as before, left SmolLM2's FFN step at 1536/64 = 24 under
    `--align 16`: every other width off the grid.)"""
    return -(-max(1, base) // align) * align


def _tied_moves(layers: list[Layer], states: list[_State], align: int, allow_heads: bool) -> list[list[_State]]:
    """Every kept block's attention one move (of up to LOOKAHEAD steps) narrower at once: one
    per-head width for Q/K and V (a step every block's Q/K and V allow), or one head fewer."""
    kept = [(layer, s) for layer, s in zip(layers, states) if not s.removed]
    if not kept:
        return []
    found = []
    if not any(layer.attention.qk_whole for layer, _ in kept):
        step = math.lcm(*(math.lcm(_qk_step(layer, align), _aligned(layer.attention.head_dim // 16, align))
                          for layer, _ in kept))
        size, floor = kept[0][1].qk, max(int(np.ceil(MIN_KEPT * layer.attention.head_dim)) for layer, _ in kept)
        for steps in range(1, LOOKAHEAD + 1):
            if size - steps * step < floor:
                break
            found.append([replace(s, qk=size - steps * step, v=size - steps * step) for s in states])
    heads = kept[0][1].heads
    if allow_heads and heads > 1 and all(layer.attention.heads_fixed is None for layer, _ in kept):
        found.append([replace(s, heads=heads - 1) for s in states])  # removed blocks too: one size in the widths
    return found


def _moves(layer: Layer, s: _State, align: int, allow_heads: bool, blocks_left: int,
           attention: bool = True) -> list[_State]:
    """Every state one move (of up to LOOKAHEAD steps) away; `attention` False: the FFN's and
    the block's only (the attention moves with every block's, _tied_moves)."""
    block, ffn = layer.attention, layer.ffn
    d = block.head_dim
    found = []
    fields = (("qk", d, _qk_step(layer, align)), ("v", d, _aligned(d // 16, align)),
              ("ffn", ffn.hidden, _ffn_step(layer, align)))
    if not attention or (block.equal_widths and block.qk_whole):
        fields = fields[2:]
    elif block.equal_widths:  # one head size for Q/K and V (an attention op's): both move, as the reconstruction keeps them
        fields = ((("qk", "v"), d, math.lcm(fields[0][2], fields[1][2])),) + fields[2:]
    elif block.qk_whole:
        fields = fields[1:]
    for names, width, step in fields:
        names = names if isinstance(names, tuple) else (names,)
        floor = max(1, int(np.ceil(MIN_KEPT * width)))
        for steps in range(1, LOOKAHEAD + 1):
            value = getattr(s, names[0]) - steps * step
            if value < floor:
                break
            found.append(replace(s, **{name: value for name in names}))
    if allow_heads and block.heads_fixed is None and s.heads > 1:
        found.append(replace(s, heads=s.heads - 1))
    if blocks_left > 0:
        found.append(replace(s, removed=True))
    return found
