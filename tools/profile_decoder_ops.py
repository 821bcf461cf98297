"""Which ops of a pruned decoder do not shrink with its cut: onnxruntime's profiler, one intra-op
thread, per op type, a prefill apart from the cached decode steps, original vs pruned (run in turn,
repeat by repeat); and the time of the nodes the rewrite added (their names carry `__snp`).

    python tools/profile_decoder_ops.py ORIGINAL.onnx PRUNED.onnx [--prompt 128] [--steps 64] [--repeats 3]

The models are the dynamo exporter's (tools/decoder_export.py): input_ids, attention_mask,
position_ids and past_key_values.* in, logits and present.* out. The profiler's own overhead
inflates the many small ops of a decode step: compare its figures only with each other.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from decoders import step_feed  # noqa: E402


@dataclass(frozen=True)
class OpTimes:
    """Kernel microseconds per op type, per run of one prefill and its decode steps."""

    prefill: collections.Counter
    decode: collections.Counter
    added: collections.Counter  # (phase, op type) of the nodes the rewrite added


def op_times(paths: list[Path], prompt: int, steps: int, repeats: int) -> list[OpTimes]:
    """Each model's kernel times, the models run in turn repeat by repeat (a slow phase of a shared
    machine hits them alike, as in the benchmarks' interleaved rounds)."""
    runs = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / path.stem)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs.append((sess, onnx.load(str(path), load_external_data=False), [o.name for o in sess.get_outputs()]))
    first = runs[0][0].get_outputs()[0].shape[-1]
    ids = np.random.default_rng(0).integers(3, first if isinstance(first, int) else 100, (1, prompt))
    for _ in range(repeats):
        for sess, model, names in runs:
            out = dict(zip(names, sess.run(None, step_feed(model, ids))))
            for _ in range(steps):
                past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
                out = dict(zip(names, sess.run(None, step_feed(model, np.array([[1]]), past))))
    return [_by_op(json.loads(Path(sess.end_profiling()).read_text()), steps, repeats) for sess, _, _ in runs]


def _by_op(events: list[dict], steps: int, repeats: int) -> OpTimes:
    starts = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    prefill, decode, added = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = bisect.bisect_right(starts, event["ts"]) - 1
        phase, op = ("prefill" if run % (steps + 1) == 0 else "decode"), event["args"]["op_name"]
        (prefill if phase == "prefill" else decode)[op] += event["dur"] / repeats
        if "__snp" in event["name"]:
            added[(phase, op)] += event["dur"] / repeats
    return OpTimes(prefill, decode, added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    before, after = op_times([args.original, args.pruned], args.prompt, args.steps, args.repeats)
    for phase in ("prefill", "decode"):
        a, b = getattr(before, phase), getattr(after, phase)
        total_a, total_b = sum(a.values()), sum(b.values())
        label = "prefill" if phase == "prefill" else f"{args.steps} decode steps"
        print(f"{label}: {total_a / 1e3:.1f} → {total_b / 1e3:.1f} ms ({total_a / total_b:.2f}×)")
        for op in sorted(set(a) | set(b), key=lambda k: -max(a[k], b[k]))[:args.top]:
            ratio = f"{a[op] / b[op]:.2f}×" if b[op] else "gone"
            print(f"  {op:24s} {a[op] / 1e3:9.2f} → {b[op] / 1e3:9.2f} ms  {ratio:>6s}  ({a[op] / total_a:.1%} of the original)")
        added = {op: t for (p, op), t in after.added.items() if p == phase}
        print(f"  added by the rewrite: {sum(added.values()) / 1e3:.2f} ms "
              f"({', '.join(f'{op} {t / 1e3:.2f}' for op, t in sorted(added.items(), key=lambda kv: -kv[1]))})")


if __name__ == "__main__":
    main()
