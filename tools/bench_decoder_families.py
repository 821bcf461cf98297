"""Decoder families as exported → docs/DECODER_FAMILIES.md: what onnxsnp matches and prunes in
each, built locally with random weights (what is matched and cut does not depend on the weights;
fidelity does — see docs/DECODERS_REAL.md and docs/DECODERS_GEMMA3.md for real checkpoints —
and tiny models' run times are dispatch overhead, not a speed measurement):

- optimum `text-generation-with-past` exports (tools/optimum_export.py, the tests' optimum venv) of
  Llama (no QK-norm, for comparison), Qwen3 (QK-norm per head), Gemma 3 (QK-norm, GELU(tanh)-gated
  MLP, sandwich norms, a sliding-window and a global layer) and OLMo 2 (one norm over all heads'
  q and k, norms after each sub-block);
- torch's dynamo exporter with a KV cache (tools/decoder_export.py) of Phi-3 (q | k | v from one
  qkv_proj and gate | up from one gate_up_proj, each taken apart along its features; Phi-4-mini's
  shape: that with a partial rotary embedding), Mistral (a sliding window of 4: the cache sliced to
  its last positions before and after the join) and Cohere (an interleaved rotary flattened with
  literal head counts; attention and MLP in parallel, so no whole blocks: the one-pass refit). Gemma 2
  and Gemma 3 by the same exporter are matched too (tests/test_decoder_families.py) but not listed:
  the exporter's own graph fails a cached step past its sliding window;
- the same exporter's partial rotary embeddings (only the first r of each head's d dims rotated):
  StableLM 2 (a quarter, grouped-query attention), Phi-2 (half, parallel attention + MLP) and
  GPT-NeoX (a quarter, a per-head q|k|v layout of its fused projection, parallel residual);
- onnxruntime-genai's model builder (fp32 and int4) on a Qwen3 and a Gemma 3 folder
  (tools/decoder_export.py; Gemma 3 through tools/genai_builder.py).

For each: blocks matched (attention / FFN / whole layers) and skipped; then `--ratio 0.25` and
`--ratio 0.5 --heads 0.5` (synthetic calibration): the kept widths of the first attention, the
measured FLOPs cut, and whether a cached decode step of the pruned model gives the logits of an
uncached run (max |difference| over a prefill of 7 tokens then 1, against 8 at once; Gemma 3's
sliding window is 4, so its local layer's mask and cache are exercised: in the genai folders a
ring buffer of 4 slots).

    python tools/bench_decoder_families.py [--out docs/DECODER_FAMILIES.md]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from harness import DOCS

from optimum_venv import export_optimum
from decoders import run, step_feed

from onnxsnp.errors import SnpError
from onnxsnp.options import make_options
from onnxsnp.report.inspection import inspect_model
from onnxsnp.pipeline import prune_model

CUTS = [("--ratio 0.25", {"ratio": 0.25}), ("--ratio 0.5 --heads 0.5", {"ratio": 0.5, "heads": 0.5})]


def models(folder: Path) -> list[tuple[str, Path]]:
    from decoder_export import (export_dynamo, export_genai, save_folder, tiny_cohere, tiny_gemma3, tiny_mistral,
                                tiny_partial_rotary, tiny_phi3, tiny_qwen3)

    found = [(f"{family} (optimum)", export_optimum(folder / family, family, "optimum"))
             for family in ("llama", "qwen3", "gemma3", "olmo2")]
    found += [("phi3 (dynamo)", export_dynamo(tiny_phi3(), folder / "phi3-dynamo.onnx")),
              ("phi4-mini shape (dynamo)", export_dynamo(tiny_phi3(hidden=64, rotary=0.75), folder / "phi4-dynamo.onnx")),
              ("mistral (dynamo)", export_dynamo(tiny_mistral(), folder / "mistral-dynamo.onnx")),
              ("cohere (dynamo)", export_dynamo(tiny_cohere(), folder / "cohere-dynamo.onnx"))]
    found += [(f"{family} (dynamo)", export_dynamo(tiny_partial_rotary(family), folder / f"{family}-dynamo.onnx"))
              for family in ("stablelm", "phi", "neox")]
    for family, tiny in (("qwen3", tiny_qwen3), ("gemma3", tiny_gemma3)):
        source = save_folder(tiny(), folder / f"{family}-source")
        found += [(f"{family} (genai {precision})",
                   export_genai(source, folder / f"{family}-genai-{precision}", precision) / "model.onnx")
                  for precision in ("fp32", "int4")]
    return found


def decode_gap(model: onnx.ModelProto, vocab: int) -> float:
    """Cached step against uncached run; the step's position given, not read off the cache (a
    sliding-window cache holds fewer positions than it has seen)."""
    ids = np.random.default_rng(2).integers(3, vocab, (2, 8))
    first = run(model, step_feed(model, ids[:, :7]))
    past = {name.replace("present", "past_key_values"): value for name, value in first.items()
            if name.startswith("present")}
    step = run(model, step_feed(model, ids[:, 7:], past, start=7))
    whole = run(model, step_feed(model, ids))
    return float(np.abs(step["logits"][:, -1] - whole["logits"][:, -1]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "DECODER_FAMILIES.md")
    args = parser.parse_args()
    rows = ["| model | attention / FFN / layers matched | skipped | options | first attention: heads, Q/K, V per head "
            "| FLOPs | cached step vs uncached |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models(Path(tmp)):
            matches = inspect_model(path).matches
            found = f"{len(matches.attention)} / {len(matches.ffn)} / {len(matches.layers)}"
            skipped = "; ".join(sorted({s.reason for s in matches.skipped})) or "–"
            vocab = 300 if "genai" in label else 100
            for options, extra in CUTS:
                try:
                    result = prune_model(str(path), make_options(measure_latency=False, **extra))
                except SnpError as why:
                    rows.append(f"| {label} | {found} | {skipped} | `{options}` | not pruned: {why} | – | – |")
                    continue
                report = result.report
                first = next((b for b in report.blocks if b.kind == "attention"), None)
                widths = "–" if first is None else (f"{first.heads}→{first.heads_after}, {first.qk_dim_before}→"
                                                     f"{first.qk_dim_after}, {first.v_dim_before}→{first.v_dim_after}")
                rows.append(f"| {label} | {found} | {skipped} | `{options}` | {widths} | "
                            f"−{1 - report.flops_after / report.flops_before:.1%} | "
                            f"{decode_gap(result.model, vocab):.1e} |")
                print(rows[-1], flush=True)
    # the page's later sections (measured by other tools) are kept as they are
    previous = args.out.read_text() if args.out.exists() else ""
    kept = previous[previous.index("\n## "):] if "\n## " in previous else ""
    args.out.write_text(f"""# Decoder families: what is matched and pruned

