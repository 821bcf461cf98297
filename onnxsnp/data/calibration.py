"""Stage 4: calibration inputs and one onnxruntime pass that captures intermediate tensors."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..progress import steps
from ..errors import SnpError
from ..ir import external
from ..ir.sizes import raw_bytes
from ..ir.graph import ModelGraph, attribute
from .kv_cache import cache_outputs, empty_cache, fitted, is_past_cache, op_cache_shapes
from .weight_file import WeightFile

# onnxruntime logs run-time failures straight to stderr; onnxsnp reports them itself, in one line
ort.set_default_logger_severity(4)

DEFAULT_SEQUENCE = 32  # tokens per synthetic sample where the sequence length is dynamic
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    # a ring-buffer KV cache (GroupQueryAttention's sliding_window_cache): its past axis is this
    # many slots even before the first token; 0 for a cache that grows from empty
    capacity: int = 0


class SyntheticDataWarning(UserWarning):
    pass


def input_specs(g: ModelGraph) -> list[InputSpec]:
    specs = []
    caches = op_cache_shapes(g)
    for info in g.model.graph.input:
        if info.name in g.initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tensor_type.shape.dim)
        capacity = 0
        if info.name in caches and len(shape) == 4:  # heads and head size an attention op implies
            known_shape, capacity = caches[info.name]
            shape = tuple(known if known is not None else dim for dim, known in zip(shape, known_shape))
        specs.append(InputSpec(info.name, np.dtype(dtype), shape, capacity))
    return specs


def load_calibration(path: str | os.PathLike, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Arrays keyed by model input name; the first axis indexes samples."""
    path = Path(path)
    if not path.is_file():
        raise SnpError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise SnpError(f"calibration file {path} is not a readable .npz ({type(exc).__name__})") from None
    return validate_calibration(arrays, specs, f"calibration file {path}")


