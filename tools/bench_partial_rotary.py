"""Decoders with a partial rotary embedding → a section of docs/DECODER_FAMILIES.md: tiny random
transformers models exported by torch's dynamo exporter with a KV cache (tools/decoder_export.py):
StableLM 2 (a quarter of each head's dims rotated, grouped-query attention), Phi-2 (half, parallel
attention + MLP), GPT-NeoX (a quarter, a fused per-head q|k|v projection, parallel residual) and a
Phi-3 with Phi-4-mini's three quarters (a fused qkv_proj). The columns are bench_decoder_families.py's.

    python tools/bench_partial_rotary.py [--out docs/DECODER_FAMILIES.md]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import DOCS

from bench_decoder_families import CUTS, decode_gap

from onnxsnp.errors import SnpError
from onnxsnp.options import make_options
from onnxsnp.report.inspection import inspect_model
from onnxsnp.pipeline import prune_model

SECTION = "## Partial rotary embeddings"


def models(folder: Path) -> list[tuple[str, Path]]:
    import torch
    import transformers as T
    from decoder_export import export_dynamo, tiny_partial_rotary

    found = [(family, export_dynamo(tiny_partial_rotary(family), folder / f"{family}.onnx"))
             for family in ("stablelm", "phi", "neox")]
    torch.manual_seed(0)
    phi4 = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                          partial_rotary_factor=0.75, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    return found + [("phi3, rotary 0.75 (Phi-4-mini's)", export_dynamo(phi4.eval(), folder / "phi4mini.onnx"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "DECODER_FAMILIES.md")
    args = parser.parse_args()
    rows = ["| model (dynamo) | attention / FFN / layers matched | skipped | options | first attention: heads, Q/K, "
            "V per head | FLOPs | cached step vs uncached |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models(Path(tmp)):
            matches = inspect_model(path).matches
            found = f"{len(matches.attention)} / {len(matches.ffn)} / {len(matches.layers)}"
            skipped = "; ".join(sorted({s.reason for s in matches.skipped})) or "–"
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
                            f"−{1 - report.flops_after / report.flops_before:.1%} | {decode_gap(result.model, 100):.1e} |")
            print("\n".join(rows[-len(CUTS):]), flush=True)
    page = args.out.read_text()
    start = page.find(f"\n{SECTION}")
    after = page.find("\n## ", start + 1) if start >= 0 else -1
    rest = page[after:] if after >= 0 else ""
    head = page[:start] if start >= 0 else page.rstrip("\n") + "\n"
    section = f"""
{SECTION}

Measured by `python tools/bench_partial_rotary.py` (CPU, one run, synthetic calibration). {__doc__.split(chr(10), 2)[2].split("    python")[0].strip()}

{chr(10).join(rows)}

Only the first r of each head's d dims rotate (q = Concat(rotary(q[..., :r]), q[..., r:]),
`match/partial_rotary.py`): the rotated dims are kept or removed in pairs (j, j + r/2) with their
cos/sin columns, the passed-through ones in adjacent pairs; the split points r and r/2 are literals
the cut rewrites, one for all heads, so every head keeps the same Q/K dims. Phi-2's parallel
blocks (x + attn(LN(x)) + mlp(LN(x))) are pruned unit by unit with the one-pass refit;
whole-block removal and the block-by-block refit, which need sequential blocks, skip them by name.
Not matched (the reasons above): GPT-NeoX's per-head q|k|v layout of its fused projection, and
Phi-3's fused qkv_proj taken apart by Slices (issue of the Phi-3 work, not of the rotary).
StableLM 2 and Phi-2 are matched and pruned the same way from optimum's `text-generation-with-past` exports, whose
rotate_half split is computed at run time (tests/test_partial_rotary_families.py; not in this table).
"""
    args.out.write_text(head + section + rest)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
