"""Times the cached decode step of an original and a pruned language model as the pruner's
`--target-speedup` check does (onnxsnp.data.timing.decode_feed: one new token after a prefill of
a prompt, each model through its own cache; one intra-op thread; interleaved), reading the calling
thread's CPU clock and the wall clock around the same runs, `--repeats` times. To check that a
written model lands where the search's clock said (issue 28).

    python tools/time_decode_step.py ORIGINAL PRUNED [--tokens 128] [--rounds 40] [--repeats 2]

ORIGINAL / PRUNED: a model.onnx or a folder holding one. The prompt is random token ids: a step's
time depends on the lengths, not on the tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxsnp.data.timing import decode_feed, interleaved_rounds


def model_path(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def head_size(path: Path) -> int | None:
    """onnxruntime-genai's head size, which its original model's cache inputs leave symbolic
    (genai_config.json beside the model); None without one."""
    config = path.parent / "genai_config.json"
    return json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.is_file() else None


def prompt_feed(sess: ort.InferenceSession, tokens: int, vocab: int, size: int | None) -> dict[str, np.ndarray]:
    """A prompt of random ids with an empty cache: past inputs of length 0 (their other axes from
    the model's inputs; a symbolic head size from the genai config, a symbolic batch 1)."""
    ids = np.random.default_rng(0).integers(3, vocab, (1, tokens))
    feed: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            shape[2] = 0
            if not isinstance(i.shape[3], int):
                if size is None:
                    raise SystemExit(f"time_decode_step: {i.name}'s head size is symbolic and no genai_config.json says it")
                shape[3] = size
            feed[i.name] = np.zeros(shape, np.float16 if "float16" in i.type else np.float32)
        elif "mask" in i.name:
            feed[i.name] = np.ones((1, tokens), np.int64)
        elif "position" in i.name:
            feed[i.name] = np.arange(tokens, dtype=np.int64)[None]
        else:
            feed[i.name] = ids
    return feed


def both_clocks(sess: ort.InferenceSession, feed: dict[str, np.ndarray]):
    def once() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        sess.run(None, feed)
        return (time.thread_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000
    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--tokens", type=int, default=128, help="the prompt: the step attends to this many tokens")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    paths = [model_path(p) for p in (args.original, args.pruned)]
    sessions = [ort.InferenceSession(str(p), options) for p in paths]
    feeds = [decode_feed(s, prompt_feed(s, args.tokens, args.vocab, head_size(p))) for s, p in zip(sessions, paths)]
    for sess, feed in zip(sessions, feeds):
        for _ in range(3):
            sess.run(None, feed)
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        runs = interleaved_rounds([both_clocks(s, f) for s, f in zip(sessions, feeds)], args.rounds)
        (cpu_a, wall_a), (cpu_b, wall_b) = [[statistics.median(r[i] for r in rs) for i in (0, 1)] for rs in runs]
        print(f"repeat {repeat + 1} ({args.rounds} interleaved rounds, load {load:.1f} -> {os.getloadavg()[0]:.1f}): "
              f"CPU {cpu_a:.2f} -> {cpu_b:.2f} ms ({cpu_a / cpu_b:.3f}x); "
              f"wall {wall_a:.2f} -> {wall_b:.2f} ms ({wall_a / wall_b:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