def validate_calibration(arrays: dict[str, np.ndarray], specs: list[InputSpec], label: str) -> dict[str, np.ndarray]:
    """Check arrays against the model inputs and cast them to the input types."""
    arrays = fill_absent_inputs({k: np.asarray(v) for k, v in arrays.items()}, specs)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise SnpError(f"{label} lacks model input(s) {', '.join(missing)} "
                       f"(it has {', '.join(sorted(arrays)) or 'nothing'})")
    samples = {arrays[s.name].shape[0] if arrays[s.name].ndim else -1 for s in specs}
    if len(samples) != 1 or -1 in samples or 0 in samples:
        raise SnpError(f"{label}: arrays must share a non-empty first (sample) axis")
    feed = {}
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise SnpError(f"calibration input {spec.name!r} has {array.ndim} axes; the model expects "
                           f"{len(spec.shape)} {_show(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and axis > 0 and got != want:
                raise SnpError(f"calibration input {spec.name!r} has shape {array.shape}; the model expects "
                               f"{_show(spec.shape)}")
        if array.dtype.kind != spec.dtype.kind:
            if array.dtype.kind in "fiub" and spec.dtype.kind in "fiub":
                array = array.astype(spec.dtype)
            else:
                raise SnpError(f"calibration input {spec.name!r} is {array.dtype}; the model expects {spec.dtype}")
        array = array.astype(spec.dtype, copy=False)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise SnpError(f"calibration input {spec.name!r} contains NaN or Inf")
        feed[spec.name] = array
    return feed


class FilledInputWarning(UserWarning):
    pass


class ObviousInput(Enum):
    """Token inputs whose calibration value goes without saying; the value names what is filled in."""
    MASK = "ones"
    POSITION = "0..L-1"
    TOKEN_TYPE = "zeros"

    @classmethod
    def of(cls, spec: InputSpec) -> ObviousInput | None:
        if len(spec.shape) != 2 or spec.dtype.kind not in "iub":
            return None
        lowered = spec.name.lower()
        if "mask" in lowered:
            return cls.MASK
        if "position" in lowered:
            return cls.POSITION
        if "type" in lowered or "segment" in lowered:
            return cls.TOKEN_TYPE
        return None


def fill_absent_inputs(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Obvious token inputs, made (with a warning) where the calibration data lacks them:
    attention masks ones, position ids 0..L-1, token type ids zeros, each shaped like the token
    ids given (the first 2-D array among the model's inputs); a decoder's KV caches empty (prefill,
    without a warning: calibration is prefill)."""
    given = [arrays[s.name] for s in specs if s.name in arrays and arrays[s.name].ndim == 2]
    if not given:
        return arrays
    samples, length = given[0].shape
    filled, notes = dict(arrays), []
    for spec in specs:
        if spec.name not in arrays and is_past_cache(spec):
            filled[spec.name] = empty_cache(spec, samples)
            continue
        kind = ObviousInput.of(spec)
        if spec.name in arrays or kind is None:
            continue
        if kind is ObviousInput.POSITION:
            value = np.broadcast_to(np.arange(length), (samples, length))
        else:
            value = np.full((samples, length), 1 if kind is ObviousInput.MASK else 0)
        filled[spec.name] = value.astype(spec.dtype)
        notes.append(f"{spec.name} = {kind.value}")
    if notes:
        warnings.warn(f"calibration data lacks {', '.join(notes)}; using those values", FilledInputWarning,
                      stacklevel=3)
    return filled


def _show(shape: tuple) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


def synthetic_inputs(g: ModelGraph, specs: list[InputSpec], samples: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs made from the input specs: floats N(0,1), token ids uniform over the vocabulary
    read from the embedding table, masks ones, token types zeros."""
    warnings.warn("no --calib data given: scoring on synthetic inputs; real data gives better results",
                  SyntheticDataWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [samples] + [d if isinstance(d, int) and d > 0 else DEFAULT_SEQUENCE for d in spec.shape[1:]]
        lowered = spec.name.lower()
        if is_past_cache(spec):
            feed[spec.name] = empty_cache(spec, samples)
        elif ObviousInput.of(spec) is ObviousInput.POSITION:
            feed[spec.name] = np.broadcast_to(np.arange(shape[1]), shape).astype(spec.dtype)
        elif spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b" or "mask" in lowered:
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif "type" in lowered or "segment" in lowered:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
        elif spec.dtype.kind in "iu":
            vocab = _vocabulary_size(g, spec.name)
            if vocab is None:
                raise SnpError(f"cannot make synthetic values for integer input {spec.name!r} "
                               "(no embedding table reads it); pass --calib")
            feed[spec.name] = rng.integers(0, vocab, size=shape).astype(spec.dtype)
        else:
            raise SnpError(f"cannot make synthetic values for input {spec.name!r} of type {spec.dtype}; pass --calib")
    return feed


def _vocabulary_size(g: ModelGraph, name: str) -> int | None:
    frontier = [name]
    for _ in range(4):  # ids may be cast or reshaped before the embedding Gather
        next_frontier = []
        for tensor in frontier:
            for node in g.consumers_of(tensor):
                table = None
                if node.op_type == "Gather" and node.input[1] == tensor:
                    table = g.constant(node.input[0])
                elif node.op_type == "EmbedLayerNormalization" and node.input[0] == tensor:
                    table = g.constant(node.input[2])  # com.microsoft: (ids, segment ids, word table, …)
                elif node.op_type == "GatherBlockQuantized" and node.input[1] == tensor and \
                        attribute(node, "gather_axis", 0) == 0:
                    table = g.constant(node.input[2])  # com.microsoft: (packed table, ids, scales (vocab, blocks))
                if table is not None and table.ndim == 2:
                    return int(table.shape[0])
                next_frontier += list(node.output)
        frontier = next_frontier
    return None


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size baked into the model's inputs, if any."""
    sizes = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None


def token_mask_input(specs: list[InputSpec]) -> str | None:
    """A 2-D integer input named like an attention mask: its zeros mark padding."""
    for spec in specs:
        if "mask" in spec.name.lower() and len(spec.shape) == 2 and spec.dtype.kind in "iufb":
            return spec.name
    return None


# weights handed to onnxruntime in memory rather than inside the serialised model
_IN_MEMORY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
_IN_MEMORY_MIN_BYTES = 1024
# a model without decoded arrays whose weights reach this size reads them from a file (weight_file.py)
FILE_SESSION_BYTES = 16 * 2**20


Weights = Callable[[str], "np.ndarray | None"]  # an initializer's decoded value, by name


def session(model: onnx.ModelProto, threads: int = 0, extra_outputs: Iterable[str] = (),
            weights: Weights | None = None, configure: Callable[[ort.SessionOptions], None] | None = None,
            weight_file: WeightFile | None = None, shapes_of: Iterable[str] = ()) -> ort.InferenceSession:
    """An onnxruntime session over `model`, with `extra_outputs` added as graph outputs, and the
    shapes of the tensors `shapes_of` as outputs named `shape_output(tensor)` (see `_add_shapes`).

    The model is not serialised with its weights: onnxruntime gets a weight-free copy of the
    graph and the weights apart, which skips serialising and re-parsing every weight for each
    session, leaves `model` untouched, and works the same for models above protobuf's 2 GB limit.
    `weights` may supply already decoded arrays (ModelGraph keeps them), which the session then
    shares as in-memory external initializers. Without them, a model above FILE_SESSION_BYTES
    reads its weights from a temporary file (`weight_file`, written here if not given): a session
    that owns its weights frees each one it pre-packs, one over arrays decoded for it alone holds
    both (weight_file.py)."""
    shapes_of = list(dict.fromkeys(shapes_of))
    if weights is None and (weight_file is not None or _file_worthy(model)):
        light = without_initializers(model)
        _add_outputs(light, extra_outputs)
        _add_shapes(light, shapes_of)
        if weight_file is not None:
            return weight_file.session(light, _session_options(threads, configure=configure))
        with WeightFile(model, _in_file) as written:
            return written.session(light, _session_options(threads, configure=configure))
    graph_only, names, values = _without_weights(model, weights)
    _add_outputs(graph_only, extra_outputs)
    _add_shapes(graph_only, shapes_of)
    return light_session(graph_only, names, values, threads, configure=configure)


def weight_file(model: onnx.ModelProto) -> WeightFile | None:
    """`model`'s weights written once for several sessions without decoded arrays (None for a
    model small enough to hand over in memory)."""
    return WeightFile(model, _in_file) if _file_worthy(model) else None


def _file_worthy(model: onnx.ModelProto) -> bool:
    return sum(raw_bytes(t) for t in model.graph.initializer if _in_file(t)) >= FILE_SESSION_BYTES


def _in_file(tensor: onnx.TensorProto) -> bool:
    """The initializers a session gets apart from the graph (the others stay in it)."""
    return (tensor.data_type in _IN_MEMORY_TYPES
            and (tensor.data_location != onnx.TensorProto.EXTERNAL or external.is_lazy(tensor))
            and raw_bytes(tensor) >= _IN_MEMORY_MIN_BYTES)  # as add_initializers chooses


def _add_outputs(light: onnx.ModelProto, extra_outputs: Iterable[str]) -> None:
    existing = {o.name for o in light.graph.output}
    light.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(extra_outputs)
                              if t not in existing)


def shape_output(tensor: str) -> str:
    """The output that `session(shapes_of=...)` adds for `tensor`'s shape."""
    return f"{tensor}::onnxsnp_shape"


def _add_shapes(light: onnx.ModelProto, tensors: Iterable[str]) -> None:
    """A Shape node per tensor, its output a graph output: a run hands back a few int64s instead
    of the tensor. onnxruntime keeps every graph output of a run alive to its end (fetched or
    not), so the hundreds of tensors whose shapes the FLOPs count needs, added as outputs
    themselves, held a whole forward pass's activations at once: 405 MB for one 128-token window
    of SmolLM2-135M (docs/SCALING.md, "Seventh round").

    The Shape nodes go in latest tensor first. onnxruntime's default node order is a depth-first
    walk back from the graph's leaves, the last-added leaf first: so the earliest tensor's Shape
    node is walked first, runs right after its tensor, and each later one right after its own
    (added in the model's order, they all ran after the whole pass, each measured tensor alive to
    its end: SmolLM2-135M, one window, +282 MB). Onnxruntime's priority-based order runs Shape
    nodes first too, but drains every other ready node by index before a fused node (whose index
    is the graph's last): a static QDQ model's weight DequantizeLinears, all ready at the start,
    all ran at once, their float weights alive together (SmolLM2-135M QDQ: 266 MB of them; the
    probed run +920 MB over the loaded model, +404 MB in this order; the fp32 export the same in
    both, docs/QUANTIZED.md). The order changes no value: the same nodes and kernels, run one at
    a time."""
    existing = {o.name for o in light.graph.output}
    made = {o: index for index, node in enumerate(light.graph.node) for o in node.output}
    for tensor in sorted(dict.fromkeys(tensors), key=lambda t: -made.get(t, -1)):  # a graph input: last, walked first
        name = shape_output(tensor)
        if name not in existing:
            light.graph.node.append(helper.make_node("Shape", [tensor], [name], name=name))
            light.graph.output.append(helper.make_empty_tensor_value_info(name))


def _session_options(threads: int = 0, segment: bool = False,
                     configure: Callable[[ort.SessionOptions], None] | None = None, arena: bool = False
                     ) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported by onnxsnp, in one line
    if threads:
        options.intra_op_num_threads = threads
    if segment:
        options.enable_cpu_mem_arena = arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if configure is not None:
        configure(options)
    return options


def light_session(light: onnx.ModelProto, names: list[str], values: list[ort.OrtValue], threads: int = 0,
                  segment: bool = False, configure: Callable[[ort.SessionOptions], None] | None = None,
                  arena: bool = False) -> ort.InferenceSession:
    """A session over a model whose larger weights are given apart (see `add_initializers`).

    `segment`: one of many sessions alive at once (segments.py). Their memory arenas would each
    keep a run's worth of memory for as long as they live, so allocations go straight to the
    heap instead; and their threads do not spin after a run, where numpy work follows at once
    on the same cores. `arena`: a segment's session keeps its arena all the same (one whose
    owner drops it soon: SegmentRunner.arena)."""
    options = _session_options(threads, segment, arena=arena)
    if names:
        options.add_external_initializers(names, values)
    if configure is not None:
        configure(options)
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess._onnxsnp_weights = values  # onnxruntime reads these buffers for as long as the session lives
    return sess


def _without_weights(model: onnx.ModelProto, weights: Weights | None = None
                     ) -> tuple[onnx.ModelProto, list[str], list[ort.OrtValue]]:
    """A copy of `model` whose larger initializers are marked external, plus those initializers
    as OrtValues: `weights`' arrays where it has them, else decoded from the proto here."""
    light = without_initializers(model)
    names, values = add_initializers(light.graph, model.graph.initializer, weights)
    return light, names, values


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every field but the graph's initializers."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(light.graph, field, value)
    return light


def add_initializers(graph: onnx.GraphProto, tensors: Iterable[onnx.TensorProto], weights: Weights | None = None
                     ) -> tuple[list[str], list[ort.OrtValue]]:
    """Add `tensors` to `graph`: small ones copied, larger ones as stubs marked external whose
    values are returned as OrtValues for `SessionOptions.add_external_initializers`."""
    names, values = [], []
    for tensor in tensors:
        if _in_file(tensor):
            stub = graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="onnxsnp-in-memory")
            names.append(tensor.name)
            value = weights(tensor.name) if weights is not None else None
            if value is None:
                value = external.to_array(tensor)  # from the input's data file where lazy
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        else:
            graph.initializer.add().CopyFrom(external.inline(tensor))
    return names, values


def copy_field(target, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, field.name).extend(value)
    elif hasattr(value, "CopyFrom"):
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


class Runner:
    """One onnxruntime session over `model` that hands back chosen intermediate tensors as well
    as the model's outputs.

    Building a session optimises and pre-packs every weight; for a large model that costs as
    much as a few batches, so each model gets one Runner that every stage shares."""

    def __init__(self, model: onnx.ModelProto, tensors: Iterable[str] = (), threads: int = 0,
                 role: str = "input model", weights: Weights | None = None, weight_file: WeightFile | None = None,
                 shapes_of: Iterable[str] = (), configure: Callable[[ort.SessionOptions], None] | None = None):
        """`shapes_of`: tensors whose shapes (not values) the runs may fetch, as `shape_output(t)`;
        `configure`: session options beyond onnxsnp's (`session`)."""
        self.role = role
        state = cache_outputs(model)  # a decoder's present keys/values: its state, not its result
        self.output_names = [o.name for o in model.graph.output if o.name not in state]
        added = [t for t in dict.fromkeys(tensors) if t not in set(self.output_names)]
        try:
            shapes_of = list(dict.fromkeys(shapes_of))
            self.session = session(model, threads, added, weights, configure, weight_file, shapes_of)
        except Exception as exc:
            verb = "cannot run" if role == "input model" else "rejects"
            raise SnpError(f"onnxruntime {verb} the {role}: {_first_line(exc)}") from None
        self.available = set(self.output_names) | set(added) | {shape_output(t) for t in shapes_of}

    def batches(self, feed: dict[str, np.ndarray], tensors: list[str], batch: int, progress: bool = False
                ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Run over `feed` in batches, yielding (inputs, {tensor: value}) for the given tensors.

        The values are views of onnxruntime's buffers: keeping any of them, however small, keeps
        the session's whole memory arena alive after the session is gone. Copy what you keep."""
        missing = [t for t in tensors if t not in self.available]
        if missing:
            raise ValueError(f"the runner was not built to capture {missing[:3]}")
        total = next(iter(feed.values())).shape[0]
        starts = range(0, total, batch)
        if progress:
            starts = steps(starts, f"running the {self.role} on {total} samples", len(starts), "batches")
        for start in starts:
            inputs = {k: v[start:start + batch] for k, v in feed.items()}
            try:
                values = self.session.run(tensors, fitted(self.session, inputs))
            except Exception as exc:
                what = "the calibration inputs" if self.role == "input model" else f"the {self.role}"
                raise SnpError(f"onnxruntime failed on {what}: {_first_line(exc)}") from None
            yield inputs, dict(zip(tensors, values))

    def outputs(self, feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        """The model's outputs over all of `feed`, batches concatenated."""
        return join_outputs([[acts[n] for n in self.output_names]
                             for _, acts in self.batches(feed, self.output_names, batch)])


def join_outputs(per_batch: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-batch output lists → one array per output (scalar outputs: the first batch's)."""
    if not per_batch:
        return []
    return [np.concatenate(chunk) if chunk[0].ndim else np.array(chunk[0]) for chunk in zip(*per_batch)]


def capture(model: onnx.ModelProto, tensors: list[str], feed: dict[str, np.ndarray], batch: int,
            progress: bool = False) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run `model` over `feed` in batches and yield (inputs, captured tensors) per batch."""
    yield from Runner(model, tensors).batches(feed, tensors, batch, progress)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
