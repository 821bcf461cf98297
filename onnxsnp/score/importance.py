"""Score stage, one-pass: per-neuron statistics gathered batch by batch (SNP's attention-score
criterion on q and k, activation norms), turned into the units to keep by the chosen criterion
(criteria.py). Every criterion goes through the same mechanics: the same count is removed in
every head of a layer, so only the choice of neurons differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from enum import Enum

import numpy as np

from ..match import units
from ..ir.graph import ModelGraph
from ..threads import small_linear_algebra
from ..match import AttentionBlock, FfnBlock, Layer, Linear, Matches
from ..plan import AttentionKeep, FfnKeep, PrunePlan, Ratios, head_columns, kept_count  # noqa: F401 (re-exported)
from .criteria import Criterion, criterion as criterion_named, input_weights, output_weights
from ..match.residual import ResidualStream
from ..match.qk_norm import norm_energy, normalized
from .softmax_metric import SoftmaxSums, add_sums

DEFAULT_ENERGY = 0.9  # γ: the smallest number of singular components covering this share of Σσ²


# --- the SVD attention-score criterion -------------------------------------------------------------
def qk_pair_scores(q: np.ndarray, k: np.ndarray, energy: float = DEFAULT_ENERGY) -> np.ndarray:
    """ω_n = Σ_{j≤γ} |cos(u_j v_jᵀ, q_n k_nᵀ)| for stacks q, k of shape (S, N, d); returns (S, d)."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    return pair_scores_from_grams(np.swapaxes(q, -1, -2) @ q, np.swapaxes(k, -1, -2) @ k, energy, (q, k))


