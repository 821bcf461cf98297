"""Where a pruned decoder's cached decode step falls short of its FLOPs cut: per node group, the
time it keeps beyond its share of the cut.

    python tools/account_decode_step.py ORIGINAL PRUNED [PRUNED ...] [--rounds 7] [--prompt 128] [--steps 64]

Every model (an onnxruntime-genai folder or its model.onnx, or a dynamo export) runs the benchmark's
loop (tools/bench_decoder_speed.py: a prefill, then greedy steps feeding `present.*` back), one
intra-op thread, the models interleaved round by round, on the calling thread's CPU clock
(onnxruntime runs a one-thread session's kernels there): per step the time in `run()` and the
harness's own Python around it (the feed, the cache dict, the argmax). A second pass with
onnxruntime's profiler splits `run()` into node groups (`profile_decoder_ops.node_groups` with the
op type: the projections, the attention op, the norms, ...) and the time of `run()` outside the
kernels; the profiler's wall times are used as shares of `run()` only (on a loaded machine they
grow with the slices other jobs take, alike for every node on average).

For a prune with FLOPs cut c (the original's FLOPs over the pruned model's, from its report
`PRUNED.json` beside it, else from the decode step's own MACs), a step that followed the cut would
take T₀/c; the excess T₁ − T₀/c is the sum over groups of t₁ − t₀/c. A group with a positive
excess keeps more time than its share of the cut: it is what holds the decode step below the cut.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from decoders import step_feed
from profile_decoder_ops import node_groups, product_work

OUTSIDE, HARNESS = "run() outside the kernels", "harness (Python: feed, cache dict, argmax)"


def model_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def open_session(path: Path, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "step")
    return ort.InferenceSession(str(model_file(path)), options, providers=["CPUExecutionProvider"])


def decode(sess, model, names, prompt: int, steps: int, clock=time.thread_time) -> tuple[float, float]:
    """The benchmark's loop; per step, (ms in run(), ms of the Python around it), medians."""
    ids = np.random.default_rng(0).integers(3, 49152, (1, prompt))
    out = dict(zip(names, sess.run(None, step_feed(model, ids))))
    token = np.array([[int(out["logits"][0, -1].argmax())]])
    runs, around = [], []
    for step in range(steps):
        t0 = clock()
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
        feed = step_feed(model, token, past, prompt + step)
        t1 = clock()
        result = sess.run(None, feed)
        t2 = clock()
        out = dict(zip(names, result))
        token = np.array([[int(out["logits"][0, -1].argmax())]])
        t3 = clock()
        runs.append(t2 - t1)
        around.append((t1 - t0) + (t3 - t2))
    return statistics.median(runs) * 1e3, statistics.median(around) * 1e3


