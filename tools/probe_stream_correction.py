"""Can a linear map of a pruned SmolLM2's final stream take back what the blocks' refits lose
(issue 22)? Offline: the final RMSNorm's input and output of the original and of a pruned model,
on the calibration and held-out windows of tools/bench_real_decoders.py; maps fitted on the
calibration windows towards the original's same tensor (ridge towards the identity, λ by 4-fold
cross-validation over whole windows, with the pruner's own least-squares code), scored on the
held-out windows with the bench's perplexity and next-token agreement (logits = the tied
embedding times the stream, as the graph's lm_head).

    python tools/probe_stream_correction.py PRUNED.onnx [--build build/real] [--calibration 64] [--heldout 32]
        [--layers 6 14 22]

Variants: a full d×d matrix + bias after the norm (a MatMul + Add before the lm_head, 2d² FLOPs
per token) or before it (the stream, then the norm; each token weighted by 1/its mean square,
position 0's stream being hundreds of times the others'), and a diagonal (after the norm it folds
into the norm's γ at no cost). Each row also at every λ of the grid, to see what the choice leaves.
Results: docs/DECODERS_REAL.md."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from onnxsnp.compensate.least_squares import RIDGE_GRID, NormalEquations, cross_validated_losses, solve

FOLDS = 4


def final_tensors(model: onnx.ModelProto) -> tuple[str, str]:
    """The final RMSNorm's input (the residual stream) and output (the lm_head's input)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    normed = producer["logits"].input[0]
    inner = next(producer[i] for i in producer[normed].input if i in producer)  # x · rsqrt(mean x² + ε)
    stream = next(i for i in inner.input if i not in producer or producer[i].op_type != "Reciprocal")
    return stream, normed


def stream_after(model: onnx.ModelProto, layer: int) -> str:
    """The residual stream after decoder layer `layer`: the input of the next layer's first RMSNorm
    (the RMSNorms' Pow nodes in graph order, two a layer, as this export has them)."""
    return [node for node in model.graph.node if node.op_type == "Pow"][2 * (layer + 1)].input[0]


