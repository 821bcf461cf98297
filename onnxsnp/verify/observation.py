"""What the input model does on the held-back samples, and the same for the pruned model:
outputs, attention maps and run-time shapes (for the FLOPs count): the few samples with tensors
added as outputs run in small batches in a session of their own, the rest in one without them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import calibration as calib_stage
from ..data.calibration import Runner, capture
from .attention_maps import AttentionSample, sample_maps
from .spill import Outputs
from ..ir.stats import ModelStats, count_params, macs_from_shapes, shape_tensors
from .verification import Fidelity, attention_error, fidelity, language_model_fidelity


def _count(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]


MAP_SAMPLES = 16  # held-back samples whose attention maps are compared (they are kept in memory)


@dataclass
class Observed:
    """The input model on the held-back samples."""

    outputs: list[np.ndarray]
    maps: dict[str, np.ndarray]  # softmax outputs of the first MAP_SAMPLES samples
    shapes: dict[str, tuple[int, ...]]  # of stats.shape_tensors, on `shape_samples` samples
    shape_samples: int


def observe(model: onnx.ModelProto, probes: list[str], feed: dict[str, np.ndarray], batch: int,
             fixed: int | None, weights: calib_stage.Weights | None = None) -> Observed:
    """`weights`: decoded arrays for the session to share; without them a large model's session
    reads its weights from a file (calibration.session)."""
    maps, outputs, shapes = _probe_run(model, "input model", probes, feed, batch, fixed, weights)
    return Observed(outputs, maps, shapes, fixed or 1)


def _probe_run(model: onnx.ModelProto, role: str, probes: list[str], feed: dict[str, np.ndarray], batch: int,
               fixed: int | None, weights: calib_stage.Weights | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, tuple[int, ...]]]:
    """The outputs of `model` over `feed`, the `probes` over the first MAP_SAMPLES samples and the
    shapes of stats.shape_tensors on the first sample(s). Probed samples run at the smallest batch
    the model takes, in a session of their own: onnxruntime keeps every graph output of a run alive
    to its end, so the many added outputs would cost a batch's worth each in the bulk runs (DeiT-S,
    batches of 8: 0.6 GB more than the model's own outputs need)."""
    shape_names = shape_tensors(model)
    step = fixed or 1
    probed = max(step, MAP_SAMPLES // step * step)
    parts = [({k: v[:step] for k, v in feed.items()}, step, probes + shape_names),  # also the shapes
             ({k: v[step:probed] for k, v in feed.items()}, step, probes)]
    rest = {k: v[probed:] for k, v in feed.items()}
    outputs, maps, shapes, values = Outputs(_count(feed)), {name: [] for name in probes}, {}, None
    # without decoded weights to share, both sessions read the weights from one file (weight_file.py)
    written = calib_stage.weight_file(model) if weights is None else None
    try:
        runner = Runner(model, probes + shape_names, role=role, weights=weights, weight_file=written)
        for part, size, extra in parts:
            if not _count(part):
                continue
            names = list(dict.fromkeys(runner.output_names + extra))
            for _, values in runner.batches(part, names, size):
                outputs.add([values[name] for name in runner.output_names])
                for name in probes:
                    maps[name].append(np.array(values[name]))  # a copy: a kept view pins onnxruntime's buffers
                shapes = shapes or {name: values[name].shape for name in shape_names}
        del runner, values
        if _count(rest):
            runner = Runner(model, role=role, weights=weights, weight_file=written)
            if written is not None:
                written.close()  # read while the session was built: the disk space goes now
            for _, values in runner.batches(rest, runner.output_names, batch):
                outputs.add([values[name] for name in runner.output_names])
    except BaseException:
        outputs.close()
        raise
    finally:
        if written is not None:
            written.close()
    return {name: np.concatenate(chunks) for name, chunks in maps.items()}, outputs.joined(), shapes


@dataclass(frozen=True)
class Verified:
    """The pruned model beside the original on the held-back samples."""

    fidelity: Fidelity
    attention_kl: dict[str, float]  # attention block → mean KL of its maps
    shapes: dict[str, tuple[int, ...]]  # the pruned model's run-time shapes (for its FLOPs count)
    maps: list[AttentionSample]  # a few maps, the heads that changed most


def verify_pruned(observed: Observed, pruned: onnx.ModelProto, plan, probes: dict[str, str],
                  feed: dict[str, np.ndarray], batch: int, fixed: int | None, mask_name: str | None,
                  quantized_probabilities: bool = False) -> Verified:
    """`verify` for the attention blocks `plan` kept (`probes`: block → its probabilities tensor);
    `quantized_probabilities`: the softmax outputs are integers (QOperator), so maps are not compared."""
    # the softmax's heads are query heads (grouped-query attention: every query head of a kept group)
    softmax_blocks = {} if quantized_probabilities else {
        keep.block.name: (probes[keep.block.name], keep.query_heads()) for keep in plan.attention
        if keep.block.name in probes}
    return Verified(*verify(observed, pruned, softmax_blocks, feed, batch, fixed, mask_name))


def verify(observed: Observed, pruned: onnx.ModelProto, softmax_blocks: dict[str, tuple[str, np.ndarray]],
            feed: dict[str, np.ndarray], batch: int, fixed: int | None, mask_name: str | None
            ) -> tuple[Fidelity, dict[str, float], dict[str, tuple[int, ...]], list[AttentionSample]]:
    """Output fidelity, per-block attention-map error, run-time shapes and a few maps of the
    pruned model beside the original's (the heads that changed most) on the held-back samples."""
    probes = sorted({tensor for tensor, _ in softmax_blocks.values()})
    maps, outputs, shapes = _probe_run(pruned, "pruned model", probes, feed, batch, fixed)
    measured = fidelity(observed.outputs, outputs)
    language = language_model_fidelity([o.name for o in pruned.graph.output], observed.outputs, outputs, feed,
                                       mask_name)
    if language:
        measured = dataclasses.replace(measured, **language)
    if not maps:
        return measured, {}, shapes, []
    inputs = {k: v[:len(next(iter(maps.values())))] for k, v in feed.items()}
    return (measured, attention_error([(inputs, observed.maps, maps)], softmax_blocks, mask_name), shapes,
            sample_maps(inputs, observed.maps, maps, softmax_blocks, mask_name))


def node_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs per sample of `feed` of each MatMul, Gemm, Conv and attention node, by node name.

    Shapes are read from one onnxruntime run rather than from ONNX shape inference, which
    loses track of dynamic exports' Shape→Gather→Concat reshapes."""
    wanted = shape_tensors(model)
    samples = next(iter(feed.values())).shape[0]
    shapes = {}
    for _, values in capture(model, wanted, feed, samples):
        shapes.update({name: value.shape for name, value in values.items()})
    return macs_from_shapes(model, shapes, samples)


def count_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """MACs of MatMul, Gemm, Conv and attention ops per sample of `feed`."""
    return sum(node_macs(model, feed).values())


def model_stats(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> ModelStats:
    return ModelStats(count_params(model), count_macs(model, feed))
