"""SmolLM2-135M's int8 rows of docs/QUANTIZED.md a stage at a time, so that the long prunes can
run side by side and one float prune serves every quantizer: each stage is a process of its own,
with tools/bench_real_decoders.py's text, windows and scores (`--quantize`'s settings: 64
calibration windows of 128 tokens for the pruner, 32 held-out windows).

    python tools/int8_decoder_rows.py quantize FORM SOURCE OUT   # FORM: FORMS below
    python tools/int8_decoder_rows.py prune SOURCE OUT [--ratio 0.25] [--calibration 64]
    python tools/int8_decoder_rows.py score MODEL [MODEL ...]      # perplexity × float, agreement
    python tools/int8_decoder_rows.py speed ORIGINAL PRUNED [ORIGINAL PRUNED ...] [--rounds 5]

SOURCE / MODEL: a model.onnx (external data beside it is read). `prune` writes OUT with its data
beside it and OUT.json (the report's FLOPs). The static quantizers are calibrated as the tests'
(tests/test_decoder_int8.py `quantizer_feeds`) on prefills and decode steps through SOURCE's own
cache: the first `STATIC_WINDOWS` calibration windows, a prefill of the first `PREFILL` tokens
and a step of the rest (on prefills alone onnxruntime gives each past input a scale of 1).
`speed` times each pair with tools/bench_decoder_speed.py's loop (a prefill of 128 tokens, then 64
cached decode steps; one intra-op thread; the calling thread's CPU clock, for a shared machine),
every model of every pair interleaved round by round; the cut is PRUNED.json's (`prune`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

import bench_real_decoders as bench
from harness import BUILD
from decoders import step_feed
from onnxsnp.data.calib_text import stream_windows
from onnxsnp.options import make_options
from onnxsnp.pipeline import prune_model

SOURCE = BUILD / "real" / "smollm2" / "model.onnx"  # tools/bench_real_decoders.py builds it
CALIBRATION, HELDOUT = 64, 32  # bench_real_decoders --quantize's row (docs/QUANTIZED.md)
STATIC_WINDOWS, PREFILL, BATCH = 16, 112, 2  # the static quantizers' feeds: 8 prefills + 8 steps of 16 tokens
# onnxruntime's forms, as tests/test_decoder_int8.py names them
# "-mask-float": the Adds of the causal mask to the attention scores and the Softmaxes after them left
# in float (nodes_to_exclude):
# quantized, the mask's -3.4e38 sets the sum's scale to ~1e36 and every visible score rounds to one level
FORMS = ("dynamic-tensor", "dynamic-channel", "qdq-matmul-channel", "qdq-all-tensor", "qoperator",
         "qdq-all-tensor-mask-float", "qoperator-mask-float")


def mask_adds(model: onnx.ModelProto) -> list[str]:
    """The Add nodes whose sum a Softmax reads (the scores plus the causal mask), and those
    Softmaxes: a QLinearSoftmax would quantize the same sum on its input."""
    softmaxes = {n.input[0]: n.name for n in model.graph.node if n.op_type == "Softmax"}
    adds = [n for n in model.graph.node if n.op_type == "Add" and n.output[0] in softmaxes]
    return [n.name for n in adds] + [softmaxes[n.output[0]] for n in adds]


def windows(count: int, heldout: bool = False) -> np.ndarray:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(SOURCE.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = bench.texts()
    return stream_windows(tokenizer, heldout_texts if heldout else calibration_texts, bench.WINDOW, count)


def quantizer_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Prefills, and decode steps that read what the prefill left in the model's own cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ids, feeds = windows(CALIBRATION)[:STATIC_WINDOWS], []
    for i in range(0, len(ids), BATCH):
        first = step_feed(model, ids[i:i + BATCH, :PREFILL])
        out = dict(zip(names, session.run(None, first)))
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        feeds += [first, step_feed(model, ids[i:i + BATCH, PREFILL:], past, PREFILL)]
    return feeds


def quantize(form: str, source: Path, target: Path) -> None:
    """`source` in onnxruntime's `form` (int8 weights; static: uint8 activations, its defaults)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    model = onnx.load(str(source))  # loaded: given a path the quantizers write a copy beside it
    target.parent.mkdir(parents=True, exist_ok=True)
    if form.startswith("dynamic"):
        quantize_dynamic(model, str(target), weight_type=QuantType.QInt8, per_channel=form.endswith("channel"))
        return
    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    reader = Reader(quantizer_feeds(model))
    excluded = mask_adds(model) if form.endswith("mask-float") else []
    if form.startswith("qoperator"):  # every op onnxruntime quantizes, per tensor
        quantize_static(model, str(target), reader, quant_format=QuantFormat.QOperator, nodes_to_exclude=excluded)
        return
    quantize_static(model, str(target), reader, quant_format=QuantFormat.QDQ, per_channel=form.endswith("channel"),
                    op_types_to_quantize=["MatMul"] if "matmul" in form else None, nodes_to_exclude=excluded)


