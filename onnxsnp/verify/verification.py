"""Stage 7: prove the pruned model is sound before it is written, and measure its fidelity."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import shape_inference

from ..data.calibration import Runner, Weights, session, without_initializers
from ..data.kv_cache import fitted
from ..data.timing import decode_feed, interleaved_medians, is_past, time_base
from ..errors import SnpError
from ..io.loading import is_big, model_file
from ..ir import external
from ..ir.sizes import raw_bytes

log = logging.getLogger("onnxsnp")


@dataclass(frozen=True)
class Fidelity:
    """Pruned against original outputs on held-back calibration samples."""

    samples: int
    output_cosine: float  # mean over samples and outputs of the cosine of flattened outputs
    max_abs_diff: float
    top1_agreement: float | None  # for classifier-shaped outputs (samples, classes)
    # the cosine after removing the original's mean over samples from both: outputs that share a
    # large common part (a class token, a bias) score near 1 on plain cosine whatever the rest does
    centred_cosine: float = 1.0
    relative_error: float = 0.0  # mean over samples of ‖pruned − original‖ / ‖original‖
    # language models (a `logits` output over `input_ids`): teacher-forced perplexity of the held-back
    # text under the original and the pruned model, and the share of positions whose most likely next
    # token is the original's; logits cosine says little there (0.96 for a model 3× as perplexed)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    next_token_agreement: float | None = None
    tokens: int | None = None  # positions those are measured on

    @property
    def perplexity_ratio(self) -> float | None:
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before

    def as_dict(self) -> dict:
        data = {"samples": self.samples, "output_cosine": self.output_cosine,
                "centred_cosine": self.centred_cosine, "relative_error": self.relative_error,
                "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement}
        if self.perplexity_before is not None:
            data.update(perplexity_before=self.perplexity_before, perplexity_after=self.perplexity_after,
                        perplexity_ratio=self.perplexity_ratio, next_token_agreement=self.next_token_agreement,
                        tokens=self.tokens)
        return data


def language_model_fidelity(names: list[str], original: list[np.ndarray], pruned: list[np.ndarray],
                            feed: dict[str, np.ndarray], mask_name: str | None) -> dict:
    """Perplexity before and after and next-token agreement, where the model has a `logits` output
    (samples, tokens, vocabulary) over an `input_ids` input; {} otherwise. Position t predicts
    token t + 1; padded positions (the attention mask) are left out."""
    ids = feed.get("input_ids")
    if "logits" not in names or ids is None:
        return {}
    before, after = original[names.index("logits")], pruned[names.index("logits")]
    if before.ndim != 3 or before.shape[:2] != ids.shape or ids.shape[1] < 2:
        return {}
    valid = np.ones(ids.shape, bool)
    mask = feed.get(mask_name) if mask_name else None
    if mask is not None and mask.shape == ids.shape:
        valid = mask > 0
    used = valid[:, :-1] & valid[:, 1:]
    if not used.any():
        return {}
    step = max(1, _BLOCK_VALUES // before.shape[2])  # positions at a time: their float64 rows stay in cache

    def perplexity(logits: np.ndarray) -> float:
        total = 0.0
        for sample in range(len(ids)):
            positions = np.flatnonzero(used[sample])
            values = logits[sample]  # one sample read once (a spilled output is read from disk)
            for start in range(0, len(positions), step):
                at = positions[start:start + step]
                rows = values[at].astype(np.float64)
                rows -= rows.max(axis=-1, keepdims=True)
                targets = ids[sample, at + 1]
                total += float((rows[np.arange(len(rows)), targets] - np.log(np.exp(rows).sum(axis=-1))).sum())
        return float(np.exp(-total / used.sum()))

    agreement = float(sum((before[s, :-1][used[s]].argmax(-1) == after[s, :-1][used[s]].argmax(-1)).sum()
                          for s in range(len(ids))) / used.sum())
    return {"perplexity_before": perplexity(before), "perplexity_after": perplexity(after),
            "next_token_agreement": agreement, "tokens": int(used.sum())}


# onnxruntime registers these in the ONNX domain, where ONNX itself has no schema for them (the
# checker would reject every model onnxruntime-genai's builder writes): checked as contrib ops
_ORT_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker plus strict-enough shape inference; raises SnpError on failure."""
    moved = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in _ORT_IN_ONNX_DOMAIN]
    if moved and not any(o.domain == "com.microsoft" for o in model.opset_import):
        moved = []  # no contrib domain to check them under: left to the checker as they are
    try:
        for node in moved:
            node.domain = "com.microsoft"
        _check_structure(model)
    finally:
        for node in moved:
            node.domain = ""


