"""Pruned decoders' speed and size as deployed → docs/DECODER_SPEED.md.

A Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 key-value heads, SwiGLU
1536, 49,152 tokens, output projection not tied; random weights: speed and size do not depend on
their values), built locally (tools/decoder_export.py) and written by onnxruntime-genai's model
builder (`-p int4 -e cpu`, a folder) and/or by torch's dynamo exporter (fp32, with a KV cache), is
pruned at each FLOPs budget (`--target-flops`), `--ratio` and decode-step `--target-speedup`
(calibration: 16 prompts of random tokens, as long as the prefill timed, so that the FLOPs count
is the prefill's; the cut, not the fidelity, is measured here) and timed with onnxruntime at each
intra-op thread count, the original and the pruned model at every thread count interleaved round
by round (medians of the rounds):

- prefill: one prompt of 128 tokens with an empty cache;
- decode: 64 single-token steps, each feeding the previous step's `present.*` back, per token.

Size: the bytes of the model files (a genai folder: every file); KV cache: bytes per token of
`present.*` (keys and values of every layer, float32).

    python tools/bench_decoder_speed.py [--forms genai-int4,dynamo] [--flops 0.8,0.65,0.5] [--ratios 0.25,0.44]
        [--speedups 1.3] [--speedup-forms dynamo] [--threads 1,2] [--clock wall|cpu] [--rounds 5] [--samples 16]
        [--work DIR] [--profile]

`--work DIR` keeps the exports and the pruned models (a second run reuses them: only the timing is
repeated). `--profile` adds onnxruntime's profiler per op type (a prefill and the decode steps, one
thread): which ops shrink with the cut and which do not. `--clock cpu` times a one-thread session by
the calling thread's CPU time (on a machine other jobs share; `--threads 1` only).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from harness import DOCS, cpu_name, invocation, rounds, session

from decoders import step_feed

from onnxsnp.cli import main as onnxsnp_main

PROMPT, STEPS = 128, 64
SHAPE = dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, positions=2048)


def build(form: str, folder: Path) -> Path:
    """The model file (or genai folder) of `form`, made once under `folder` (kept where a finished
    one is there: the export of a 30-layer model takes minutes)."""
    from decoder_export import export_dynamo, export_genai, save_folder, tiny_llama

    source = folder / "source"
    if not (source / "config.json").exists():
        save_folder(tiny_llama(**SHAPE), source)
    done = folder / f"{form}.done"  # written after the export returned: a half-written one is made again
    out = folder / form if form == "genai-int4" else folder / f"{form}.onnx"
    if done.exists():
        return out
    if form == "genai-int4":
        export_genai(source, out, "int4")
    else:
        import transformers as T

        export_dynamo(T.AutoModelForCausalLM.from_pretrained(source), out)
    done.touch()
    return out


def prompts(folder: Path, samples: int) -> Path:
    """Calibration for every prune: `samples` random prompts of the timed prefill's length, so that
    the report's FLOPs count (and the cut the speedups are set against) is that of the prefill
    timed — attention's products grow with the square of the length, and a budget that removes
    heads cuts them more than the rest."""
    path = folder / f"prompts-{samples}x{PROMPT}.npz"
    if not path.exists():
        np.savez(path, input_ids=np.random.default_rng(1).integers(3, SHAPE["vocab"], (samples, PROMPT)))
    return path


def size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def model_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def timings(paths: list[Path], runs: int, threads: tuple[int, ...] = (1,),
            clock: Callable[[], float] = time.perf_counter) -> list[list[tuple[float, float, int]]]:
    """Per model, per thread count: (prefill ms, decode ms per token, KV bytes per token), every
    model at every thread count interleaved round by round (harness.rounds): a slow phase of the
    machine hits the original and the pruned model, one thread and two, alike. `clock`: wall time,
    or `time.thread_time` (the calling thread's CPU time; see `clock`)."""
    ids = np.random.default_rng(0).integers(3, SHAPE["vocab"], (1, PROMPT))

    def measure(path: Path, count: int) -> Callable[[], tuple[float, float, int]]:
        model = onnx.load(str(model_file(path)), load_external_data=False)
        sess = session(model_file(path), count)
        names = [o.name for o in sess.get_outputs()]

        def once() -> tuple[float, float, int]:  # a prefill, then STEPS greedy decode steps through the cache
            started = clock()
            out = dict(zip(names, sess.run(None, step_feed(model, ids))))
            middle = clock()
            token = np.array([[int(out["logits"][0, -1].argmax())]])
            for step in range(STEPS):
                past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
                # the position passed, as a generator knows it: read off the graph every step
                # (step_feed without `start`), it cost ~18 ms a step here, more than the step itself
                out = dict(zip(names, sess.run(None, step_feed(model, token, past, PROMPT + step))))
                token = np.array([[int(out["logits"][0, -1].argmax())]])
            ended = clock()
            kv = sum(v[0].nbytes // v.shape[2] for n, v in out.items() if n.startswith("present"))
            return (middle - started) * 1000, (ended - middle) * 1000 / STEPS, kv

        return once

    results = rounds([measure(path, count) for path in paths for count in threads], runs, warmup=1)
    medians = [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2]) for rs in results]
    return [medians[i * len(threads):(i + 1) * len(threads)] for i in range(len(paths))]


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
    for step in range(STEPS):  # the position passed, as in `timings`
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
        out = dict(zip(names, sess.run(None, step_feed(model, np.array([[1]]), past, PROMPT + step))))
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


