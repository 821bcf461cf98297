"""The registry of hand-built attention forms: every graph of tests/graphs.py and
tests/decoder_graphs.py that a match rule reads, by name, with how to calibrate and run it.

tests/test_conformance.py prunes each one and compares it with the masked original;
test_rules.py checks each encoder form's match. A new attention form adds its builder to
graphs.py or decoder_graphs.py and an entry here (docs/DEVELOPMENT.md)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx

import decoder_graphs as dg
import graphs
from onnxsnp.match.blocks import AttentionForm
from onnxsnp.plan import Ratios

CALIB_SAMPLES = 4


class Family(Enum):
    """How a graph is fed: what its inputs are."""

    ENCODER = "encoder"  # graphs.py: x (1, TOKENS, WIDTH) → y
    DECODER = "decoder"  # decoder_graphs.decoder_attention: x, position tables, past key/value → y, present
    GQA = "gqa"  # decoder_graphs.group_query_attention: x, past key/value, seqlens_k, total length


@dataclass(frozen=True)
class GraphForm:
    build: Callable[[], onnx.ModelProto]
    form: AttentionForm  # what the match must call it
    family: Family
    ratios: Ratios = Ratios(0.5, 0.25, 0.0)  # Q/K at 0.5, V at 0.25: Q/K and V end at different widths
    rotary: str | None = None  # decoder_graphs' rotary style, for its feeds

    def feed(self, model: onnx.ModelProto, tokens: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
        """One sample's inputs (an empty cache for decoders)."""
        if self.family is Family.ENCODER:
            x = np.random.default_rng(seed).standard_normal((1, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)
            return {"x": x}
        if self.family is Family.DECODER:
            return dg.feed(model, tokens, style=self.rotary, seed=seed)
        return dg.gqa_feed(model, tokens, seed=seed)

    def calibration(self, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], int]:
        """Calibration arrays and the batch to run them in, as the per-form tests calibrate."""
        if self.family is Family.ENCODER:
            x = np.random.default_rng(0).standard_normal((CALIB_SAMPLES, graphs.TOKENS, graphs.WIDTH))
            return {"x": x.astype(np.float32)}, CALIB_SAMPLES
        one = self.feed(model, 6, seed=0)
        calib = {k: np.repeat(v, CALIB_SAMPLES, axis=0) if k == "x" else v for k, v in one.items()}
        if self.family is Family.GQA:  # the op reads one sequence length per sample
            calib["seqlens_k"] = np.repeat(calib["seqlens_k"], CALIB_SAMPLES)
            return calib, 1
        return calib, CALIB_SAMPLES


FORMS: dict[str, GraphForm] = {
    "softmax": GraphForm(graphs.softmax_attention, AttentionForm.SEPARATE, Family.ENCODER),
    "onnx-attention": GraphForm(graphs.onnx_attention, AttentionForm.SEPARATE, Family.ENCODER),
    "ort-attention": GraphForm(graphs.ort_attention, AttentionForm.ORT_ATTENTION, Family.ENCODER),
    "ort-mha": GraphForm(graphs.ort_multi_head_attention, AttentionForm.ORT_MHA, Family.ENCODER),
    "fused-matmul": GraphForm(graphs.fused_matmul_scores, AttentionForm.SEPARATE, Family.ENCODER),
    **{f"fused-{s.lower()}": GraphForm(lambda s=s: graphs.fused_qkv(s), AttentionForm.FUSED_QKV, Family.ENCODER)
       for s in ("Split", "Slice", "Gather")},
    "fused-split-features": GraphForm(graphs.fused_split, AttentionForm.FUSED_SPLIT, Family.ENCODER),
    "fused-split-first": GraphForm(lambda: graphs.fused_qkv(split_first=True), AttentionForm.FUSED_QKV, Family.ENCODER),
    "conv1d-out": GraphForm(graphs.conv1d_out_projection, AttentionForm.SEPARATE, Family.ENCODER),
    "activation-qdq": GraphForm(lambda: graphs.softmax_attention(qdq="tensor"), AttentionForm.SEPARATE, Family.ENCODER),
    "decoder-gqa-half": GraphForm(lambda: dg.decoder_attention(2, "half"), AttentionForm.SEPARATE, Family.DECODER,
                                  rotary="half"),
    "decoder-mqa-half": GraphForm(lambda: dg.decoder_attention(1, "half"), AttentionForm.SEPARATE, Family.DECODER,
                                  rotary="half"),
    "decoder-mha-half": GraphForm(lambda: dg.decoder_attention(dg.HEADS, "half"), AttentionForm.SEPARATE,
                                  Family.DECODER, rotary="half"),
    "decoder-interleaved": GraphForm(lambda: dg.decoder_attention(2, "interleaved"), AttentionForm.SEPARATE,
                                     Family.DECODER, rotary="interleaved"),
    "decoder-split-half": GraphForm(lambda: dg.decoder_attention(2, "half-split"), AttentionForm.SEPARATE,
                                    Family.DECODER, rotary="half-split"),
    "decoder-rotary-op": GraphForm(lambda: dg.decoder_attention(2, "ort-op"), AttentionForm.SEPARATE, Family.DECODER,
                                   rotary="ort-op"),
    "decoder-no-rotary": GraphForm(lambda: dg.decoder_attention(2, None), AttentionForm.SEPARATE, Family.DECODER),
    "decoder-qk-norm-head": GraphForm(lambda: dg.decoder_attention(2, "half", qk_norm="head"), AttentionForm.SEPARATE,
                                      Family.DECODER, rotary="half"),
    "decoder-qk-norm-all": GraphForm(lambda: dg.decoder_attention(2, "half", qk_norm="all"), AttentionForm.SEPARATE,
                                     Family.DECODER, rotary="half"),
    # GroupQueryAttention keeps head sizes in multiples of 16 of its 32: 0.6 of Q/K cut rounds to 16 kept
    "ort-gqa-packed": GraphForm(dg.group_query_attention, AttentionForm.ORT_GQA, Family.GQA, Ratios(0.6, 0.2, 0.0)),
    "ort-gqa-separate": GraphForm(lambda: dg.group_query_attention(separate=True), AttentionForm.ORT_GQA, Family.GQA,
                                  Ratios(0.6, 0.2, 0.0)),
}

# AttentionForm members no hand-built graph makes, each with why.
EXPORT_ONLY = {
    AttentionForm.PACKED: "no rule makes it: match/attention.py's _packed_block falls back to it for a core with a "
                          "packed q|k|v projection and no form, and both rules that read a packed projection name "
                          "theirs (ORT_ATTENTION, ORT_GQA: ort-attention, ort-gqa-packed above)",
}
