"""What `onnxsnp inspect` shows: the blocks found in a model (or an onnxruntime-genai folder's
decoder), what was skipped and why, and whether the block-by-block reconstruction can run."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.activation_ranges import activation_view
from ..rewrite.decoding import expose_stream_sums
from ..io.genai import genai_folder
from ..ir.graph import ModelGraph
from ..io.loading import load_model
from ..match import Matches, NoMatch, find_blocks
from ..ir.dynamic import dynamic_view
from ..ir.nbits import float_view
from ..compensate.halves import plan_segments
from ..ir.qoperator import qdq_view
from ..ir.quant_form import QuantForm, quantized_form, unsupported


@dataclass(frozen=True)
class Inspection:
    matches: Matches
    reconstruction: str | None  # why the block-by-block reconstruction cannot run (None: it can)
    form: QuantForm = QuantForm.FLOAT  # the quantized form the model is in
    granularity: str | None = None  # its weights' scales: per tensor or per channel
    unsupported: str | None = None  # why that form cannot be pruned, naming a node


def inspect_model(path: str | os.PathLike) -> Inspection:
    folder = genai_folder(path)
    model = load_model(folder.model_file if folder is not None else path).model
    view = float_view(model)  # MatMulNBits read as float, a final norm's sum exposed, as a prune reads them
    read = view.model if view is not None else model
    form, granularity = quantized_form(model)
    why_not = unsupported(model)
    qoperator = qdq_view(read) if form == QuantForm.QOPERATOR and why_not is None else None  # read as static QDQ
    read = qoperator.model if qoperator is not None else read
    dynamic = dynamic_view(read)  # quantize_dynamic's layers read as DequantizeLinear → MatMul
    rounded = activation_view(read) if dynamic is None else None  # static QDQ: activation pairs bypassed
    read = dynamic.model if dynamic is not None else rounded.model if rounded is not None else read
    g = ModelGraph(expose_stream_sums(read))
    matches = find_blocks(g)
    try:
        plan_segments(g, matches)
        why = None
    except NoMatch as reason:
        why = str(reason)
    return Inspection(matches, why, form, granularity, why_not)
