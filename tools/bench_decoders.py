"""Fidelity of pruned decoders on a real (small, trained) language model → docs/DECODERS.md.

The model is tools/train_tiny_llama.py's: a Llama-architecture LM trained on the standard
library's docstrings and comments, exported with a KV cache by torch's dynamo exporter and by
onnxruntime-genai's model builder. For 20, 30 and 50 % fewer FLOPs — the uniform ratio that first
reaches the cut, found by bisection on the pruned model's measured FLOPs — each method prunes it,
calibrated on 128 windows of training text, and is measured on held-out text (modules the model
never saw):

- perplexity (teacher-forced, every position of 64 windows of 64 tokens);
- next-token agreement: the share of those positions where the pruned model's most likely next
  token is the original's;
- greedy-generation agreement: 32 prompts of 16 tokens, 16 tokens generated greedily through the
  KV cache (the genai folder by onnxruntime-genai itself), the share of generated positions equal
  to the original's.

Methods, all in the same harness: onnxsnp's default (SNP criterion, block-by-block
reconstruction), `--compensate bias` (FLAP-style: the removed neurons' mean contribution folded
into the next bias) and `--criterion l2` (weight norms, default compensation).

    python tools/train_tiny_llama.py && python tools/bench_decoders.py [--out docs/DECODERS.md] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import harness
from harness import DOCS

from decoders import genai_generate, greedy, step_feed

from onnxsnp.data.kv_cache import fitted
from onnxsnp.io.genai import genai_folder, pruned_config, write_folder
from onnxsnp.options import make_options
from onnxsnp.pipeline import prune_model

BUILD = harness.BUILD / "tiny_llama"
WINDOW, PROMPT, GENERATED = 64, 16, 16
METHODS = {"snp (default: block-by-block reconstruction)": {},
           "snp, --compensate bias (FLAP-style)": {"compensate": "bias"},
           "l2 (--criterion l2)": {"criterion": "l2"}}


def windows(path: Path, tokenizer, count: int, length: int = WINDOW) -> np.ndarray:
    """`count` windows of `length` tokens from the texts of `path` (one per line), in order."""
    stream = [t for line in path.read_text().splitlines() if line.strip()
              for t in tokenizer.encode(line).ids + [1]]  # </s> between texts
    usable = len(stream) // length
    step = max(1, usable // count)
    return np.array([stream[i * length * step:i * length * step + length] for i in range(min(count, usable))],
                    dtype=np.int64)


def logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = [session.run(["logits"], fitted(session, step_feed(model, ids[i:i + 8])))[0] for i in range(0, len(ids), 8)]
    return np.concatenate(out)


def perplexity(values: np.ndarray, ids: np.ndarray) -> float:
    shifted = values[:, :-1].astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp(-picked.mean()))


def generations(model: onnx.ModelProto, folder: Path | None, prompts: np.ndarray) -> np.ndarray:
    """(prompts, GENERATED) greedy tokens; onnxruntime-genai stops at </s>, the rest is -1."""
    if folder is not None:  # onnxruntime-genai itself, from the folder
        made = [genai_generate(folder, list(p), PROMPT + GENERATED)[PROMPT:] for p in prompts]
    else:
        made = [greedy(model, list(p), GENERATED)[PROMPT:] for p in prompts]
    return np.array([tokens + [-1] * (GENERATED - len(tokens)) for tokens in made])


def ratio_for(source: Path, cut: float, calib: dict, one_head_size: bool) -> float:
    """The smallest uniform ratio whose pruned model has at least `cut` fewer FLOPs (bisection on
    measured FLOPs; widths are steps, so the cut reached is reported as measured)."""
    low, high = 0.0, 0.95
    for _ in range(7):
        middle = (low + high) / 2
        options = make_options(middle, criterion="l2", compensate="none", measure_latency=False,
                               one_head_size=one_head_size)
        report = prune_model(str(source), options, calib=calib).report
        if 1 - report.flops_after / report.flops_before >= cut:
            high = middle
        else:
            low = middle
    return high


def measure(form: str, source: Path, folder, cuts: list[float], calib: dict, heldout: np.ndarray,
            prompts: np.ndarray, scratch: Path) -> list[str]:
    original = onnx.load(str(source))
    reference = logits(original, heldout)
    reference_tokens = generations(original, folder.folder if folder else None, prompts)
    rows = [f"| {form} | original | – | – | {perplexity(reference, heldout):.2f} | 100.0 % | 100.0 % | – |"]
    for cut in cuts:
        ratio = ratio_for(source, cut, calib, folder is not None)
        for method, extra in METHODS.items():
            started = time.time()
            options = make_options(ratio, measure_latency=False, one_head_size=folder is not None, **extra)
            result = prune_model(str(source), options, calib=calib)
            seconds = time.time() - started
            values = logits(result.model, heldout)  # before the folder is written: saving moves weights out
            pruned_folder = None
            if folder is not None:
                pruned_folder = scratch / f"{form}-{cut}-{len(rows)}"
                write_folder(folder, pruned_folder, result.model, pruned_config(folder, result.model), True)
            report = result.report
            agreement = float((values[:, :-1].argmax(-1) == reference[:, :-1].argmax(-1)).mean())
            tokens = generations(result.model, pruned_folder, prompts)
            rows.append(f"| {form} | {method} | {ratio:.3f} | −{1 - report.flops_after / report.flops_before:.1%} | "
                        f"{perplexity(values, heldout):.2f} | {agreement:.1%} | "
                        f"{float((tokens == reference_tokens).mean()):.1%} | {seconds:.0f} s |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "DECODERS.md")
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--smoke", action="store_true", help="one cut, few windows: checks that the bench runs")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    if not (args.build / "genai" / "genai_config.json").exists():
        sys.exit(f"run tools/train_tiny_llama.py first (no model under {args.build})")
    tokenizer = Tokenizer.from_file(str(args.build / "source" / "tokenizer.json"))
    count, cuts = (8, [0.3]) if args.smoke else (64, [0.2, 0.3, 0.5])
    heldout = windows(args.build / "heldout.txt", tokenizer, count)
    prompts = windows(args.build / "heldout.txt", tokenizer, 4 if args.smoke else 32, PROMPT)
    calibration = windows(args.build / "calibration.txt", tokenizer, 16 if args.smoke else 128)
    calib = {"input_ids": calibration, "attention_mask": np.ones_like(calibration)}
    folder = genai_folder(args.build / "genai")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        rows += measure("dynamo export", args.build / "dynamo" / "model.onnx", None, cuts, calib, heldout, prompts,
                        Path(scratch))
        rows += measure("onnxruntime-genai folder", folder.model_file, folder, cuts, calib, heldout, prompts,
                        Path(scratch))
    table = ["| form | method | ratio | FLOPs | perplexity | next-token agreement | greedy-generation agreement | "
             "prune time |", "|---|---|---|---|---|---|---|---|"] + rows
    text = f"""# Decoders: fidelity on a trained Llama-architecture LM

Measured by `python tools/train_tiny_llama.py && python tools/bench_decoders.py` (CPU; every number
from one run). {__doc__.split(chr(10), 2)[2].split("    python")[0].strip()}

{"**Smoke run** (`--smoke`): one cut and a few windows, to check that the bench runs; not a measurement." + chr(10) + chr(10) if args.smoke else ""}Held-out: {len(heldout)} windows of {heldout.shape[1]} tokens; calibration: {len(calibration)} windows;
{len(prompts)} prompts. "ratio" is the uniform fraction removed from Q/K pairs, V and FFN neurons
(rounded to whole rotary pairs; in the onnxruntime-genai folder to one head size per model, a
multiple of 16); "FLOPs" the measured cut of the prefill.

{chr(10).join(table)}
"""
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
