"""onnxruntime sessions that read a model's weights from a temporary file instead of from arrays
handed over in memory.

A session given its weights as in-memory external initializers (calibration.add_initializers)
cannot free them: they are the caller's buffers, so every weight that onnxruntime pre-packs or
folds is held twice for as long as the session lives, beside the arrays decoded for it. A session
that loads its weights from a file owns them and drops each original once it is pre-packed.
Measured on SmolLM2-135M (518 MB of fp32 weights, onnxruntime 1.32): a session over the decoded
arrays added 1,400 MB resident (880 MB beyond the arrays), one over the same model on disk 556 MB
(docs/SCALING.md, "Peak memory"). Where nothing else holds the decoded weights (the pruned model's
verification), the file route is the cheaper one: writing reads one weight at a time.

The data file is written once per `WeightFile` and may serve several sessions (the same weights
with different added outputs); the folder is removed on `close`. onnxruntime reads the data while
the session is built, so the folder can go as soon as the sessions exist."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort

from ..ir import external

DATA = "weights.bin"
ALIGN = 64  # byte offset of each weight in the data file (onnxruntime reads them unaligned too)


class WeightFile:
    """The larger initializers of `model` in one data file, and stubs pointing into it."""

    def __init__(self, model: onnx.ModelProto, in_file: Callable[[onnx.TensorProto], bool]):
        """`in_file`: which initializers go to the file (the others stay in the graph); each
        must hold its data in raw_data."""
        self._folder = tempfile.TemporaryDirectory(prefix="onnxsnp-weights-")
        self.folder = Path(self._folder.name)
        self.stubs: list[onnx.TensorProto] = []
        self.sessions = 0
        try:
            with open(self.folder / DATA, "wb") as data:
                for tensor in model.graph.initializer:
                    if in_file(tensor):
                        self.stubs.append(self._write(data, tensor))
                    else:
                        self.stubs.append(external.inline(tensor))  # a lazy one whole: the graph keeps it
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _write(data, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """`tensor`'s bytes appended to `data` (one weight's copy in memory at a time), and its stub."""
        offset = -data.tell() % ALIGN
        data.write(b"\0" * offset)
        offset = data.tell()
        raw = external.raw_data(tensor)  # a copy of this one weight (from the input's data file where lazy)
        data.write(raw)
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(len(raw)))):
            stub.external_data.add(key=key, value=value)
        del raw
        return stub

    def session(self, light: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
        """A session over `light` (the model without initializers, outputs as wanted) with the
        weights from the file."""
        graph_file = self.folder / f"model{self.sessions}.onnx"
        self.sessions += 1
        light.graph.initializer.extend(self.stubs)  # copies of the stubs: a few bytes each, or the small tensors
        try:
            graph_file.write_bytes(light.SerializeToString())
        finally:
            del light.graph.initializer[:]
        try:
            return ort.InferenceSession(str(graph_file), options, providers=["CPUExecutionProvider"])
        finally:
            graph_file.unlink()

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
