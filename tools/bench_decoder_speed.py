"""Pruned decoders' speed and size as deployed → docs/DECODER_SPEED.md.

A Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads, SwiGLU
1536, 49,152 tokens, output projection not tied; random weights: speed and size do not depend on their
values), built locally (tools/decoder_export.py) and written by onnxruntime-genai's model builder
(`-p int4 -e cpu`, a folder) and/or by torch's dynamo exporter (fp32, with a KV cache), is pruned
at each `--ratio` (synthetic calibration: the cut, not the fidelity, is measured here) and timed
with onnxruntime, one intra-op thread, original and pruned interleaved round by round (medians of
the rounds):

- prefill: one prompt of 128 tokens with an empty cache;
- decode: 64 single-token steps, each feeding the previous step's `present.*` back, per token.

Size: the bytes of the model files (a genai folder: every file); KV cache: bytes per token of
`present.*` (keys and values of every layer, float32).

    python tools/bench_decoder_speed.py [--forms genai-int4,dynamo] [--ratios 0.25,0.44] [--rounds 5] [--profile]

`--profile` adds onnxruntime's profiler per op type (a prefill and the decode steps, one thread):
which ops shrink with the cut and which do not.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from harness import DOCS, cpu_name, rounds, session

from decoders import step_feed

from onnxsnp.cli import main as onnxsnp_main

PROMPT, STEPS = 128, 64
SHAPE = dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, positions=2048)


def build(form: str, folder: Path) -> Path:
    """The model file (or genai folder) of `form`, made once under `folder`."""
    from decoder_export import export_dynamo, export_genai, save_folder, tiny_llama

    source = folder / "source"
    if not source.exists():
        save_folder(tiny_llama(**SHAPE), source)
    if form == "genai-int4":
        return export_genai(source, folder / form, "int4")
    import transformers as T

    return export_dynamo(T.AutoModelForCausalLM.from_pretrained(source), folder / f"{form}.onnx")


def size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def model_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def timings(paths: list[Path], runs: int) -> list[tuple[float, float, int]]:
    """(prefill ms, decode ms per token, KV bytes per token) of each model, interleaved (harness.rounds)."""
    ids = np.random.default_rng(0).integers(3, SHAPE["vocab"], (1, PROMPT))

    def measure(path: Path) -> Callable[[], tuple[float, float, int]]:
        model = onnx.load(str(model_file(path)), load_external_data=False)
        sess = session(model_file(path))
        names = [o.name for o in sess.get_outputs()]

        def once() -> tuple[float, float, int]:  # a prefill, then STEPS greedy decode steps through the cache
            started = time.perf_counter()
            out = dict(zip(names, sess.run(None, step_feed(model, ids))))
            middle = time.perf_counter()
            token = np.array([[int(out["logits"][0, -1].argmax())]])
            for _ in range(STEPS):
                past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
                out = dict(zip(names, sess.run(None, step_feed(model, token, past))))
                token = np.array([[int(out["logits"][0, -1].argmax())]])
            ended = time.perf_counter()
            kv = sum(v[0].nbytes // v.shape[2] for n, v in out.items() if n.startswith("present"))
            return (middle - started) * 1000, (ended - middle) * 1000 / STEPS, kv

        return once

    results = rounds([measure(path) for path in paths], runs, warmup=1)
    return [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2]) for rs in results]


def kernel_times(path: Path) -> collections.Counter:
    """Microseconds per op type over one prefill and STEPS decode steps (onnxruntime's profiler)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = 1, True
    options.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    sess = ort.InferenceSession(str(model_file(path)), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(model_file(path)), load_external_data=False)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, step_feed(model, np.random.default_rng(0).integers(3, SHAPE["vocab"],
                                                                                          (1, PROMPT))))))
    for _ in range(STEPS):
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
        out = dict(zip(names, sess.run(None, step_feed(model, np.array([[1]]), past))))
    times: collections.Counter = collections.Counter()
    for event in json.loads(Path(sess.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    return times


def profile_rows(label: str, original: Path, pruned: Path) -> list[str]:
    before, after = kernel_times(original), kernel_times(pruned)
    total = sum(before.values())
    rows = [f"| {label} | all | {total / 1e3:.0f} → {sum(after.values()) / 1e3:.0f} ms "
            f"({total / sum(after.values()):.2f}×) | 100 % |"]
    for op in sorted(set(before) | set(after), key=lambda k: -max(before[k], after[k]))[:10]:
        ratio = f"{before[op] / after[op]:.2f}×" if after[op] else "gone"
        rows.append(f"| {label} | {op} | {before[op] / 1e3:.1f} → {after[op] / 1e3:.1f} ms ({ratio}) | "
                    f"{before[op] / total:.1%} |")
    return rows


def kept_notes(out: Path) -> str:
    """The hand-written sections (from the first `## ` heading on) of the table's file: the
    findings of profiles measured by hand stay when the table is regenerated."""
    if not out.exists():
        return ""
    text = out.read_text()
    start = text.find("\n## ")
    return "" if start < 0 else text[start:].rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forms", default="genai-int4,dynamo")
    parser.add_argument("--ratios", default="0.25,0.44")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="onnxruntime's profiler per op type, too")
    parser.add_argument("--out", type=Path, default=DOCS / "DECODER_SPEED.md")
    args = parser.parse_args()
    rows = ["| form | options | FLOPs | prefill ms (speedup) | decode ms/token (speedup) | size | KV cache per token |",
            "|---|---|---|---|---|---|---|"]
    profiles = ["| model, options | op type | kernel time, original → pruned | share of the original |",
                "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for form in args.forms.split(","):
            original = build(form, folder)
            for ratio in args.ratios.split(","):
                pruned = folder / f"{form}-{ratio}" if original.is_dir() else folder / f"{form}-{ratio}.onnx"
                report = folder / f"{form}-{ratio}.json"
                assert onnxsnp_main([str(original), str(pruned), "--ratio", ratio, "-q", "--report", str(report)]) == 0
                data = json.loads(report.read_text())
                (p0, d0, k0), (p1, d1, k1) = timings([original, pruned], args.rounds)
                rows.append(f"| {form} | `--ratio {ratio}` | −{1 - data['flops_after'] / data['flops_before']:.1%} "
                            f"({data['flops_before'] / data['flops_after']:.3f}×) | {p0:.1f} → {p1:.1f} ({p0 / p1:.2f}×) "
                            f"| {d0:.2f} → {d1:.2f} ({d0 / d1:.2f}×) | {size(original) / 1e6:.1f} → "
                            f"{size(pruned) / 1e6:.1f} MB ({size(pruned) / size(original):.2f}×) | "
                            f"{k0 / 1024:.1f} → {k1 / 1024:.1f} KiB |")
                print(rows[-1], flush=True)
                if args.profile:
                    profiles += profile_rows(f"{form} `--ratio {ratio}`", original, pruned)
                    print("\n".join(profiles[-11:]), flush=True)
    profiled = ("\n\nPer op type (onnxruntime's profiler, one prefill and the decode steps, one thread; the ten "
                "op types that take longest):\n\n" + "\n".join(profiles)) if args.profile else ""
    notes = kept_notes(args.out)
    args.out.write_text(f"""# Decoders: speed and size of pruned models

Measured by `python tools/bench_decoder_speed.py --forms {args.forms} --ratios {args.ratios} --rounds {args.rounds}{' --profile' if args.profile else ''}`
on {cpu_name()} (onnxruntime CPU, one intra-op thread, one run on a shared machine).
{__doc__.split(chr(10), 2)[2].split("    python")[0].strip()}

{chr(10).join(rows)}

The FLOPs column is onnxsnp's count for a prefill; its speedup in parentheses is the ideal a
prefill or a decode step would reach if time followed FLOPs.{profiled}
{notes}""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
