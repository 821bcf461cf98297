"""Which ops of a pruned decoder do not shrink with its cut: onnxruntime's profiler, one intra-op
thread, per op type, a prefill apart from the cached decode steps, original vs pruned (run in turn,
repeat by repeat); and the time of the nodes the rewrite added (their names carry `__snp`).

    python tools/profile_decoder_ops.py ORIGINAL.onnx PRUNED.onnx [--prompt 128] [--steps 64] [--repeats 3]
        [--threads 1] [--by op|node]

The models are the dynamo exporter's (tools/decoder_export.py) or onnxruntime-genai's model.onnx:
input_ids, attention_mask, (position_ids) and past_key_values.* in, logits and present.* out.
`--by node` groups the kernel times by node name with the layer numbers taken out
(`/model/layers.*/mlp/down_proj/MatMul_Q4`): which projection, not only which op type, keeps its
time. The profiler's own overhead inflates the many small ops of a decode step: compare its
figures only with each other.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from decoders import step_feed


@dataclass(frozen=True)
class OpTimes:
    """Kernel microseconds per op type, per run of one prefill and its decode steps."""

    prefill: collections.Counter
    decode: collections.Counter
    added: collections.Counter  # (phase, op type) of the nodes the rewrite added
    nodes: collections.Counter  # (phase, node name)


def node_groups(model: onnx.ModelProto) -> dict[str, str]:
    """Per node, its group for `--by node`: its name with the layer number taken out, so that the
    same projection of every layer falls in one group (onnxruntime-genai's names:
    `/model/layers.3/mlp/down_proj/MatMul_Q4`); where the name carries no layer number (the dynamo
    exporter's `node_linear_210`), that of the first weight it reads if that one does."""
    initializers = {t.name for t in model.graph.initializer}
    groups = {}
    for node in model.graph.node:
        named = [node.name] + [t for t in node.input if t in initializers]
        groups[node.name] = layerless(next((n for n in named if LAYER.search(n)), node.name))
    return groups


LAYER = re.compile(r"(layers?[._/])\d+")


def layerless(name: str) -> str:
    return LAYER.sub(r"\1*", name)


def node_group(event_name: str, groups: dict[str, str]) -> str:
    """A profiler event's group: that of its node, or for a node onnxruntime's fusions made (which
    the file does not hold), its name without the layer number."""
    name = event_name.removesuffix("_kernel_time")
    return groups.get(name) or layerless(name)


def op_times(paths: list[Path], prompt: int, steps: int, repeats: int, threads: int = 1,
             by: str = "op") -> list[OpTimes]:
    """Each model's kernel times, the models run in turn repeat by repeat (a slow phase of a shared
    machine hits them alike, as in the benchmarks' interleaved rounds)."""
    runs = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / path.stem)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs.append((sess, onnx.load(str(path), load_external_data=False), [o.name for o in sess.get_outputs()]))
    first = runs[0][0].get_outputs()[0].shape[-1]
    ids = np.random.default_rng(0).integers(3, first if isinstance(first, int) else 100, (1, prompt))
    for _ in range(repeats):
        for sess, model, names in runs:
            out = dict(zip(names, sess.run(None, step_feed(model, ids))))
            for step in range(steps):  # the position passed: read off the graph every step it costs more than a step
                past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
                out = dict(zip(names, sess.run(None, step_feed(model, np.array([[1]]), past, prompt + step))))
    return [_by_op(json.loads(Path(sess.end_profiling()).read_text()), steps, repeats,
                   node_groups(model) if by == "node" else None) for sess, model, _ in runs]


def _by_op(events: list[dict], steps: int, repeats: int, groups: dict[str, str] | None = None) -> OpTimes:
    """Kernel time per op type (or, given `groups`, per op type and node group) and phase."""
    starts = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    prefill, decode, added, nodes = (collections.Counter() for _ in range(4))
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = bisect.bisect_right(starts, event["ts"]) - 1
        phase = "prefill" if run % (steps + 1) == 0 else "decode"
        op = event["args"]["op_name"]
        key = op if groups is None else f"{op} {node_group(event['name'], groups)}"
        (prefill if phase == "prefill" else decode)[key] += event["dur"] / repeats
        nodes[(phase, event["name"].removesuffix("_kernel_time"))] += event["dur"] / repeats
        if "__snp" in event["name"]:
            added[(phase, op)] += event["dur"] / repeats
    return OpTimes(prefill, decode, added, nodes)


