"""Where a pruned SmolLM2 disagrees with the original (issue 22): next-token agreement by the
original's top-1 margin, and each layer's residual-stream error, on the held-out windows of
tools/bench_real_decoders.py.

    python tools/diagnose_agreement.py PRUNED.onnx [--build build/real] [--heldout 32]

PRUNED.onnx: a pruned export of the bench's SmolLM2 (e.g. `onnxsnp build/real/smollm2/model.onnx
PRUNED.onnx --calib-text …`, or a bench run's `result.model` saved). The stream errors leave out
position 0, whose mean square is hundreds of times the others' (the attention sink)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

MARGIN_EDGES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, np.inf)  # nats between the original's top two


def margin_rows(margins: np.ndarray, agree: np.ndarray, kl: np.ndarray,
                edges: tuple[float, ...] = MARGIN_EDGES) -> list[tuple[float, float, float, float, float, float]]:
    """Per margin bin [low, high): (low, high, share of positions, agreement there, share of all
    disagreements there, mean KL(original ‖ pruned) there); empty bins are left out."""
    wrong = max(int((~agree).sum()), 1)
    rows = []
    for low, high in zip(edges, edges[1:]):
        inside = (margins >= low) & (margins < high)
        if inside.any():
            rows.append((low, high, float(inside.mean()), float(agree[inside].mean()),
                         float((inside & ~agree).sum() / wrong), float(kl[inside].mean())))
    return rows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--build", type=Path, help="the bench's build folder (default: build/real)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out windows of 128 tokens")
    args = parser.parse_args()
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import bench_real_decoders as bench
    from decoders import step_feed
    from onnxsnp.data.calib_text import stream_windows
    from onnxsnp.data.kv_cache import fitted
    from onnxsnp.ir.graph import ModelGraph
    from onnxsnp.match import find_blocks

    source = bench.smollm2(args.build or bench.BUILD)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    heldout = stream_windows(tokenizer, bench.texts()[1], bench.WINDOW, args.heldout)
    original, pruned = onnx.load(str(source)), onnx.load(str(args.pruned))
    streams = [name for layer in find_blocks(ModelGraph(original)).layers for name in (layer.middle, layer.output)]

    def session(model: onnx.ModelProto):
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        have = {o.name for o in exposed.graph.output}
        exposed.graph.output.extend(onnx.helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None)
                                    for s in streams if s not in have)
        return ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])

    sessions, names = (session(original), session(pruned)), ["logits"] + streams
    error, margins, agree, kl, positions = np.zeros(len(streams)), [], [], [], 0
    for start in range(0, len(heldout), 2):
        batch = heldout[start:start + 2]
        (first, *ours), (second, *theirs) = (s.run(names, fitted(s, step_feed(m, batch)))
                                             for s, m in zip(sessions, (original, pruned)))
        for index, (a, b) in enumerate(zip(ours, theirs)):
            a, b = a[:, 1:].astype(np.float64), b[:, 1:].astype(np.float64)
            error[index] += float((np.square(b - a).sum(-1) / np.square(a).sum(-1)).sum())
        positions += batch.shape[0] * (batch.shape[1] - 1)
        p, q = log_softmax(first[:, :-1]), log_softmax(second[:, :-1])
        top = np.sort(p, axis=-1)[..., -2:]
        margins.append((top[..., 1] - top[..., 0]).ravel())
        agree.append((p.argmax(-1) == q.argmax(-1)).ravel())
        kl.append((np.exp(p) * (p - q)).sum(-1).ravel())
    margins, agree, kl = (np.concatenate(v) for v in (margins, agree, kl))
    print(f"agreement {agree.mean():.1%}, mean KL(original ‖ pruned) {kl.mean():.3f} over {len(agree):,} positions")
    print("| original's top-1 margin (nats) | share of positions | agreement | share of disagreements | mean KL |")
    print("|---|---|---|---|---|")
    for low, high, share, agreed, wrong, divergence in margin_rows(margins, agree, kl):
        print(f"| [{low:g}, {high:g}) | {share:.1%} | {agreed:.1%} | {wrong:.1%} | {divergence:.3f} |")
    print("\n| layer | ‖δ‖²/‖h‖² after attention | after FFN |\n|---|---|---|")
    for layer in range(len(streams) // 2):
        print(f"| {layer} | {error[2 * layer] / positions:.4f} | {error[2 * layer + 1] / positions:.4f} |")


if __name__ == "__main__":
    main()
