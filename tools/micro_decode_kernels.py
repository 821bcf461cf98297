"""Per-call CPU time of a decode step's kernels at given widths, alone: onnxruntime's int4
MatMulNBits (one token, block 32, accuracy level 4, as onnxruntime-genai's builder writes it) and
GroupQueryAttention (one token after L cached, past in and present out as the benchmarks feed it).

    python tools/micro_decode_kernels.py up 96,120,1536      # K = 576 (hidden), N = width: gate / up
    python tools/micro_decode_kernels.py down 96,120,1536    # K = width, N = 576: down
    python tools/micro_decode_kernels.py gqa 9,3,64,160 9,3,48,160   # heads, KV heads, head size, L

Each figure is (t(2R nodes) − t(R nodes)) / R on one session's calling thread (one intra-op
thread, its CPU clock, medians of interleaved runs): the session's own per-run cost cancels, the
per-node cost stays. `up`/`down` print a linear fit (µs per call + µs per 1000 MACs) and each
width's residual, with the largest power of two up to 64 dividing the width (is an aligned K or N
faster per MAC?).
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, BLOCK = 576, 32


def session(nodes, inputs, outputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_nbits(K: int, N: int, R: int) -> tuple[ort.InferenceSession, dict]:
    rng, blocks = np.random.default_rng(0), -(-K // BLOCK)
    inits, nodes, outs = [], [], []
    for r in range(R):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, BLOCK // 2), dtype=np.uint8), f"b{r}"),
                  numpy_helper.from_array(rng.random(N * blocks, dtype=np.float32) * 0.01, f"s{r}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"b{r}", f"s{r}"], [f"y{r}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, [1, 1, N]))
    feed = {"x": np.random.default_rng(1).standard_normal((1, 1, K), dtype=np.float32)}
    return session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])], outs, inits), feed


def attention(heads: int, kv: int, d: int, L: int, R: int, positions: int = 2048) -> tuple[ort.InferenceSession, dict]:
    rng, width = np.random.default_rng(0), (heads + 2 * kv) * d
    inits = [numpy_helper.from_array(rng.random((positions, d // 2), dtype=np.float32), n) for n in ("cos", "sin")]
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, width]),
           helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes, outs = [], []
    feed = {"q": rng.standard_normal((1, 1, width), dtype=np.float32), "seqlens": np.array([L], np.int32),
            "total": np.array(L + 1, np.int32)}
    past = rng.standard_normal((1, kv, L, d), dtype=np.float32)
    for r in range(R):
        ins += [helper.make_tensor_value_info(f"p{x}{r}", TensorProto.FLOAT, [1, kv, "L", d]) for x in "kv"]
        feed |= {f"p{x}{r}": past for x in "kv"}
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "", "", f"pk{r}", f"pv{r}", "seqlens", "total",
                                                              "cos", "sin"], [f"o{r}", f"k{r}", f"v{r}"],
                                      domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=d ** -0.5,
                                      do_rotary=1, local_window_size=-1))
        outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (f"o{r}", f"k{r}", f"v{r}")]
    return session(nodes, ins, outs, inits), feed


def per_call(make, R: int = 20, runs: int = 60) -> float:
    """µs per node: R and 2R nodes timed interleaved, the difference over R."""
    (a, fa), (b, fb) = make(R), make(2 * R)
    a.run(None, fa), b.run(None, fb)
    times: tuple[list, list] = ([], [])
    for _ in range(runs):
        for (sess, feed), t in zip(((a, fa), (b, fb)), times):
            started = time.thread_time()
            sess.run(None, feed)
            t.append(time.thread_time() - started)
    return (statistics.median(times[1]) - statistics.median(times[0])) / R * 1e6


def main() -> None:
    kind, specs = sys.argv[1], sys.argv[2:]
    if kind == "gqa":
        for spec in specs:
            heads, kv, d, L = (int(x) for x in spec.split(","))
            print(f"GroupQueryAttention heads={heads} kv={kv} d={d} L={L}: "
                  f"{per_call(lambda R: attention(heads, kv, d, L, R), R=15, runs=40):.2f} µs", flush=True)
        return
    rows = []
    for width in (int(w) for w in specs[0].split(",")):
        K, N = (HIDDEN, width) if kind == "up" else (width, HIDDEN)
        rows.append((width, K * N, per_call(lambda R: matmul_nbits(K, N, R))))
        print(f"{kind} K={K} N={N}: {rows[-1][2]:.2f} µs", flush=True)
    macs, us = np.array([r[1] for r in rows], float), np.array([r[2] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.vstack([np.ones_like(macs), macs]).T, us, rcond=None)
    print(f"fit: {a:.2f} µs + {b * 1e3:.4f} µs per 1000 MACs")
    by: dict[int, list[float]] = {}
    for width, m, t in rows:
        grid = next(g for g in (64, 32, 16, 8, 1) if width % g == 0)
        by.setdefault(grid, []).append(t / (a + b * m) - 1)
    for grid, residuals in sorted(by.items()):
        print(f"  widths whose largest grid (≤ 64) is {grid}: {len(residuals)}, median residual "
              f"{statistics.median(residuals):+.1%}")


if __name__ == "__main__":
    main()
