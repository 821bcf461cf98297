"""Peak resident memory of the verification's probed run alone (verify/observation._probe_run:
one session, the held-back windows' outputs, attention maps and the FLOPs count's shapes), on a
model loaded as the pipeline loads it (lazily, weights left in their file): the stage that set a
SmolLM2 prune's peak (docs/SCALING.md, "Seventh round"). Session options can be changed to
measure them as levers; digests of the shapes, maps and outputs say whether a lever changed any value.

    python tools/bench_prune_memory.py ... --save pruned.onnx   # a pruned model to probe
    python tools/bench_probe_run.py MODEL [--windows 64] [--no-arena] [--no-mem-pattern]
        [--no-prepack] [--order DEFAULT|PRIORITY_BASED] [--tokenizer-of build/real/smollm2/model.onnx]

Held back as the pipeline holds them: an eighth of `--windows` windows of 128 tokens (bench_prune_memory.windows).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def digest(arrays) -> str:
    h = hashlib.md5()
    for array in arrays:
        h.update(np.ascontiguousarray(array if isinstance(array, np.ndarray) else array[:]).tobytes())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--tokenizer-of", type=Path, help="a model beside its tokenizer.json (default: MODEL)")
    parser.add_argument("--no-arena", action="store_true", help="enable_cpu_mem_arena = False")
    parser.add_argument("--no-mem-pattern", action="store_true", help="enable_mem_pattern = False")
    parser.add_argument("--no-prepack", action="store_true", help="session.disable_prepacking = 1")
    parser.add_argument("--order", choices=("DEFAULT", "PRIORITY_BASED"), help="execution_order (default: onnxsnp's)")
    args = parser.parse_args()
    import onnxruntime as ort

    import onnxsnp.pipeline as pipeline
    from bench_prune_memory import windows
    from onnxsnp.data import calibration
    from onnxsnp.io.loading import load_model
    from onnxsnp.ir.graph import ModelGraph
    from onnxsnp.verify import observation

    options = calibration._session_options

    def changed(*a, **k):
        made = options(*a, **k)
        made.enable_cpu_mem_arena = made.enable_cpu_mem_arena and not args.no_arena
        made.enable_mem_pattern = made.enable_mem_pattern and not args.no_mem_pattern
        if args.no_prepack:
            made.add_session_config_entry("session.disable_prepacking", "1")
        if args.order:  # over onnxsnp's own choice (onnxruntime's default order, Shape nodes latest tensor first)
            made.execution_order = getattr(ort.ExecutionOrder, args.order)
        return made

    calibration._session_options = changed
    model = load_model(args.model, lazy=True).model
    ids = windows(args.tokenizer_of or args.model, args.windows)
    g = ModelGraph(model)
    feed, _ = pipeline._calibration_feed(g, calibration.input_specs(g),
                                         {"input_ids": ids, "attention_mask": np.ones_like(ids)}, None, 0)
    del g
    held = pipeline._split(feed, None)[1]
    probes = [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]
    base, peak, stop = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    maps, outputs, shapes = observation._probe_run(model, "model", probes, held, 8, None)
    seconds = time.perf_counter() - started
    stop.set()
    print(json.dumps({"held_back": len(ids) // 8, "base_mb": round(base), "peak_mb": round(max(peak[0], rss_mb())),
                      "seconds": round(seconds, 1), "shapes": hashlib.md5(repr(sorted(shapes.items())).encode()).hexdigest()[:12],
                      "maps": digest([maps[k] for k in sorted(maps)]), "outputs": digest(outputs)}))


if __name__ == "__main__":
    main()