def product_work(model: onnx.ModelProto) -> dict[str, int]:
    """Per product node, the size its work scales with at a fixed length: a weight's K·N (MatMulNBits,
    or the initializer a MatMul/Gemm reads), and for GroupQueryAttention its query heads × head size
    (Q·Kᵀ and attention·V per key; its KV cache's width), the head size taken from the packed
    projection feeding it."""
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    work = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            work[node.name] = attribute(node, "N") * attribute(node, "K")
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul") and any(t in initializers for t in node.input[:2]):
            work[node.name] = int(np.prod(next(initializers[t] for t in node.input[:2] if t in initializers)))
        elif node.op_type == "GroupQueryAttention" and node.input[0] in producer:
            heads, kv = attribute(node, "num_heads"), attribute(node, "kv_num_heads")
            source = producer[node.input[0]]
            width = attribute(source, "N") if source.op_type == "MatMulNBits" else None
            if width:
                work[node.name] = heads * (width // (heads + 2 * kv) if not node.input[1] else width // heads)
    return work


def attribute(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def own_cut(times: dict[str, float], before: dict[str, int], after: dict[str, int]) -> float:
    """The kernel time `times` (per node of the original) would take if every product node shrank by
    its own work's cut (`product_work` of the two files; a product the prune removed: to 0) and every
    other kernel kept its time: the speedup an op mix allows, as against the MACs' cut."""
    scaled = sum(t * (after.get(name, 0) / before[name] if name in before else 1.0) for name, t in times.items())
    return sum(times.values()) / scaled


def group_cuts(models: list[onnx.ModelProto], work: list[dict[str, int]]) -> dict[str, float]:
    """Per `--by node` row of products (op type and group), its work's cut (the original's over the
    pruned file's)."""
    totals = [collections.Counter(), collections.Counter()]
    for side in (0, 1):
        groups, ops = node_groups(models[side]), {n.name: n.op_type for n in models[side].graph.node}
        for name, size in work[side].items():
            totals[side][f"{ops[name]} {groups[name]}"] += size
    return {group: totals[0][group] / totals[1][group] for group in totals[0] if totals[1][group]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both sessions")
    parser.add_argument("--by", choices=("op", "node"), default="op",
                        help="group by op type, or by node name with the layer numbers taken out")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.steps < 0 or args.prompt < 1:
        raise SystemExit("profile_decoder_ops: --threads, --repeats and --prompt want counts ≥ 1, --steps ≥ 0")
    before, after = op_times([args.original, args.pruned], args.prompt, args.steps, args.repeats, args.threads,
                             args.by)
    models = [onnx.load(str(path), load_external_data=False) for path in (args.original, args.pruned)]
    work = [product_work(model) for model in models]
    for phase in ("prefill", "decode") if args.steps else ("prefill",):
        a, b = getattr(before, phase), getattr(after, phase)
        total_a, total_b = sum(a.values()), sum(b.values())
        label = "prefill" if phase == "prefill" else f"{args.steps} decode steps"
        times = {name: t for (p, name), t in before.nodes.items() if p == phase}
        ideal = own_cut(times, *work)
        print(f"{label}: {total_a / 1e3:.1f} → {total_b / 1e3:.1f} ms ({total_a / total_b:.2f}×; "
              f"{ideal:.2f}× if every product shrank by its own cut and the rest kept its time)")
        cuts = group_cuts(models, work) if args.by == "node" else {}
        for op in sorted(set(a) | set(b), key=lambda k: -max(a[k], b[k]))[:args.top]:
            ratio = f"{a[op] / b[op]:.2f}×" if b[op] else "gone"
            cut = f"  own cut {cuts[op]:.2f}×" if op in cuts else ""
            print(f"  {op:{24 if args.by == 'op' else 60}s} {a[op] / 1e3:9.2f} → {b[op] / 1e3:9.2f} ms  {ratio:>6s}  "
                  f"({a[op] / total_a:.1%} of the original){cut}")
        added = {op: t for (p, op), t in after.added.items() if p == phase}
        print(f"  added by the rewrite: {sum(added.values()) / 1e3:.2f} ms "
              f"({', '.join(f'{op} {t / 1e3:.2f}' for op, t in sorted(added.items(), key=lambda kv: -kv[1]))})")


if __name__ == "__main__":
    main()
