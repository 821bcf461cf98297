"""Constants of the rewrite's graphsurgeon graph whose values stay in a file.

The rewrite reads each weight it slices about once, and writes each new one once or a few times
(mapped columns, the cut, a rescale). graphsurgeon keeps what a constant was asked for
(`Constant.values` replaces its lazy values with the decoded array), and kept new weights wait
for the export: on SmolLM2-135M the originals decoded for their slices and the slices themselves
were both held to the end, +787 MB over a 518 MB model (docs/SCALING.md, seventh round). Here a
weight is read without being kept (`read`), and a new one goes to the pruned model's spill file
as it is made (`to_file`), leaving the same lazy stub that the export would have made of it.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
try:  # graphsurgeon's internals, for the one-copy export; a version without them takes its public export
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx
    from onnx_graphsurgeon.ir.tensor import SparseValues
except ImportError:  # pragma: no cover - depends on the installed graphsurgeon
    OnnxExporter = dtype_to_onnx = None
    SparseValues = ()

from ..ir import external


class FromFile(LazyValues):
    """graphsurgeon's lazy values of a lazy stub (ir/external.py): decoded from its data file
    where the editor asks for them; exported as the stub, made whole after the export."""

    def load(self):
        if self.tensor.data_type in external.PLAIN:
            return external.to_array(self.tensor)
        return LazyValues(external.inline(self.tensor)).load()


def read(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, decoded where they are lazy and not kept by the constant (asked
    twice, decoded twice: the same values)."""
    values = tensor._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        return values.load()
    return tensor.values


def to_file(tensor: gs.Constant, spill: external.Spill) -> None:
    """Move a new constant's values into `spill`, as the export would (`rewriting._export`:
    the same TensorProto, put the same way); a smaller one stays as it is."""
    if OnnxExporter is None or isinstance(tensor._values, LazyValues) or \
            tensor._values.nbytes < external.SPILL_MIN_BYTES:
        return
    stub = spill.put(OnnxExporter.export_tensor_proto(tensor))
    if external.is_lazy(stub):
        tensor._values = FromFile(stub)


def is_spilled(tensor: gs.Tensor) -> bool:
    """Whether a constant's values are in a file, not in memory."""
    return isinstance(tensor, gs.Constant) and isinstance(tensor._values, FromFile)


def onnx_type(tensor: gs.Constant) -> int:
    return dtype_to_onnx(tensor.export_dtype)