def group_of(op: str, group: str) -> str:
    """A readable node group: the projection by name, the rest by op type."""
    for part in ("lm_head", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if part in group:
            return {"qkv_proj": "qkv + o projections", "o_proj": "qkv + o projections"}.get(part, part if part ==
                                                                                          "lm_head" else "FFN products")
    if op in ("MatMulNBits", "MatMul", "Gemm", "FusedMatMul"):
        return f"other products ({op})"
    return op


def shares(path: Path, prompt: int, steps: int) -> collections.Counter:
    """Per node group, its share of the decode steps' run() time (onnxruntime's profiler, one pass)."""
    sess = open_session(path, profile=True)
    model = onnx.load(str(model_file(path)), load_external_data=False)
    groups = node_groups(model)
    decode(sess, model, [o.name for o in sess.get_outputs()], prompt, steps)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    starts = [ts for ts, _ in runs]
    kernel: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        run = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if run == 0:  # the prefill
            continue
        name = e["name"].removesuffix("_kernel_time")
        kernel[group_of(e["args"]["op_name"], groups.get(name, name))] += e["dur"]
    total = sum(d for _, d in runs[1:])
    kernel[OUTSIDE] = max(total - sum(kernel.values()), 0)
    return collections.Counter({g: t / total for g, t in kernel.items()})


def group_work(path: Path) -> collections.Counter:
    """Per node group, the products' work (profile_decoder_ops.product_work: K·N of a projection,
    query heads × head size of the attention op): its cut is the group's own."""
    model = onnx.load(str(model_file(path)), load_external_data=False)
    groups, ops = node_groups(model), {n.name: n.op_type for n in model.graph.node}
    work: collections.Counter = collections.Counter()
    for name, size in product_work(model).items():
        work[group_of(ops[name], groups[name])] += size
    return work


def flops_cut(original: Path, pruned: Path, length: int) -> float:
    report = pruned.parent / f"{pruned.name.removesuffix('.onnx')}.json"
    if report.exists():
        data = json.loads(report.read_text())
        return data["flops_before"] / data["flops_after"]
    macs = [sum(w * (2 * length if "Attention" in n else 1) for n, w in
                product_work(onnx.load(str(model_file(p)), load_external_data=False)).items()) for p in (original, pruned)]
    return macs[0] / macs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", type=Path, nargs="+", help="the original, then its prunes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profiles", type=int, default=6, help="profiled passes per model (their shares averaged)")
    args = parser.parse_args()
    loaded = [(open_session(p), onnx.load(str(model_file(p)), load_external_data=False)) for p in args.models]
    loaded = [(s, m, [o.name for o in s.get_outputs()]) for s, m in loaded]
    times = [[] for _ in loaded]
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds + 1):  # the first round warms up
        for i, (sess, model, names) in enumerate(loaded):
            result = decode(sess, model, names, args.prompt, args.steps)
            if round_:
                times[i].append(result)
    load.append(os.getloadavg()[0])
    step = [(statistics.median(r for r, _ in t), statistics.median(a for _, a in t)) for t in times]
    split = [collections.Counter() for _ in args.models]
    for _ in range(args.profiles):  # in turn, pass by pass, as the timed rounds
        for total, path in zip(split, args.models):
            total.update(shares(path, args.prompt, args.steps))
    load.append(os.getloadavg()[0])
    parts = []
    for (run, around), share in zip(step, split):
        parts.append({g: s / args.profiles * run for g, s in share.items()} | {HARNESS: around})
    print(f"one thread, CPU clock, medians of {args.rounds} rounds of {args.steps} steps after {args.prompt} "
          f"tokens; load {load[0]:.1f} → {load[1]:.1f} (timing) → {load[2]:.1f} (profiles)")
    for path, part in zip(args.models[1:], parts[1:]):
        cut = flops_cut(args.models[0], path, args.prompt + args.steps // 2)
        work = [group_work(args.models[0]), group_work(path)]
        t0, t1 = sum(parts[0].values()), sum(part.values())
        print(f"\n{path.name}: step {t0:.2f} → {t1:.2f} ms ({t0 / t1:.3f}×); FLOPs cut {cut:.3f}×; "
              f"÷ cut {t0 / t1 / cut:.3f}; excess over T₀/c {t1 - t0 / cut:+.2f} ms")
        ideal = op_mix_ideal(parts[0], work)
        print(f"  op-mix ideal (every product group's time ÷ its own work cut, the rest kept): {ideal:.3f}× "
              f"(÷ cut {ideal / cut:.3f})")
        print(f"  {'group':44s} {'original ms':>11s} {'pruned ms':>9s} {'time ×':>6s} {'work ×':>6s} {'excess ms':>9s}")
        for g, a, b, extra in excess(parts[0], part, cut):
            own = f"{a / b:.2f}" if b else "gone"
            cut_g = f"{work[0][g] / work[1][g]:.2f}" if work[1][g] else ""
            print(f"  {g:44s} {a:11.3f} {b:9.3f} {own:>6s} {cut_g:>6s} {extra:+9.3f}")


def op_mix_ideal(before: dict[str, float], work: list[collections.Counter]) -> float:
    """The speedup if each product group's time shrank by its own work's cut and every other group
    (norms, activations, run()'s overhead, the harness) kept its time."""
    after = sum(t * (work[1][g] / work[0][g] if work[0][g] else 1.0) for g, t in before.items())
    return sum(before.values()) / after


def excess(before: dict[str, float], after: dict[str, float], cut: float) -> list[tuple[str, float, float, float]]:
    """Per group (original ms, pruned ms, t₁ − t₀/c), largest excess first: the excesses sum to
    T₁ − T₀/c, the time the pruned step takes beyond a step that followed the FLOPs cut."""
    rows = [(g, before.get(g, 0.0), after.get(g, 0.0)) for g in set(before) | set(after)]
    return sorted(((g, a, b, b - a / cut) for g, a, b in rows), key=lambda r: -r[3])

if __name__ == "__main__":
    main()
