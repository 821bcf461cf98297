"""Restoring what pruning changes, from calibration data alone (between scoring and rewriting).

LayerNorm after residual-channel pruning: a LayerNorm over the kept channels K normalises with
their own mean and deviation. Exactly, per token,
    (x_K − μ)/σ = (x_K − μ_K)/σ_K · (σ_K/σ) + (μ_K − μ)/σ,
so the original output is recovered by scaling γ by σ_K/σ and shifting β by γ·(μ_K − μ)/σ.
Those two are per-token values; their calibration means give the closed-form correction
γ' = γ·E[σ_K/σ], β' = β + γ·E[(μ_K − μ)/σ] — exact where they vary little between tokens.
"""
from __future__ import annotations

import numpy as np

from .calibration import capture
from .graph import ModelGraph, attribute
from .importance import PrunePlan


def norm_corrections(g: ModelGraph, plan: PrunePlan, feed: dict[str, np.ndarray], batch: int) -> dict[str, tuple[float, float]]:
    """(scale of γ, shift of β in units of γ) for every LayerNorm that reads the pruned stream."""
    if plan.stream is None or plan.stream_keep is None:
        return {}
    norms = sorted({node for node, index in plan.stream.sliced_inputs
                    if g.node(node).op_type == "LayerNormalization"})
    inputs = {name: g.node(name).input[0] for name in norms}
    keep = plan.stream_keep
    ratio = {name: [0.0, 0.0, 0] for name in norms}  # Σ σ_K/σ, Σ (μ_K − μ)/σ, tokens
    for _, acts in capture(g.model, sorted(set(inputs.values())), feed, batch):
        for name in norms:
            x = acts[inputs[name]].astype(np.float64).reshape(-1, acts[inputs[name]].shape[-1])
            epsilon = attribute(g.node(name), "epsilon", 1e-5)
            mean, deviation = x.mean(axis=1), np.sqrt(x.var(axis=1) + epsilon)
            kept = x[:, keep]
            mean_k, deviation_k = kept.mean(axis=1), np.sqrt(kept.var(axis=1) + epsilon)
            totals = ratio[name]
            totals[0] += float((deviation_k / deviation).sum())
            totals[1] += float(((mean_k - mean) / deviation).sum())
            totals[2] += x.shape[0]
    return {name: (s / max(n, 1), m / max(n, 1)) for name, (s, m, n) in ratio.items()}