def _check_structure(model: onnx.ModelProto) -> None:
    def inference():
        shape_inference.infer_shapes(weight_stubs(model), check_type=True, strict_mode=True, data_prop=True)

    if external.has_lazy(model):  # weights still in files (external.py): the checker takes relative locations only
        _check(lambda: onnx.checker.check_model(_checkable(model)), inference)
    elif is_big(model):  # the checker takes big models by path
        with model_file(model) as path:
            _check(lambda: onnx.checker.check_model(str(path)), inference)
    else:
        _check(lambda: onnx.checker.check_model(model), inference)


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (weights still in files: external.py) for the checker, which takes relative data
    locations only, and no links to them: each such weight a typed graph input instead, its stub's
    length checked here against its dims."""
    light = without_initializers(model)
    declared = {info.name for info in model.graph.input}
    for tensor in model.graph.initializer:
        if not external.is_lazy(tensor):
            light.graph.initializer.add().CopyFrom(tensor)
            continue
        if raw_bytes(tensor) != external.raw_bytes_declared(tensor) and external.raw_bytes_declared(tensor):
            raise SnpError(f"pruned model fails onnx.checker: {tensor.name} holds {raw_bytes(tensor)} bytes, "
                           f"its dims {external.raw_bytes_declared(tensor)}")
        if tensor.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    return light


def weight_stubs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose larger initializers keep their name, type and dims but no data
    (marked external), for shape inference: it reads shapes and the values of small integer
    tensors only, and inferring on the whole model serialised, copied and parsed back every weight
    (a 270 MB decoder: 1-2 s, as much again as the checker; a big model's path-based inference saw
    the same stubs, its weights being external data). Integer tensors are kept whole: they may be
    shapes that data propagation reads."""
    light = without_initializers(model)
    for tensor in model.graph.initializer:
        if raw_bytes(tensor) >= 1024 and tensor.data_type not in _SHAPE_TYPES:
            stub = light.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="onnxsnp-shape-inference")
        else:
            light.graph.initializer.add().CopyFrom(external.inline(tensor))
    return light


_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _check(checker, inference) -> None:
    try:
        checker()
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise SnpError(f"pruned model fails onnx.checker: {_line(exc)}") from None
    try:
        inference()
    except Exception as exc:
        raise SnpError(f"pruned model fails shape inference: {_line(exc)}") from None


def run_outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """The pruned model's outputs over `feed` (one session, built here)."""
    return Runner(model, role="pruned model").outputs(feed, batch)


# float64 values compared at a time: a block of columns (and of rows, where there are many) that
# stays in cache. Whole rows at once (a language model's logits: 6 M values a sample) made several
# float64 copies of hundreds of MB per output and page-faulted them in: 6 of the 10 s of a 4-layer
# decoder's verification (docs/PRUNE_COST_DECODER.md)
_BLOCK_VALUES = 2**18
_MIN_COLUMNS = 256  # however many rows: narrower column slices cost more in strides than they save
# samples whose statistics are summed together (from disk, where the outputs were spilled, each
# (_BLOCK_VALUES) block is read as it is summed: docs/SCALING.md, "Seventh round")
_CHUNK_BYTES = 256 * 2**20