def pair_scores_from_grams(gram_q: np.ndarray, gram_k: np.ndarray, energy: float = DEFAULT_ENERGY,
                           tokens: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The SNP pair scores from the d×d Gram matrices QᵀQ and KᵀK of each head.

    S = Q·Kᵀ has rank ≤ d. With any R such that RᵀR = QᵀQ (Q = Qq·R, Qq orthonormal), and
    likewise for K, S = Qq·(Rq·Rkᵀ)·Qkᵀ; with M = Rq·Rkᵀ = U Σ Vᵀ, u_j·q_n = (Uᵀ Rq)[j, n] and
    v_j·k_n = (Vᵀ Rk)[j, n], and for rank-1 matrices cos(u vᵀ, q kᵀ) = (u·q)(v·k)/(‖q‖‖k‖).
    R comes from a Cholesky factor of the Gram (matrix products, cheaper than a QR of the
    N×d tokens; the choice of R does not change the result). No N×N matrix is ever formed.
    U and Σ² come from the eigen-decomposition of M·Mᵀ and Vᵀ = Σ⁻¹·Uᵀ·M: for a batch of small
    matrices that is twice as fast as an SVD, and exact for every component that can fall
    within γ (only those with σ below ~1e-8·σ_max lose precision, and they carry no energy)."""
    rq, rk = _gram_roots(gram_q, gram_k, tokens)
    m = rq @ np.swapaxes(rk, -1, -2)
    power, u = np.linalg.eigh(m @ np.swapaxes(m, -1, -2))
    power, u = np.maximum(power[..., ::-1], 0.0), u[..., ::-1]  # descending, as an SVD orders them
    sigma = np.sqrt(power)
    u_t = np.swapaxes(u, -1, -2)
    along_q = u_t @ rq  # (S, d, d)
    along_k = (u_t @ m @ rk) / np.where(sigma > 1e-12 * sigma[..., :1], sigma, np.inf)[..., None]
    cumulative = np.cumsum(power, axis=-1) / np.maximum(power.sum(axis=-1, keepdims=True), 1e-30)
    # smallest γ reaching `energy` (a tolerance: rounding leaves the cumulative share a hair under 1)
    gamma = (cumulative < energy - 1e-12).sum(axis=-1, keepdims=True) + 1
    used = np.arange(sigma.shape[-1])[None, :] < gamma
    norms = np.sqrt(np.diagonal(gram_q, axis1=-2, axis2=-1) * np.diagonal(gram_k, axis1=-2, axis2=-1)) + 1e-12
    return (np.abs(along_q) * np.abs(along_k) * used[..., None]).sum(axis=-2) / norms


def _gram_roots(gram_q: np.ndarray, gram_k: np.ndarray,
                tokens: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangular R with RᵀR = Gram, for Q and K alike; QR factors of the tokens where a
    Gram is singular (fewer tokens than head dims, or dead neurons)."""
    try:
        return (np.swapaxes(np.linalg.cholesky(gram_q), -1, -2), np.swapaxes(np.linalg.cholesky(gram_k), -1, -2))
    except np.linalg.LinAlgError:
        if tokens is not None:
            return (np.linalg.qr(tokens[0].astype(np.float64))[1], np.linalg.qr(tokens[1].astype(np.float64))[1])
        eye = np.eye(gram_q.shape[-1])
        return tuple(np.swapaxes(np.linalg.cholesky(g + 1e-9 * np.trace(g, axis1=-2, axis2=-1)[..., None, None]
                                                    / g.shape[-1] * eye + 1e-300 * eye), -1, -2)
                     for g in (gram_q, gram_k))


# --- accumulating scores over calibration batches ----------------------------------------------------
class PairSums(Enum):
    """Which Q/K pair statistics a pass gathers."""

    NONE = "none"  # no pair is cut
    SOFTMAX = "softmax"  # only the softmax's sums: the pairs are chosen by them (softmax_metric), and
    # SNP's scores (a per-sample eigendecomposition, Grams) would be computed for nothing
    ALL = "all"


@dataclass
class PairStatistics:
    """Per head, summed over calibration samples: SNP's pair scores, and the least-squares system
    for rescaling kept pairs — gram = Σ (Q̂ᵀQ̂)∘(K̂ᵀK̂), cross = Σ_m [(Q̂ᵀQ)∘(K̂ᵀK)]_{·m} — where Q̂, K̂
    are the pairs as the pruned model computes them and Q, K the original ones (the same, in a
    one-shot pass). Each sample's scores are its own Q·Kᵀ, so the products are per sample."""

    scores: np.ndarray  # (heads, d)
    gram: np.ndarray  # (heads, d, d)
    cross: np.ndarray  # (heads, d)
    count: int
    energy: float = DEFAULT_ENERGY
    gram_q: np.ndarray | None = None  # (heads, d, d): Σ Q̂ᵀQ̂ over all samples' tokens
    gram_k: np.ndarray | None = None
    causal_scale: float | None = None  # causal attention's softmax scale: the softmax's sums are kept too
    softmax: SoftmaxSums | None = None  # causal attention: the score error as the softmax sees it
    softmax_only: bool = False  # PairSums.SOFTMAX: SNP's scores and Grams are left at zero
    # a per-head QK-norm cut within the heads (QkNormCut.CALIBRATED): Σ_t x_j²/ms(x) before the norm,
    # q's (heads, d) and k's (key/value heads, d), and the tokens summed (match.qk_norm.norm_energy)
    norm_energy: tuple[np.ndarray, np.ndarray] | None = None
    norm_tokens: float = 0.0

    @classmethod
    def empty(cls, heads: int, d: int, energy: float = DEFAULT_ENERGY,
              causal_scale: float | None = None, units: np.ndarray | None = None,
              softmax_only: bool = False, softcap: float | None = None) -> "PairStatistics":
        """`units`: each head dim's unit (match.units.unit_of_dim), for the softmax's sums over units;
        `softmax_only` (with `causal_scale`): only the softmax's sums are gathered; `softcap`: the
        scores' soft cap before the softmax."""
        return cls(np.zeros((heads, d)), np.zeros((heads, d, d)), np.zeros((heads, d)), 0, energy,
                   np.zeros((heads, d, d)), np.zeros((heads, d, d)), causal_scale,
                   None if causal_scale is None else SoftmaxSums.empty(heads, d, units, softcap),
                   softmax_only and causal_scale is not None)

    @small_linear_algebra
    def add(self, q: np.ndarray, k: np.ndarray, token_mask: np.ndarray | None = None,
            q_original: np.ndarray | None = None, k_original: np.ndarray | None = None) -> None:
        """q, k: (samples, tokens, heads × d), as the pruned model computes them; the original
        ones where they differ (the scores to reproduce)."""
        heads, d = self.scores.shape
        tensors = [q, k] + ([q_original, k_original] if q_original is not None else [])
        if token_mask is not None and token_mask.shape[:2] == q.shape[:2]:
            # padded tokens are not part of any real attention map; zero rows add nothing to a Gram
            weights = (token_mask > 0)[..., None].astype(np.float32)
            tensors = [t * weights for t in tensors]
        # Grams in float32 (fp16 ones overflow; float64 products cost 7× more), factored in float64
        stacks = [_per_head(t.astype(np.float32, copy=False), heads, d) for t in tensors]
        samples = q.shape[0]
        self.count += samples
        if not self.softmax_only:
            self._add_scores(stacks, samples, q_original is not None)
        if self.softmax is not None:
            originals = (stacks[2], stacks[3]) if q_original is not None else (stacks[0], stacks[1])
            matching = token_mask is not None and token_mask.shape[:2] == q.shape[:2]
            add_sums(self.softmax, stacks[0], stacks[1], *originals, token_mask if matching else None,
                     self.causal_scale)

    def _add_scores(self, stacks: list[np.ndarray], samples: int, originals: bool) -> None:
        """SNP's pair scores and the Grams of the rescale (`rescales`), from (samples·heads, N, d) stacks."""
        heads, d = self.scores.shape
        gram_q = (np.swapaxes(stacks[0], -1, -2) @ stacks[0]).astype(np.float64)
        gram_k = (np.swapaxes(stacks[1], -1, -2) @ stacks[1]).astype(np.float64)
        scores = pair_scores_from_grams(gram_q, gram_k, self.energy, (stacks[0], stacks[1]))
        self.scores += scores.reshape(samples, heads, d).sum(axis=0)
        self.gram += (gram_q * gram_k).reshape(samples, heads, d, d).sum(axis=0)
        self.gram_q += gram_q.reshape(samples, heads, d, d).sum(axis=0)
        self.gram_k += gram_k.reshape(samples, heads, d, d).sum(axis=0)
        if not originals:
            cross = (gram_q * gram_k).sum(axis=-1)
        else:
            cross_q = (np.swapaxes(stacks[0], -1, -2) @ stacks[2]).astype(np.float64)
            cross_k = (np.swapaxes(stacks[1], -1, -2) @ stacks[3]).astype(np.float64)
            cross = (cross_q * cross_k).sum(axis=-1)
        self.cross += cross.reshape(samples, heads, d).sum(axis=0)

    def merge(self, other: "PairStatistics") -> None:
        """Add `other`'s sums (another batch's, or another shard's) to these."""
        self.scores += other.scores
        self.gram += other.gram
        self.cross += other.cross
        self.gram_q += other.gram_q
        self.gram_k += other.gram_k
        self.count += other.count
        self.softmax_only = self.softmax_only or other.softmax_only  # its scores are zeros, not measured
        if other.norm_energy is not None:
            mine = self.norm_energy or (0.0, 0.0)
            self.norm_energy = (mine[0] + other.norm_energy[0], mine[1] + other.norm_energy[1])
            self.norm_tokens += other.norm_tokens
        if other.softmax is not None:
            if self.softmax is None:
                self.causal_scale = other.causal_scale
                self.softmax = SoftmaxSums.empty(*self.scores.shape, other.softmax.units, other.softmax.softcap)
            self.softmax.merge(other.softmax)

    def add_norm_energy(self, q: np.ndarray, k: np.ndarray, d: int, token_mask: np.ndarray | None) -> None:
        """q's and k's values before a per-head QK-norm, (samples, tokens, heads·d) (k: its own heads)."""
        (energy_q, tokens), (energy_k, _) = norm_energy(q, d, token_mask), norm_energy(k, d, token_mask)
        mine = self.norm_energy or (0.0, 0.0)
        self.norm_energy = (mine[0] + energy_q, mine[1] + energy_k)
        self.norm_tokens += tokens

    def mean_scores(self) -> np.ndarray:
        return self.scores / max(self.count, 1)

    def rescales(self, keep: AttentionKeep, ridge: float) -> np.ndarray:
        """A factor per kept pair, (kept heads, kept pairs): min_α ‖Σ_K α_n q̂_n k̂_nᵀ − Σ_all q_m k_mᵀ‖²
        plus ridge·‖α − 1‖² (the ridge pulls towards the pairs as they are). As a map of q
        (`plan.selection_map(keep.qk, d, factors)`), the softmax scale stays the original one."""
        # one factor per unit: shared by the query heads of a key/value group and by both dims of a
        # rotary pair (α = P·β), so the least squares are summed over the group's heads
        block, rows = keep.block, []
        r = block.group_size
        for head, kept in zip(keep.heads, keep.qk):
            members = np.arange(head * r, (head + 1) * r)
            to_units = units.unit_matrix(block, kept)
            system = to_units.T @ self.gram[members][:, kept][:, :, kept].sum(axis=0) @ to_units
            cross = to_units.T @ self.cross[members][:, kept].sum(axis=0)
            penalty = ridge * float(np.mean(np.diag(system)))
            try:
                rows.append(to_units @ np.linalg.solve(system + penalty * np.eye(len(system)), cross + penalty))
            except np.linalg.LinAlgError:
                rows.append(np.ones(len(kept)))
        return np.array(rows)


def _per_head(x: np.ndarray, heads: int, d: int) -> np.ndarray:
    """(samples, tokens, heads·d) → (samples·heads, tokens, d)."""
    samples, tokens = x.shape[:2]
    return x.reshape(samples, tokens, heads, d).transpose(0, 2, 1, 3).reshape(-1, tokens, d)


class Scorer:
    """Collects per-neuron statistics batch by batch, then turns them into a PrunePlan."""

    def __init__(self, g: ModelGraph, matches: Matches, criterion: str, energy: float = DEFAULT_ENERGY,
                 score_layers: bool = False, stream: ResidualStream | None = None,
                 residual_criterion: str = "weights"):
        self.g = g
        self.matches = matches
        self.criterion: Criterion = criterion_named(criterion)
        self.energy = energy
        self.pairs = {b.name: PairStatistics.empty(b.heads, b.head_dim, energy) for b in matches.attention}
        self.sq_sum: dict[str, np.ndarray] = {}
        self.scale_values: dict[str, np.ndarray] = {}
        self.layer_change = np.zeros(len(matches.layers))  # Σ‖out − in‖² per transformer block
        self.layer_input = np.zeros(len(matches.layers))  # Σ‖in‖²
        self.score_layers = score_layers  # capture each transformer block's input and output
        self.stream = stream
        self.residual_criterion = residual_criterion  # "weights" or "activation"
        self.channel_sum = np.zeros(stream.width) if stream is not None else None  # Σ_t rms_c(t) / rms(t)

    def pairs_measured(self) -> bool:
        return any(p.count for p in self.pairs.values())

    def tensors(self) -> list[str]:
        """Intermediate tensors that calibration must capture."""
        wanted: list[str] = []
        for block in self.matches.attention:
            wanted += [s.tensor for s in block.frozen_scales]
            if self.criterion.measures_qk:
                wanted += query_key_tensors(block)
            if self.criterion.measures_values:
                wanted.append(block.v_input)  # V neurons (snp) and whole heads are scored by their output
        if self.criterion.measures_hidden:
            wanted += [f.fc2.input for f in self.matches.ffn]
        if self.score_layers:
            wanted += [t for layer in self.matches.layers for t in (layer.input, layer.output)]
        if self.stream is not None and self.residual_criterion == "activation":
            wanted += [t for layer in self.matches.layers for t in (layer.input, layer.output)]
        return list(dict.fromkeys(wanted))

    def update(self, acts: dict[str, np.ndarray], samples: int, token_mask: np.ndarray | None = None) -> None:
        for block in self.matches.attention:
            for scale in block.frozen_scales:
                self.scale_values.setdefault(scale.tensor, np.array(acts[scale.tensor]))  # a copy: see Runner.batches
            if self.criterion.measures_qk:
                self._update_qk(block, *query_key(self.g, block, acts, samples), token_mask)
            if self.criterion.measures_values:
                self._update_sq(block.v_input, _as_tokens(acts[block.v_input], samples), token_mask)
        if self.criterion.measures_hidden:
            for ffn in self.matches.ffn:
                self._update_sq(ffn.fc2.input, _as_tokens(acts[ffn.fc2.input], samples), token_mask)
        if self.stream is not None and self.residual_criterion == "activation":
            for tensor in dict.fromkeys(t for layer in self.matches.layers for t in (layer.input, layer.output)):
                values = _as_tokens(acts[tensor], samples).astype(np.float64)
                if token_mask is not None and token_mask.shape[:2] == values.shape[:2]:
                    values = values[token_mask > 0]
                channel_rms = np.sqrt((values.reshape(-1, values.shape[-1]) ** 2).mean(axis=0))
                # each stream tensor counts alike, whatever its overall scale
                self.channel_sum += channel_rms / max(float(np.sqrt((channel_rms ** 2).mean())), 1e-30)
        if self.score_layers:
            for index, layer in enumerate(self.matches.layers):
                before = _as_tokens(acts[layer.input], samples).astype(np.float64)
                after = _as_tokens(acts[layer.output], samples).astype(np.float64)
                if token_mask is not None and token_mask.shape[:2] == before.shape[:2]:
                    before, after = before[token_mask > 0], after[token_mask > 0]
                self.layer_change[index] += ((after - before) ** 2).sum()
                self.layer_input[index] += (before ** 2).sum()

    def _update_qk(self, block: AttentionBlock, q_all: np.ndarray, k_all: np.ndarray,
                   token_mask: np.ndarray | None) -> None:
        self.pairs[block.name].add(q_all, k_all, token_mask)

    def _update_sq(self, tensor: str, act: np.ndarray, token_mask: np.ndarray | None) -> None:
        tokens = act.astype(np.float32, copy=False)  # squares in float32, summed in float64
        if token_mask is not None and token_mask.shape[:2] == tokens.shape[:2]:
            tokens = tokens[token_mask > 0]
        squares = np.square(tokens.reshape(-1, tokens.shape[-1])).sum(axis=0, dtype=np.float64)
        self.sq_sum[tensor] = self.sq_sum.get(tensor, 0) + squares

    # --- decisions ----------------------------------------------------------------------------
    def removed_layers(self, ratios: Ratios) -> list[Layer]:
        """The transformer blocks to drop: those given, or the ones whose output differs least
        (relative to their input) from their input on calibration data."""
        layers = self.matches.layers
        if ratios.block_indices:
            return [layers[i] for i in sorted(set(ratios.block_indices))]
        if not ratios.blocks:
            return []
        change = np.sqrt(self.layer_change / np.maximum(self.layer_input, 1e-30))
        return [layers[i] for i in sorted(np.argsort(change, kind="stable")[:ratios.blocks])]

    def plan(self, ratios: Ratios, seed: int = 0) -> PrunePlan:
        rng = np.random.default_rng(seed)
        removed = self.removed_layers(ratios)
        gone = {layer.attention for layer in removed} | {layer.ffn for layer in removed}
        attention = []
        for block in self.matches.attention:
            if block in gone:
                continue
            qk_scores, v_scores = self._attention_scores(block, rng)
            heads = np.arange(block.groups)  # key/value heads, each with its query heads
            if ratios.heads > 0 and block.heads_fixed is None:
                keep = kept_count(block.groups, ratios.heads)
                heads = np.sort(np.argsort(-self._head_scores(block, rng), kind="stable")[:keep])
            d = block.head_dim
            qk = units.keep_qk(block, qk_scores, kept_count(d, ratios.qk, ratios.align))[heads]
            v_kept = qk.shape[1] if block.equal_widths else kept_count(d, ratios.v, ratios.align)
            attention.append(AttentionKeep(block, qk, _top_per_head(v_scores[heads], v_kept), heads))
        ffn = []
        for block in self.matches.ffn:
            if block in gone:
                continue
            scores = self._ffn_scores(block, rng)
            keep = np.sort(np.argsort(-scores, kind="stable")[:kept_count(block.hidden, ratios.ffn, ratios.align)])
            ffn.append(FfnKeep(block, keep))
        stream_keep = None
        if self.stream is not None and ratios.residual > 0:
            scores = self._channel_scores(rng)
            stream_keep = np.sort(np.argsort(-scores, kind="stable")[:kept_count(self.stream.width, ratios.residual,
                                                                                   ratios.align)])
        return PrunePlan(tuple(attention), tuple(ffn), dict(self.scale_values), tuple(removed),
                         self.stream if stream_keep is not None else None, stream_keep)

    def _channel_scores(self, rng: np.random.Generator) -> np.ndarray:
        """Residual channels (criterion random: random): "weights" (default) sums the norms of the
        weights that read and write each channel, each matrix normalised by its RMS norm;
        "activation" sums each channel's RMS over the stream tensors on calibration data, each
        tensor normalised by its own RMS. Weights kept more on the digits ViT (README)."""
        stream = self.stream
        assert stream is not None
        return self.criterion.channel_scores(stream.width, self._measured_channels, rng)

    def _measured_channels(self) -> np.ndarray:
        stream = self.stream
        assert stream is not None
        if self.residual_criterion == "activation":
            return self.channel_sum
        total = np.zeros(stream.width)
        for linear in stream.readers:
            rows = np.linalg.norm(input_weights(self.g, linear), axis=1)
            total += rows / max(np.sqrt((rows ** 2).mean()), 1e-30)
        for linear in stream.writers:
            columns = np.linalg.norm(output_weights(self.g, linear), axis=0)
            total += columns / max(np.sqrt((columns ** 2).mean()), 1e-30)
        return total

    def _activations(self, tensor: str):
        """‖x_i‖ over the calibration tokens of a captured tensor, when a criterion asks."""
        return lambda: np.sqrt(self.sq_sum[tensor])

    def _attention_scores(self, block: AttentionBlock, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Q/K dim scores per query head (heads, d) and V neuron scores per key/value head (groups, d)."""
        return (self.criterion.pair_scores(self.g, block, self.pairs[block.name], rng),
                self.criterion.value_scores(self.g, block, self._activations(block.v_input), rng))

    def _head_scores(self, block: AttentionBlock, rng: np.random.Generator) -> np.ndarray:
        return self.criterion.head_scores(self.g, block, self._activations(block.v_input), rng)

    def _ffn_scores(self, block: FfnBlock, rng: np.random.Generator) -> np.ndarray:
        return self.criterion.ffn_scores(self.g, block, self._activations(block.fc2.input), rng)


def query_key_tensors(block: AttentionBlock) -> list[str]:
    """What to capture for a block's q and k: the rotated q and k where a rotary embedding is
    written out, else the projections' outputs, or (inside a fused op, where they have none)
    their input."""
    if block.qk_tensors is not None:
        return list(block.qk_tensors)
    return list(dict.fromkeys([block.q.output or block.q.input, block.k.output or block.k.input]))


def query_key(g: ModelGraph, block: AttentionBlock, acts: dict[str, np.ndarray], samples: int,
              from_inputs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """q and k of every query head, (samples, tokens, heads × head_dim), from the captured tensors
    (`from_inputs`: computed from the projections' inputs even where their outputs exist); rotated
    where a rotary embedding rotates them, and k repeated for every query head of its group."""
    if block.qk_tensors is not None and not from_inputs:
        q, k = (_merged_heads(acts[t], rotary.heads_axis, samples) for t, rotary in zip(block.qk_tensors, block.rotary))
    else:
        width, kv_width = block.heads * block.head_dim, block.groups * block.head_dim
        q_off, k_off, _ = block.column_offsets
        q = projection_values(g, block.q, acts, samples, q_off, width, from_inputs)
        k = projection_values(g, block.k, acts, samples, k_off, kv_width, from_inputs)
        if block.packed_bias is not None:  # biases added inside MultiHeadAttention
            bias = g.constant(block.packed_bias).astype(np.float64)
            q, k = q + bias[:width], k + bias[width:2 * width]
        if block.qk_norm is not None:  # a per-head QK-norm between the projections and the rotary embedding
            q, k = normalized(g, block, q, 0), normalized(g, block, k, 1)
        if block.rotary:  # an op's own embedding serves q and k alike
            rotaries = block.rotary if len(block.rotary) == 2 else block.rotary * 2
            q, k = (rotate(g, block, x, rotary, acts) for x, rotary in zip((q, k), rotaries))
    if block.group_size > 1:
        d = block.head_dim
        k = np.repeat(k.reshape(*k.shape[:-1], block.groups, d), block.group_size, axis=-2).reshape(*k.shape[:-1], -1)
    return q, k


def projected(g: ModelGraph, block: AttentionBlock, acts: dict[str, np.ndarray], samples: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """q and k as their projections give them, from the projections' inputs (before a norm or a
    rotary embedding): (samples, tokens, heads·d) and (samples, tokens, key/value heads·d)."""
    d = block.head_dim
    q_off, k_off, _ = block.column_offsets
    return (projection_values(g, block.q, acts, samples, q_off, block.heads * d, True),
            projection_values(g, block.k, acts, samples, k_off, block.groups * d, True))


def _merged_heads(x: np.ndarray, heads_axis: int, samples: int) -> np.ndarray:
    """A per-head tensor (…, H, …, N, d) as (samples, tokens, H·d)."""
    moved = np.moveaxis(x, heads_axis, -2)
    return _as_tokens(moved.reshape(*moved.shape[:-2], -1), samples)


def rotary_tables(g: ModelGraph, block: AttentionBlock) -> list[str]:
    """The cos and sin tables of a block's written-out rotary embeddings and RotaryEmbedding ops
    (computed at run time from the positions: captured where q and k are computed from the
    projections' inputs)."""
    return [g.node(node).input[index] for rotary in block.rotary if not rotary.shared or rotary.per_token
            for node, index in rotary.tables]


def rotate(g: ModelGraph, block: AttentionBlock, x: np.ndarray, rotary, acts: dict[str, np.ndarray]) -> np.ndarray:
    """(samples, tokens, heads·d) rotated as `rotary` does: x·cos + rotate(x)·sin. The tables are
    an attention op's caches (positions × d/2, read at positions 0…tokens−1: prefill), a
    RotaryEmbedding op's captured ones (samples × tokens × d/2) or a written-out embedding's
    captured ones (one column per dim)."""
    from ..match.blocks import RotaryStyle

    samples, tokens, d = x.shape[0], x.shape[1], block.head_dim
    interleaved = rotary.style is RotaryStyle.INTERLEAVED
    tables = []
    for node, index in rotary.tables:
        tensor = g.node(node).input[index]
        if rotary.shared:  # one column per pair, the same for every head
            if rotary.per_token:  # (samples, tokens, d/2), captured
                half = acts[tensor].astype(np.float64).reshape(-1, tokens, d // 2)[:, :, None]
            else:  # (positions, d/2), read at positions 0…tokens−1
                half = g.constant(tensor).astype(np.float64)[:tokens][None, :, None]
            tables.append(np.repeat(half, 2, axis=-1) if interleaved else np.concatenate([half, half], -1))
        else:  # (…, 1, N, d) broadcast over the heads axis
            value = np.moveaxis(acts[tensor].astype(np.float64), rotary.heads_axis, -2)
            tables.append(value.reshape(-1, *value.shape[-3:]) if value.ndim > 3 else value[None])
    whole = x.reshape(samples, tokens, -1, d).astype(np.float64)
    r = rotary.rotated or d  # a partial embedding rotates the first r dims and passes the rest
    per_head = whole[..., :r]
    turned = np.empty_like(per_head)  # rotate(x): (−x₂, x₁) per pair
    if interleaved:
        turned[..., 0::2], turned[..., 1::2] = -per_head[..., 1::2], per_head[..., 0::2]
    else:
        turned[..., :r // 2], turned[..., r // 2:] = -per_head[..., r // 2:], per_head[..., :r // 2]
    cos, sin = tables
    return np.concatenate([per_head * cos + turned * sin, whole[..., r:]], axis=-1).reshape(x.shape)


def projection_values(g: ModelGraph, linear: Linear, acts: dict[str, np.ndarray], samples: int, offset: int,
                      width: int, from_input: bool = False) -> np.ndarray:
    """Columns offset…offset+width of a projection's output, (samples, tokens, width)."""
    if linear.output is not None and not from_input:
        return _as_tokens(acts[linear.output], samples)[..., offset:offset + width]
    x = _as_tokens(acts[linear.input], samples).astype(np.float64)
    # one 2-D product, not a stack of per-sample ones (each of which BLAS would thread on its own)
    result = (x.reshape(-1, x.shape[-1]) @ output_weights(g, linear, offset, width)).reshape(*x.shape[:-1], width)
    if linear.bias is not None:
        result += g.constant(linear.bias).reshape(-1)[offset:offset + width]
    return result


def _as_tokens(act: np.ndarray, samples: int) -> np.ndarray:
    """View an activation as (samples, tokens, features); exports that flatten tokens to
    (samples·tokens, features) are split back per sample."""
    if act.ndim == 2 and act.shape[0] % samples == 0:
        return act.reshape(samples, -1, act.shape[-1])
    if act.ndim < 2:
        raise ValueError(f"activation of shape {act.shape} has no feature axis")
    return act.reshape(act.shape[0], -1, act.shape[-1])


def _top_per_head(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores in each row, ascending."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return np.sort(order, axis=1)