@dataclass(frozen=True)
class Cut:
    """One prune of the table: its onnxsnp options."""

    flag: str  # --ratio or --target-flops
    value: str

    @property
    def args(self) -> list[str]:
        return [self.flag, self.value]

    @property
    def label(self) -> str:
        return f"`{self.flag} {self.value}`"

    @property
    def stem(self) -> str:
        return f"{self.flag.strip('-')}-{self.value}"


def cuts(ratios: str, flops: str, speedups: str = "") -> list[Cut]:
    """`--ratios 0.25,0.44`, `--flops 0.8,0.65,0.5` (--target-flops fractions) and `--speedups 1.3`
    (--target-speedup of the cached decode step: its row says where the measured speedup landed)
    as prunes, in that order."""
    listed = [Cut("--ratio", r) for r in ratios.split(",") if r.strip()]
    listed += [Cut("--target-flops", f) for f in flops.split(",") if f.strip()]
    listed += [Cut("--target-speedup", f) for f in speedups.split(",") if f.strip()]
    for cut in listed:
        try:
            value = float(cut.value)
        except ValueError:
            raise SystemExit(f"bench_decoder_speed: {cut.flag} {cut.value!r} is not a number") from None
        if not (value > 1 if cut.flag == "--target-speedup" else 0 < value < 1):
            raise SystemExit(f"bench_decoder_speed: {cut.flag} {cut.value} must lie "
                             + ("above 1" if cut.flag == "--target-speedup" else "between 0 and 1"))
    if not listed:
        raise SystemExit("bench_decoder_speed: no cut to measure (--ratios, --flops and --speedups are all empty)")
    return listed


def clock(name: str, threads: tuple[int, ...]) -> Callable[[], float]:
    """`wall`, or `cpu`: the calling thread's CPU time, which onnxruntime's one-thread session spends
    on that thread (its kernels run there) — the time of the step without the slices other jobs of
    a shared machine took from it (a wall clock there moved the same file's ratio by ±15 %). It is
    no latency for a session with more threads (their work runs on others), which is refused."""
    if name == "wall":
        return time.perf_counter
    if name != "cpu":
        raise SystemExit(f"bench_decoder_speed: --clock wants wall or cpu; got {name!r}")
    if threads != (1,):
        raise SystemExit("bench_decoder_speed: --clock cpu times one intra-op thread only (--threads 1)")
    return time.thread_time


def thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SystemExit(f"bench_decoder_speed: --threads wants distinct counts ≥ 1 like 1,2; got {text!r}")
    return counts


def table_row(form: str, cut: Cut, threads: int, flops: tuple[int, int], before: tuple[float, float, int],
              after: tuple[float, float, int], sizes: tuple[int, int]) -> str:
    """A row: each speedup beside its share of the FLOPs cut (issue 28's goal: ≥ 0.95 of it)."""
    (p0, d0, k0), (p1, d1, k1), ideal = before, after, flops[0] / flops[1]
    landed = ""
    if cut.flag == "--target-speedup":  # the goal is the decode step's speedup: how far from it it landed
        landed = f"; goal {float(cut.value):.2f}×, {d0 / d1 / float(cut.value) - 1:+.1%}"
    return (f"| {form} | {cut.label} | {threads} | −{1 - flops[1] / flops[0]:.1%} ({ideal:.3f}×) | "
            f"{p0:.1f} → {p1:.1f} ({p0 / p1:.2f}×, {p0 / p1 / ideal:.2f}) | "
            f"{d0:.2f} → {d1:.2f} ({d0 / d1:.2f}×, {d0 / d1 / ideal:.2f}{landed}) | "
            f"{sizes[0] / 1e6:.1f} → {sizes[1] / 1e6:.1f} MB ({sizes[1] / sizes[0]:.2f}×) | "
            f"{k0 / 1024:.1f} → {k1 / 1024:.1f} KiB |")


