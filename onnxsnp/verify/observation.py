"""What the input model does on the held-back samples, and the same for the pruned model:
outputs, attention maps and run-time shapes (for the FLOPs count): the few samples with tensors
added as outputs run in small batches in a session of their own, the rest in one without them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..data import calibration as calib_stage
from ..data.calibration import Runner, capture, shape_output
from .attention_maps import AttentionSample, sample_maps
from .spill import Outputs
from ..ir.stats import ModelStats, count_params, macs_from_shapes, shape_tensors
from .verification import AttentionTerms, Fidelity, fidelity, language_model_fidelity


def _count(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]


MAP_SAMPLES = 16  # held-back samples whose attention maps are compared (the original's are kept)


@dataclass
class Observed:
    """The input model on the held-back samples."""

    outputs: list[np.ndarray]
    maps: dict  # softmax outputs of the first MAP_SAMPLES samples (arrays, or spill.OnDisk above SPILL_BYTES)
    shapes: dict[str, tuple[int, ...]]  # of stats.shape_tensors, on `shape_samples` samples
    shape_samples: int


def observe(model: onnx.ModelProto, probes: list[str], feed: dict[str, np.ndarray], batch: int,
             fixed: int | None, weights: calib_stage.Weights | None = None) -> Observed:
    """`weights`: decoded arrays for the session to share; without them a large model's session
    reads its weights from a file (calibration.session)."""
    maps, outputs, shapes = _probe_run(model, "input model", probes, feed, batch, fixed, weights)
    return Observed(outputs, maps, shapes, fixed or 1)


def _without_arena(options: ort.SessionOptions) -> None:
    """The probe runs' session options: no memory arena. The arena keeps the largest run's
    buffers for the next, and grows by doubling, so that each run over the held-back samples
    left its whole working set behind: SmolLM2-135M in static QDQ int8, one 128-token window a
    run, rose +690 MB on the first run and +570 MB more on the second (observe and verify alike;
    verify's peak +1,400 MB over its start). Freed to the heap, each buffer is reused by the next
    allocation: +800 MB (docs/QUANTIZED.md, "The verification's sessions"). The kernels and
    their inputs are the same: no value changes."""
    options.enable_cpu_mem_arena = False


MapsSeen = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]  # (inputs, probes) of one batch


def _probe_run(model: onnx.ModelProto, role: str, probes: list[str], feed: dict[str, np.ndarray], batch: int,
               fixed: int | None, weights: calib_stage.Weights | None = None, maps_seen: MapsSeen | None = None
               ) -> tuple[dict, list, dict[str, tuple[int, ...]]]:
    """The outputs of `model` over `feed`, the `probes` over the first MAP_SAMPLES samples and the
    shapes of stats.shape_tensors on the first sample(s). Probed samples run at the smallest batch
    the model takes, in a session of their own: onnxruntime keeps every graph output of a run alive
    to its end, so the many added outputs would cost a batch's worth each in the bulk runs (DeiT-S,
    batches of 8: 0.6 GB more than the model's own outputs need). The shapes come from Shape nodes
    (calibration.shape_output), not from the tensors themselves (a whole forward pass held at once).

    The probes' values are kept (on disk above spill.SPILL_BYTES, as the outputs) and returned,
    or, with `maps_seen`, handed to it batch by batch and not kept (the pruned model's maps are
    compared with the original's as they come: verify)."""
    shape_names = shape_tensors(model)
    step = fixed or 1
    probed = min(max(step, MAP_SAMPLES // step * step), _count(feed))
    parts = [({k: v[:step] for k, v in feed.items()}, step, True),  # also the shapes
             ({k: v[step:probed] for k, v in feed.items()}, step, False)]
    rest = {k: v[probed:] for k, v in feed.items()}
    outputs, maps, shapes = Outputs(_count(feed)), Outputs(probed), {}
    # without decoded weights to share, both sessions read the weights from one file (weight_file.py)
    written = calib_stage.weight_file(model) if weights is None else None
    try:
        runner = Runner(model, probes, role=role, weights=weights, weight_file=written, shapes_of=shape_names,
                        configure=_without_arena)
        for part, size, with_shapes in parts:
            if not _count(part):
                continue
            shape_outputs = [shape_output(name) for name in shape_names] if with_shapes else []
            names = list(dict.fromkeys(runner.output_names + probes + shape_outputs))
            for inputs, values in runner.batches(part, names, size):
                outputs.add([values[name] for name in runner.output_names], _count(inputs))
                if maps_seen is not None:
                    maps_seen(inputs, {name: values[name] for name in probes})
                elif probes:  # copied (a kept view pins onnxruntime's buffers), or written to disk
                    maps.add([values[name] for name in probes], _count(inputs))
                shapes = shapes or {name: tuple(int(d) for d in values[shape_output(name)]) for name in shape_names}
                del values  # before the next run: a run's fetched buffers are not reused while held
        del runner
        if _count(rest):
            runner = Runner(model, role=role, weights=weights, weight_file=written, configure=_without_arena)
            if written is not None:
                written.close()  # read while the session was built: the disk space goes now
            for inputs, values in runner.batches(rest, runner.output_names, batch):
                outputs.add([values[name] for name in runner.output_names], _count(inputs))
                del values
    except BaseException:
        outputs.close()
        maps.close()
        raise
    finally:
        if written is not None:
            written.close()
    kept = dict(zip(probes, maps.joined())) if maps_seen is None and probes else {}
    return kept, outputs.joined(), shapes


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
    terms, first, seen = AttentionTerms(softmax_blocks, mask_name), {}, [0]

    def compare(inputs: dict[str, np.ndarray], maps: dict[str, np.ndarray]) -> None:
        """One probed batch of the pruned model's maps against the original's (read from disk
        where they were spilled); only the first sample's are kept, for the report's maps."""
        start, count = seen[0], _count(inputs)
        rows = {name: len(value) // count for name, value in maps.items()}  # per sample: 1, or heads where (B·H, N, N)
        terms.add(inputs, {name: observed.maps[name][start * rows[name]:(start + count) * rows[name]]
                           for name in maps}, maps)
        if start == 0:
            first.update({name: np.array(value[:rows[name]]) for name, value in maps.items()})
        seen[0] += count

    _, outputs, shapes = _probe_run(pruned, "pruned model", probes, feed, batch, fixed,
                                    maps_seen=compare if probes else None)
    measured = fidelity(observed.outputs, outputs)
    language = language_model_fidelity([o.name for o in pruned.graph.output], observed.outputs, outputs, feed,
                                       mask_name)
    if language:
        measured = dataclasses.replace(measured, **language)
    if not probes:
        return measured, {}, shapes, []
    inputs = {k: v[:seen[0]] for k, v in feed.items()}
    return measured, terms.means(), shapes, sample_maps(inputs, observed.maps, first, softmax_blocks, mask_name)


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
