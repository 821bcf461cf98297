"""What the refit's pass costs per half-block: the pruned half run for its refitted layer's input
(output projection's, fc2's), as the whole half's session (before) and as the session of only
the part that computes that input (halves.Half.layer_inputs), on the same batch and weights.

CPU seconds of this process (onnxruntime's threads included), the least of `--repeat` runs each,
so that a busy machine inflates them less than wall time; the two outputs are compared bit for bit.

    python tools/bench_refit_pass.py MODEL.onnx [--samples 32] [--layers 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

from onnxsnp.compensate.reconstruction import Reconstructor
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks


def cpu_seconds(run, repeat: int) -> tuple[float, np.ndarray]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        value = run()
        best = min(best, time.process_time() - started)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=32, help="one batch of this many N(0,1) images (32)")
    parser.add_argument("--layers", type=int, default=2, help="the first LAYERS blocks' halves (2)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    g = ModelGraph(onnx.load(args.model))
    reconstructor = Reconstructor(g, find_blocks(g))
    name = g.model.graph.input[0].name
    feed = {name: np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32)}
    shards = reconstructor.prepare(feed, args.samples, None, restartable=False)
    shard, weights = shards.shard, reconstructor.original
    item = shard.batches[0]
    print("| half | refitted layer | whole half CPU s | refit inputs only CPU s | ratio | same bits |")
    print("|---|---|---|---|---|---|")
    for number in range(2 * min(args.layers, len(reconstructor.halves))):
        half, linear = shard.half(number), shard.linear(number)
        item.pruned = item.original
        whole, before = cpu_seconds(lambda: shard.run_half(half, item, item.pruned, weights,
                                                           [linear.input])[linear.input], args.repeat)
        part, after = cpu_seconds(lambda: shard.run(half.layer_inputs, item, {half.residual: item.pruned}, weights,
                                                    [linear.input])[linear.input], args.repeat)
        print(f"| {half.segment.name} | {linear.node} | {whole:.2f} | {part:.2f} | {part / whole:.2f} | "
              f"{np.array_equal(before, after)} |", flush=True)
        shards.advance_original(number)


if __name__ == "__main__":
    main()