HEADER = ["| form | options | threads | FLOPs | prefill ms (speedup, ÷ cut) | decode ms/token (speedup, ÷ cut) "
          "| size | KV cache per token |", "|---|---|---|---|---|---|---|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forms", default="genai-int4,dynamo")
    parser.add_argument("--ratios", default="", help="uniform cuts (--ratio), e.g. 0.25,0.44")
    parser.add_argument("--flops", default="0.8,0.65,0.5", help="FLOPs budgets (--target-flops), fractions kept")
    parser.add_argument("--speedups", default="1.3",
                        help="decode-step speedup goals (--target-speedup), e.g. 1.3; each row says where it landed")
    parser.add_argument("--speedup-forms", default="dynamo",
                        help="the forms the --speedups prunes are made for (each takes a survey and timed checks)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, each timed interleaved")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", default="wall", help="wall, or cpu: the thread's CPU time (--threads 1 only), "
                                                       "for a machine other jobs share")
    parser.add_argument("--samples", type=int, default=16,
                        help="calibration prompts per prune (random tokens, the prefill's length): the widths, "
                             "not the weights, set the speed, and fewer prompts make the survey and refit cheaper")
    parser.add_argument("--work", type=Path, help="keep the exports and prunes here (reused when present); "
                                                  "default a temporary folder")
    parser.add_argument("--profile", action="store_true", help="onnxruntime's profiler per op type, too")
    parser.add_argument("--out", type=Path, default=DOCS / "DECODER_SPEED.md")
    args = parser.parse_args()
    listed, threads = cuts(args.ratios, args.flops, args.speedups), thread_counts(args.threads)
    timer = clock(args.clock, threads)
    rows = list(HEADER)
    profiles = ["| model, options | op type | kernel time, original → pruned | share of the original |",
                "|---|---|---|---|"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        calib = prompts(folder, args.samples)
        for form in args.forms.split(","):
            original = build(form, folder)
            for cut in listed:
                if cut.flag == "--target-speedup" and form not in args.speedup_forms.split(","):
                    continue
                name = f"{form}-{cut.stem}"
                pruned = folder / name if original.is_dir() else folder / f"{name}.onnx"
                report = folder / f"{name}.json"
                if not (report.exists() and pruned.exists()):
                    for stale in (pruned, report):  # a prune stopped half-way: start it again
                        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
                    assert onnxsnp_main([str(original), str(pruned), *cut.args, "--calib", str(calib), "-q",
                                         "--report", str(report)]) == 0
                data = json.loads(report.read_text())
                before, after = timings([original, pruned], args.rounds, threads, timer)
                for count, one, other in zip(threads, before, after):
                    rows.append(table_row(form, cut, count, (data["flops_before"], data["flops_after"]), one, other,
                                          (size(original), size(pruned))))
                    print(rows[-1], flush=True)
                if args.profile:
                    profiles += profile_rows(f"{form} {cut.label}", original, pruned)
                    print("\n".join(profiles[-11:]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    profiled = ("\n\nPer op type (onnxruntime's profiler, one prefill and the decode steps, one thread; the ten "
                "op types that take longest):\n\n" + "\n".join(profiles)) if args.profile else ""
    notes = kept_notes(args.out)
    args.out.write_text(f"""# Decoders: speed and size of pruned models

Measured by `{invocation()}`
on {cpu_name()} (onnxruntime CPU; {"wall" if args.clock == "wall" else "the thread's CPU"} time; {minutes:.0f} minutes, exports and prunes included; the machine's
load average was {os.getloadavg()[0]:.1f} at the end).
{__doc__.split(chr(10), 2)[2].split("    python")[0].strip()}

{chr(10).join(rows)}

The FLOPs column is onnxsnp's count for a prefill; its speedup in parentheses is the ideal a
prefill or a decode step would reach if time followed FLOPs, and "÷ cut" is the measured speedup
over it (issue 28's goal: at least 0.95). A `--target-speedup` row (a goal for the cached decode
step, timed by the pruner on this machine) says how far the decode speedup measured here landed
from its goal (issue 28's goal: within 5 %).{profiled}
{notes}""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