def fidelity(original: list[np.ndarray], pruned: list[np.ndarray]) -> Fidelity:
    if len(original) != len(pruned):
        raise SnpError("pruned model has a different number of outputs")
    cosines, centred, errors, max_diff, top1 = [], [], [], 0.0, None
    for ref, got in zip(original, pruned):
        if ref.shape != got.shape:
            raise SnpError(f"pruned model output shape {got.shape} differs from the original {ref.shape}")
        if ref.dtype.kind != "f":
            continue
        rows, width = (ref.shape[0], int(np.prod(ref.shape[1:]))) if ref.ndim else (1, 1)
        mean = _sample_mean(ref, rows, width) if rows > 1 else np.zeros(width)
        # a few samples at a time: a language model's logits over every held-back sample may live
        # on disk (spill.py), and whole float64 copies of them took gigabytes
        step = max(1, _CHUNK_BYTES // max(4 * width, 1))
        for start in range(0, rows, step):
            sums, output_max = _row_sums(_rows(ref, start, start + step, width),
                                         _rows(got, start, start + step, width), mean)
            max_diff = max(max_diff, output_max)
            cosines.append(_cosines(*sums[0:3]))
            centred.append(_cosines(*sums[3:6]))
            errors.append(np.sqrt(sums[6]) / np.maximum(np.sqrt(sums[1]), 1e-300))
        if top1 is None and ref.ndim == 2 and ref.shape[1] > 1:
            top1 = float((ref[:].argmax(axis=1) == got[:].argmax(axis=1)).mean())
    cosine = float(np.mean(np.concatenate(cosines))) if cosines else 1.0
    samples = original[0].shape[0] if original and original[0].ndim else 1
    return Fidelity(int(samples), cosine, max_diff, top1,
                    float(np.mean(np.concatenate(centred))) if centred else 1.0,
                    float(np.mean(np.concatenate(errors))) if errors else 0.0)


def _row_sums(ref: np.ndarray, got: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, float]:
    """Per row of the (rows, values) outputs, in float64: ref·got, ‖ref‖², ‖got‖², the same three
    with `mean` (the original's over all its rows) taken from both, and ‖got − ref‖²; and
    max |got − ref|. Accumulated over blocks of columns and rows (`_BLOCK_VALUES`)."""
    rows, width = ref.shape
    sums = np.zeros((7, rows))
    max_diff = 0.0
    columns = min(width, max(_MIN_COLUMNS, _BLOCK_VALUES // max(rows, 1)))
    row_step = max(1, _BLOCK_VALUES // max(columns, 1))
    for left in range(0, width, columns):
        part_mean = mean[left:left + columns]
        for top in range(0, rows, row_step):
            a = ref[top:top + row_step, left:left + columns].astype(np.float64)
            b = got[top:top + row_step, left:left + columns].astype(np.float64)
            if not np.isfinite(b).all():
                raise SnpError("pruned model produces NaN or Inf")
            here = slice(top, top + row_step)
            diff = b - a
            if diff.size:
                max_diff = max(max_diff, float(np.abs(diff).max()))
            sums[6, here] += np.einsum("ij,ij->i", diff, diff)
            for offset, (x, y) in ((0, (a, b)), (3, (a - part_mean, b - part_mean))):
                sums[offset, here] += np.einsum("ij,ij->i", x, y)
                sums[offset + 1, here] += np.einsum("ij,ij->i", x, x)
                sums[offset + 2, here] += np.einsum("ij,ij->i", y, y)
    return sums, max_diff


def _cosines(dot: np.ndarray, square_a: np.ndarray, square_b: np.ndarray) -> np.ndarray:
    """Row-wise cosine from a·b, ‖a‖² and ‖b‖² (1 where both rows are zero)."""
    norms = np.sqrt(square_a) * np.sqrt(square_b)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-300), 1.0)


def _rows(array, start: int, stop: int, width: int):
    """Samples start…stop of an output, one flattened row each: of an array, a view; of a
    spill.OnDisk, its `rows` (blocks read from disk as they are sliced, not the samples whole)."""
    if not array.ndim:
        return np.asarray(array).reshape(1, 1)
    if isinstance(array, np.ndarray):
        part = array[start:stop]
        return part.reshape(len(part), width)
    return array.rows(start, stop)


def _sample_mean(array, rows: int, width: int) -> np.ndarray:
    """The mean over samples in float64. An output on disk is read a chunk at a time and summed
    sample by sample, in order: what numpy's mean over the first axis adds, so bit for bit the same."""
    if isinstance(array, np.ndarray):
        return array.reshape(rows, width).mean(axis=0, dtype=np.float64)
    total = np.zeros(width, np.float64)
    for start in range(rows):  # one sample read at a time
        total += array[start].reshape(width)
    return np.true_divide(total, rows)


def _line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def latency(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray],
            rounds: int = 10, budget_s: float = 1.0, original_weights: Weights | None = None) -> tuple[float, float]:
    """Median milliseconds per run of both models on `feed`, one intra-op thread, on the clock
    data/timing.py's time_base(1) gives (a report figure; tools/bench_speed.py is the careful
    measurement)."""
    sessions = [session(original, threads=1, weights=original_weights), session(pruned, threads=1)]
    feeds = [fitted(sess, feed) for sess in sessions]
    for sess, own in zip(sessions, feeds):
        sess.run(None, own)
    return interleaved_medians(sessions, feeds, rounds, budget_s, base=time_base(1))


def decode_latency(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray],
                   rounds: int = 10, budget_s: float = 1.0, original_weights: Weights | None = None
                   ) -> tuple[float, float] | None:
    """A language model's cached decode step: median milliseconds of one new token after a
    prefill of `feed`'s first sample (each model fed its own present outputs back as its past,
    so a pruned model reads its narrower cache), one intra-op thread, interleaved, on the clock
    of `latency`; None where
    the model takes no KV cache or its inputs cannot be stepped (see decode_feed)."""
    if not any(is_past(name, value) for name, value in feed.items()):
        return None
    sessions = [session(original, threads=1, weights=original_weights), session(pruned, threads=1)]
    try:
        feeds = [decode_feed(sess, feed) for sess in sessions]
    except Exception as exc:  # onnxruntime's own errors: a report figure never stops a prune
        log.info("decode step not timed: %s", _line(exc))
        return None
    if any(own is None for own in feeds):
        return None
    try:
        for sess, own in zip(sessions, feeds):
            sess.run(None, own)
    except Exception as exc:  # onnxruntime's own errors: a report figure never stops a prune
        log.info("decode step not timed: %s", _line(exc))
        return None
    return interleaved_medians(sessions, feeds, rounds, budget_s, base=time_base(1))


