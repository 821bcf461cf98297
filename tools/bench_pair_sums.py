"""The two numpy kernels of a decoder prune that issue 25's profile named, timed alone:
softmax_metric.add_sums (SmolLM2-135M's attention: 9 query heads of 64, 8 windows of 128 tokens,
a sink-like constant term) and least_squares.choose_ridge (SmolLM2's FFN down projection: 1,152
of 1,536 inputs kept, 576 outputs, 4 folds), each with one BLAS thread (as onnxsnp runs them
under threadpoolctl) and with OpenBLAS's default threads.

    python tools/bench_pair_sums.py [--code DIR ...]   # DIR: another checkout's root, e.g. a git archive

Each DIR (default: this checkout) runs in its own process; the minimum of --repeat runs is printed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from harness import ROOT

CHILD = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from onnxsnp.compensate.least_squares import NormalEquations, choose_ridge
from onnxsnp.score.softmax_metric import SoftmaxSums, add_sums

repeat = int(sys.argv[2])
rng = np.random.default_rng(0)
heads, samples, n, d = 9, 8, 128, 64
q, k = rng.standard_normal((2, samples * heads, n, d)).astype(np.float32)
q[..., 0] += 5
k[..., 0] += 5
q_hat = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
k_hat = k + 0.1 * rng.standard_normal(k.shape).astype(np.float32)
inputs, outputs, kept = 1536, 576, 1152
equations = NormalEquations.empty(inputs, outputs)
mix = rng.standard_normal((inputs, inputs)).astype(np.float32) / np.sqrt(inputs)
weight = rng.standard_normal((inputs, outputs)).astype(np.float32) / np.sqrt(inputs)
for fold in range(4):
    x = rng.standard_normal((2048, inputs)).astype(np.float32) @ mix
    equations.add(x, x @ weight + 0.1 * rng.standard_normal((2048, outputs)).astype(np.float32), fold)
keep = np.sort(rng.choice(inputs, kept, replace=False))
prior = weight[keep].astype(np.float64)


def best(run):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


try:  # the prune's sums are over rotary pairs (rotate_half) where the checkout keeps them so
    sums = SoftmaxSums.empty(heads, d, np.arange(d) % (d // 2))
except TypeError:  # an older checkout: over dims
    sums = SoftmaxSums.empty(heads, d)
print(f"add_sums {best(lambda: add_sums(sums, q_hat, k_hat, q, k, None, 0.125)):.3f} s, "
      f"choose_ridge {best(lambda: choose_ridge(equations, keep, prior)):.3f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for threads in ("1", None):
        for code in args.code:
            env = dict(os.environ)
            if threads:
                env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = threads
            done = subprocess.run([sys.executable, "-c", CHILD, str(code.resolve()), str(args.repeat)], env=env,
                                  capture_output=True, text=True, check=True)
            label = "1 BLAS thread" if threads else "default BLAS threads"
            print(f"{code}: {label}: {done.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
