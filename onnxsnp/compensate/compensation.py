"""Restoring what pruning changes, from calibration data alone (between scoring and rewriting).

Layers after a pruned group: see `Collector` and `Statistics`.

LayerNorm after residual-channel pruning: a LayerNorm over the kept channels K normalises with
their own mean and deviation. Exactly, per token,
    (x_K − μ)/σ = (x_K − μ_K)/σ_K · (σ_K/σ) + (μ_K − μ)/σ,
so the original output is recovered by scaling γ by σ_K/σ and shifting β by γ·(μ_K − μ)/σ.
Those two are per-token values; their calibration means give the closed-form correction
γ' = γ·E[σ_K/σ], β' = β + γ·E[(μ_K − μ)/σ] — exact where they vary little between tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..ir.graph import ModelGraph, attribute
from ..score.importance import PairStatistics
from ..match import Matches
from ..plan import PrunePlan, Refit, selection_map
from ..match.residual import ResidualStream

COMPENSATION = ("lstsq", "bias", "none")
RIDGE = 1e-2  # relative to the mean diagonal of the kept inputs' Gram matrix


def compensation_tensors(matches: Matches, stream: ResidualStream | None, g: ModelGraph) -> list[str]:
    """Every tensor `Collector` may read, whatever the plan: for building the runner before it."""
    tensors: list[str] = []
    for linear in [block.out for block in matches.attention] + [ffn.fc2 for ffn in matches.ffn]:
        tensors += [linear.input] + ([linear.output] if linear.output else [])
    if stream is not None:
        tensors += [g.node(node).input[0] for node, _ in stream.sliced_inputs
                    if g.node(node).op_type == "LayerNormalization"]
    return list(dict.fromkeys(tensors))


class Collector:
    """What the compensation pieces need from the calibration inputs, for one plan, gathered
    in a single pass (`tensors` to capture, `update` per batch):

    - refits: the layer after each pruned group (output projection after V/heads, fc2 after
      FFN) is refitted to reproduce its original output (see `Statistics`);
    - LayerNorm corrections for the pruned residual stream (see the module docstring)."""

    def __init__(self, g: ModelGraph, plan: PrunePlan, mode: str, mask_input: str | None = None):
        self.mask_input = mask_input
        layers = []
        if mode != "none":
            layers = [(keep.block.out, keep.out_rows()) for keep in plan.attention
                      if len(keep.out_rows()) < keep.block.heads * keep.block.head_dim]  # its inputs lost something
            layers += [(keep.block.fc2, keep.hidden) for keep in plan.ffn if keep.changes_something()]
        self.mode = mode
        self.layers = [linear for linear, _ in layers]
        self.statistics = {linear.node: Statistics.empty(g, linear, keep) for linear, keep in layers}
        self.stream_keep = plan.stream_keep if plan.stream is not None else None
        norms = [] if self.stream_keep is None else sorted({node for node, _ in plan.stream.sliced_inputs
                                                            if g.node(node).op_type == "LayerNormalization"})
        self.norms = {name: (g.node(name).input[0], attribute(g.node(name), "epsilon", 1e-5)) for name in norms}
        self.norm_totals = {name: [0.0, 0.0, 0] for name in norms}  # Σ σ_K/σ, Σ (μ_K − μ)/σ, tokens

    def tensors(self) -> list[str]:
        wanted = [linear.input for linear in self.layers]
        wanted += [linear.output for linear in self.layers if linear.output]
        wanted += [tensor for tensor, _ in self.norms.values()]
        return list(dict.fromkeys(wanted))

    def update(self, inputs: dict[str, np.ndarray], acts: dict[str, np.ndarray]) -> None:
        mask = inputs.get(self.mask_input) if self.mask_input else None
        for linear in self.layers:
            x = acts[linear.input]
            y = acts[linear.output] if linear.output else None
            if mask is not None and x.ndim == 3 and mask.shape == x.shape[:2]:
                x, y = x[mask > 0], (y[mask > 0] if y is not None else None)
            self.statistics[linear.node].add(x.reshape(-1, x.shape[-1]), None if y is None else y.reshape(-1, y.shape[-1]))
        for name, (tensor, epsilon) in self.norms.items():
            x = acts[tensor].astype(np.float64).reshape(-1, acts[tensor].shape[-1])
            mean, deviation = x.mean(axis=1), np.sqrt(x.var(axis=1) + epsilon)
            kept = np.take(x, self.stream_keep, axis=1)
            mean_k, deviation_k = kept.mean(axis=1), np.sqrt(kept.var(axis=1) + epsilon)
            totals = self.norm_totals[name]
            totals[0] += float((deviation_k / deviation).sum())
            totals[1] += float(((mean_k - mean) / deviation).sum())
            totals[2] += x.shape[0]

    def norm_corrections(self) -> dict[str, tuple[float, float]]:
        """(scale of γ, shift of β in units of γ) for every LayerNorm that reads the pruned stream."""
        return {name: (s / max(n, 1), m / max(n, 1)) for name, (s, m, n) in self.norm_totals.items()}

    def refits(self) -> dict[str, Refit]:
        """New weights for each refitted layer. "bias": the removed inputs' mean contribution
        folded into the bias (FLAP); "lstsq": W', b' = argmin ‖X_K W' + b' − (X W + b)‖² + ridge."""
        return {node: s.solve(self.mode) for node, s in self.statistics.items()}


@dataclass
class Statistics:
    """What a refit needs from the calibration inputs X of one layer."""

    weight: np.ndarray  # [in, out], the graph's own array (a view; float64 only while solving)
    bias: np.ndarray | None
    keep: np.ndarray
    products: np.ndarray  # X̃_Kᵀ X̃_K (X̃_K = kept inputs, plus a ones column when there is a bias)
    targets: np.ndarray  # X̃_Kᵀ (X W + b)
    sums: np.ndarray  # Σ x per input, for the bias-only mode
    count: int = 0

    @classmethod
    def empty(cls, g: ModelGraph, linear, keep: np.ndarray) -> "Statistics":
        weight = g.constant(linear.weight)
        weight = weight.T if linear.transposed else weight
        bias = g.constant(linear.bias).astype(np.float64).reshape(-1) if linear.bias is not None else None
        width = len(keep) + (bias is not None)
        return cls(weight, bias, keep, np.zeros((width, width)), np.zeros((width, weight.shape[1])),
                   np.zeros(weight.shape[0]))

    def add(self, x: np.ndarray, outputs: np.ndarray | None = None) -> None:
        """One batch of inputs (tokens × in) and, where the graph has them, the layer's outputs
        (otherwise they are recomputed). Only the kept inputs' products are accumulated,
        X̃_Kᵀ X̃_K and X̃_Kᵀ Y with X̃ = [X, 1]: |K|·(|K| + outputs) per token."""
        # one batch's products in float32 (BLAS speed), summed into float64 accumulators
        x = x.astype(np.float32, copy=False)
        if outputs is None:
            outputs = x @ self.weight.astype(np.float32) + (self.bias.astype(np.float32) if self.bias is not None else 0)
        outputs = outputs.astype(np.float32, copy=False)
        kept = np.take(x, self.keep, axis=1)  # np.take: several times faster than x[:, keep] here
        width = len(self.keep)
        self.products[:width, :width] += kept.T @ kept
        self.targets[:width] += kept.T @ outputs
        if self.bias is not None:  # the ones column of X̃, without building it
            column = kept.sum(axis=0, dtype=np.float64)
            self.products[:width, width] += column
            self.products[width, :width] += column
            self.products[width, width] += len(x)
            self.targets[width] += outputs.sum(axis=0, dtype=np.float64)
        self.sums += x.sum(axis=0, dtype=np.float64)
        self.count += len(x)

    def solve(self, mode: str) -> Refit:
        weight, bias, keep = self.weight.astype(np.float64), self.bias, self.keep
        if mode == "bias" or self.count == 0:
            removed = np.setdiff1d(np.arange(weight.shape[0]), keep)
            shift = (self.sums[removed] / max(self.count, 1)) @ weight[removed] if self.count else 0.0
            return Refit(weight[keep], None if bias is None else bias + shift)
        prior = weight[keep] if bias is None else np.concatenate([weight[keep], bias[None]], axis=0)
        # the ridge pulls towards the original kept weights (not towards zero), so little data or a
        # small cut leaves the layer as it was; the bias row is not penalised
        penalty = RIDGE * float(np.mean(np.diag(self.products)[:len(keep)]))
        penalty = penalty * np.r_[np.ones(len(keep)), np.zeros(len(prior) - len(keep))]
        try:
            solution = np.linalg.solve(self.products + np.diag(penalty), self.targets + penalty[:, None] * prior)
        except np.linalg.LinAlgError:  # e.g. inputs that were always zero: keep the plain slice
            return Refit(weight[keep], bias)
        return Refit(solution[:len(keep)], solution[len(keep)] if bias is not None else None)


def qk_rescaled(plan: PrunePlan, pairs: dict[str, PairStatistics]) -> PrunePlan:
    """The plan with a factor for every kept Q/K pair (in q's map), so that the kept pairs
    reproduce the original scores in least squares over the calibration tokens (see
    PairStatistics.rescales); the softmax scale stays the original one."""
    keeps = []
    for keep in plan.attention:
        statistics = pairs.get(keep.block.name)
        if statistics is None or not statistics.count or keep.qk.shape[1] == keep.block.head_dim:
            keeps.append(keep)
            continue
        factors = statistics.rescales(keep, RIDGE)
        keeps.append(replace(keep, q_map=selection_map(keep.qk, keep.block.head_dim, factors)))
    return replace(plan, attention=tuple(keeps))