def attention_error(batches: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]],
                    probs: dict[str, tuple[str, np.ndarray]], mask_input: str | None = None) -> dict[str, float]:
    """Per block: mean KL(P_original ‖ P_pruned) of its attention probabilities over the kept
    heads and the query rows (padded rows left out). `batches` yields (inputs, original tensors,
    pruned tensors); `probs` maps block names to their softmax output and kept heads."""
    terms = AttentionTerms(probs, mask_input)
    for inputs, want, got in batches:
        terms.add(inputs, want, got)
    return terms.means()


class AttentionTerms:
    """attention_error fed a batch at a time, so that neither model's maps need be held whole:
    each batch leaves its per-row KL terms (samples × heads × queries, float64: a few KB a block)
    and the sums are taken at the end over all of them at once, the same sums for any batching."""

    def __init__(self, probs: dict[str, tuple[str, np.ndarray]], mask_input: str | None = None):
        self.probs, self.mask_input = probs, mask_input
        self.terms: dict[str, list[np.ndarray]] = {name: [] for name in probs}
        self.weights: dict[str, list[np.ndarray]] = {name: [] for name in probs}

    def add(self, inputs: dict[str, np.ndarray], want: dict, got: dict[str, np.ndarray]) -> None:
        token_mask = inputs.get(self.mask_input) if self.mask_input else None
        for name, (tensor, heads) in self.probs.items():
            p, q = np.asarray(want[tensor]).astype(np.float64), got[tensor].astype(np.float64)
            if p.ndim == 4 and p.shape[1] != q.shape[1]:  # whole heads removed: compare the kept ones
                p = p[:, heads]
            terms = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=-1)  # (B, H, N)
            weights = np.ones_like(terms)
            if token_mask is not None and terms.ndim == 3 and token_mask.shape == (terms.shape[0], terms.shape[2]):
                weights = np.broadcast_to(token_mask[:, None, :] > 0, terms.shape).astype(np.float64)
            self.terms[name].append((terms * weights).ravel())
            self.weights[name].append(weights.ravel())

    def means(self) -> dict[str, float]:
        return {name: float(np.concatenate(self.terms[name]).sum()) / max(float(np.concatenate(self.weights[name]).sum()), 1.0)
                if self.terms[name] else 0.0 for name in self.probs}