def collect(path: Path, windows: dict[str, np.ndarray], layers: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """{"cal_stream", "cal_normed", "held_stream", "held_normed"} and, per layer of `layers`,
    "cal_<layer>", "held_<layer>" (the stream after it): (windows, tokens, d) each."""
    import onnxruntime as ort
    from decoders import step_feed

    from onnxsnp.data.kv_cache import fitted

    model = onnx.load(str(path))
    names = final_tensors(model) + tuple(stream_after(model, layer) for layer in layers)
    kinds = ("stream", "normed") + tuple(str(layer) for layer in layers)
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = {}
    for key, ids in windows.items():
        parts = [session.run(list(names), fitted(session, step_feed(model, ids[i:i + 2]))) for i in range(0, len(ids), 2)]
        for index, kind in enumerate(kinds):
            result[f"{key}_{kind}"] = np.concatenate([p[index] for p in parts]).astype(np.float32)
    return result


def window_folds(count: int) -> np.ndarray:
    return np.arange(count) * FOLDS // count


def fit_full(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
             grid: tuple[float, ...] = RIDGE_GRID) -> tuple[np.ndarray, np.ndarray, float, dict[float, tuple]]:
    """y ≈ x A + b over (windows, tokens, d) arrays, ridge towards A = I; folds of whole windows.
    Returns A, b and λ chosen by cross-validation, and every λ's (A, b)."""
    d = x.shape[-1]
    equations = NormalEquations.empty(d, y.shape[-1], FOLDS)
    for window, fold in enumerate(window_folds(len(x))):
        equations.add(x[window], y[window], int(fold), None if weights is None else weights[window])
    keep, prior = np.arange(d), np.eye(d, y.shape[-1])
    chosen = grid[int(np.argmin(cross_validated_losses(equations, keep, prior, grid)))]
    every = {ridge: ((fit := solve(equations, keep, prior, ridge)).weight, fit.bias) for ridge in grid}
    return *every[chosen], chosen, every


def fit_diagonal(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
                 grid: tuple[float, ...] = (0.0,) + RIDGE_GRID) -> tuple[np.ndarray, float]:
    """y_c ≈ s_c x_c per channel, no intercept (it folds into a norm's γ), ridge towards s = 1
    (λ relative to the mean of the channels' Σx²), chosen by cross-validation over window folds."""
    w = np.ones(x.shape[:2]) if weights is None else weights
    xx, xy = np.einsum("wt,wtc->wc", w, x.astype(np.float64) ** 2), np.einsum("wt,wtc,wtc->wc", w, x, y)
    yy = np.einsum("wt,wtc->wc", w, y.astype(np.float64) ** 2)
    folds = window_folds(len(x))

    def scale(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
        penalty = ridge * a.mean()
        return (b + penalty) / np.maximum(a + penalty, 1e-30)

    errors = np.zeros(len(grid))
    for fold in range(FOLDS):
        train, held = folds != fold, folds == fold
        for index, ridge in enumerate(grid):
            s = scale(xx[train].sum(0), xy[train].sum(0), ridge)
            errors[index] += np.sum(s ** 2 * xx[held].sum(0) - 2 * s * xy[held].sum(0) + yy[held].sum(0))
    chosen = grid[int(np.argmin(errors))]
    return scale(xx.sum(0), xy.sum(0), chosen), chosen


def linear_bound(x: np.ndarray, y: np.ndarray, x_held: np.ndarray, y_held: np.ndarray,
                 grid: tuple[float, ...] = RIDGE_GRID) -> dict[float, tuple[float, float, float, float]]:
    """Per λ: the relative error ‖y − x‖²/‖y‖² on the fitting windows and on held-out ones, each
    before and after a map x A + b fitted on the fitting windows alone. Position 0 is left out
    (the attention sink's stream) and each token is put in the unit of its original stream."""
    def tokens(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = a[:, 1:].astype(np.float64), b[:, 1:].astype(np.float64)
        unit = 1.0 / np.sqrt(np.mean(b ** 2, axis=-1, keepdims=True))
        return a * unit, b * unit

    (x, y), (x_held, y_held) = tokens(x, y), tokens(x_held, y_held)
    relative = lambda a, b: float(np.sum((a - b) ** 2) / np.sum(b ** 2))  # noqa: E731
    _, _, _, every = fit_full(x, y, grid=grid)
    return {ridge: (relative(x, y), relative(x @ weight + bias, y), relative(x_held, y_held),
                    relative(x_held @ weight + bias, y_held)) for ridge, (weight, bias) in every.items()}


def rms_norm(stream: np.ndarray, gamma: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return stream / np.sqrt(np.mean(np.square(stream, dtype=np.float64), axis=-1, keepdims=True) + eps) * gamma


def next_token_scores(normed: np.ndarray, embedding: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position but the last: log p(the next token) and the most likely next token."""
    picked, best = [], []
    for window in range(len(normed)):
        values = (normed[window, :-1].astype(np.float32) @ embedding.T).astype(np.float64)
        values -= values.max(axis=-1, keepdims=True)
        log_probs = values - np.log(np.exp(values).sum(axis=-1, keepdims=True))
        picked.append(np.take_along_axis(log_probs, ids[window, 1:, None], axis=-1)[:, 0])
        best.append(values.argmax(-1))
    return np.concatenate(picked), np.concatenate(best)


def main() -> None:
    import bench_real_decoders as bench
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from onnxsnp.data.calib_text import stream_windows

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--build", type=Path, default=bench.BUILD)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="*", default=[],
                        help="also: how much of the stream's error after these layers a fitted linear map takes back")
    args = parser.parse_args()
    source = bench.smollm2(args.build)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = bench.texts()
    windows = {"cal": stream_windows(tokenizer, calibration_texts, bench.WINDOW, args.calibration),
               "held": stream_windows(tokenizer, heldout_texts, bench.WINDOW, args.heldout)}
    weights = load_file(str(source.parent / "model.safetensors"))
    embedding, gamma = weights["model.embed_tokens.weight"], weights["model.norm.weight"].astype(np.float64)
    layers = tuple(args.layers)
    original, pruned = collect(source, windows, layers), collect(args.pruned, windows, layers)
    if layers:
        print("| stream | λ | calibration: error → after the map | held-out: error → after the map |\n|---|---|---|---|")
    for layer in layers:
        bound = linear_bound(pruned[f"cal_{layer}"], original[f"cal_{layer}"], pruned[f"held_{layer}"],
                             original[f"held_{layer}"])
        for ridge, (before, after, held_before, held_after) in bound.items():
            print(f"| after layer {layer} | {ridge:g} | {before:.4f} → {after:.4f} | {held_before:.4f} → {held_after:.4f} |")
    ids = windows["held"]
    reference_picked, reference = next_token_scores(original["held_normed"], embedding, ids)
    base = float(np.exp(-reference_picked.mean()))
    print("| final-stream correction | λ | perplexity | × original | next-token agreement |\n|---|---|---|---|---|")
    print(f"| original | – | {base:.2f} | 1.000× | 100.0 % |")

    def row(label: str, ridge: str, normed: np.ndarray) -> None:
        picked, best = next_token_scores(normed, embedding, ids)
        value = float(np.exp(-picked.mean()))
        print(f"| {label} | {ridge} | {value:.2f} | {value / base:.3f}× | {(best == reference).mean():.1%} |", flush=True)

    row("none (the pruned model)", "–", pruned["held_normed"])
    for where in ("normed", "stream"):
        x, y, held = (pruned[f"cal_{where}"].astype(np.float64), original[f"cal_{where}"].astype(np.float64),
                      pruned[f"held_{where}"].astype(np.float64))
        finish = (lambda h: h) if where == "normed" else (lambda h: rms_norm(h, gamma))
        weights_of = None if where == "normed" else 1.0 / np.mean(np.square(y), axis=-1)
        place = "after the final norm" if where == "normed" else "before the final norm"
        _, _, chosen, every = fit_full(x, y, weights_of)
        for ridge, (weight, bias) in every.items():
            row(f"full d×d + bias, {place}", f"{ridge:g}{' (CV)' if ridge == chosen else ''}", finish(held @ weight + bias))
        scale, ridge = fit_diagonal(x, y, weights_of)
        row(f"diagonal, {place}", f"{ridge:g} (CV)", finish(held * scale))


if __name__ == "__main__":
    main()