def prune(source: Path, target: Path, ratio: float, count: int) -> None:
    ids = windows(count)
    started = time.time()
    result = prune_model(str(source), make_options(measure_latency=False, ratio=ratio),
                         calib={"input_ids": ids, "attention_mask": np.ones_like(ids)})
    took = time.time() - started
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(result.model, str(target), save_as_external_data=True, location=target.name + ".data")
    report = {"flops_before": result.report.flops_before, "flops_after": result.report.flops_after,
              "skipped": [str(s) for s in result.report.skipped], "seconds": round(took)}
    Path(f"{target}.json").write_text(json.dumps(report))
    print(json.dumps(report))


def score(models: list[Path]) -> None:
    heldout = windows(HELDOUT, heldout=True)
    picked, reference = bench.scores(onnx.load(str(SOURCE)), heldout)
    base = float(np.exp(-picked.mean()))
    print(f"float original: perplexity {base:.2f} on {len(heldout)} windows", flush=True)
    for path in models:
        ratio, agreement = bench.fidelity(onnx.load(str(path)), heldout, (base, reference))
        print(f"{path}: perplexity × float {ratio:.3f}×, next-token agreement {agreement:.1%}", flush=True)


def speed(paths: list[Path], runs: int) -> None:
    import os

    from bench_decoder_speed import timings

    if len(paths) % 2:
        raise SystemExit("int8_decoder_rows speed: give ORIGINAL PRUNED pairs")
    load = os.getloadavg()[0]
    measured = timings(paths, runs, (1,), time.thread_time)
    for i in range(0, len(paths), 2):
        report = json.loads(Path(f"{paths[i + 1]}.json").read_text())
        ideal = report["flops_before"] / report["flops_after"]
        (p0, d0, _), (p1, d1, _) = measured[i][0], measured[i + 1][0]
        print(f"{paths[i]} -> {paths[i + 1]}: FLOPs -{1 - 1 / ideal:.1%} ({ideal:.3f}x); "
              f"prefill {p0:.1f} -> {p1:.1f} ms ({p0 / p1:.2f}x, / cut {p0 / p1 / ideal:.2f}); "
              f"decode {d0:.2f} -> {d1:.2f} ms/token ({d0 / d1:.2f}x, / cut {d0 / d1 / ideal:.2f})", flush=True)
    print(f"{runs} interleaved rounds, thread CPU clock, load {load:.1f} -> {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    q = stages.add_parser("quantize")
    q.add_argument("form", choices=FORMS)
    q.add_argument("source", type=Path)
    q.add_argument("out", type=Path)
    p = stages.add_parser("prune")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--calibration", type=int, default=CALIBRATION)
    s = stages.add_parser("score")
    s.add_argument("models", type=Path, nargs="+")
    t = stages.add_parser("speed")
    t.add_argument("models", type=Path, nargs="+")
    t.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.stage == "speed":
        speed(args.models, args.rounds)
    elif args.stage == "quantize":
        quantize(args.form, args.source, args.out)
    elif args.stage == "prune":
        prune(args.source, args.out, args.ratio, args.calibration)
    else:
        score(args.models)


if __name__ == "__main__":
    main()