Measured by `python tools/bench_decoder_families.py` (CPU, one run), {__doc__.split(chr(10), 1)[1].split("    python")[0].strip()}

{chr(10).join(rows)}

By default a QK-norm (an RMSNorm over each head's q and k: Qwen3, Gemma 3) keeps every Q/K dim of a
kept head: removing dims changes the statistic the norm divides by. Whole key/value groups (with their
query heads) can still go. `--qk-norm-cut sliced|calibrated` cuts Q/K dims within such heads too (see
"Q/K within QK-normed heads" below). OLMo 2 normalises q and k over all heads at once, so its heads stay too;
V and the output projection are cut in every family. onnxruntime-genai's GroupQueryAttention takes
one head size for Q/K and V, so with a QK-norm a genai folder's attention is cut by whole groups only.

A partial rotary embedding (q = Concat(rotary(q[..., :r]), q[..., r:]), `match/partial_rotary.py`)
keeps or removes its rotated dims in pairs (j, j + r/2) with their cos/sin columns and the
passed-through ones in adjacent pairs; the split points r and r/2 are literals the cut rewrites,
one for all heads, so every head keeps the same Q/K dims. Parallel blocks (Phi-2, Cohere:
x + attn(LN(x)) + mlp(LN(x))) are pruned unit by unit with the one-pass refit; whole-block removal
and the block-by-block refit, which need sequential blocks, skip them by name. GPT-NeoX's per-head
q|k|v layout is not matched (the reason in its row). StableLM 2 and Phi-2 are matched and pruned the
same way from optimum's exports, whose rotate_half split is computed at run time
(tests/test_partial_rotary_families.py; not in this table).
{kept}""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
