"""What the load → match → calibrate stages hand on to the rest of the flow (pipeline.prepare
builds it; the compensate and report stages read it, so it lives below them)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..ir.dynamic import DynamicView
from ..ir.graph import ModelGraph
from ..ir.nbits import FloatView
from ..ir.qoperator import QOperatorView
from ..match import Matches
from .activation_ranges import ActivationView


@dataclass(frozen=True)
class Prepared:
    """What pruning at any budget starts from: the model, what matched, the calibration split and
    the original model observed on the held-back samples (`onnxsnp sweep` shares it across budgets)."""
    model: onnx.ModelProto
    external: bool
    g: ModelGraph
    matches: Matches
    source: str  # how the report names the calibration data
    fit_feed: dict[str, np.ndarray]
    holdout_feed: dict[str, np.ndarray]
    batch: int
    fixed: int | None  # the model's fixed batch size, if it has one
    mask: str | None
    probes: dict[str, str]  # attention block → its probabilities tensor
    observed: object  # observation.Observation of the original on holdout_feed
    release_memory: Callable[[], None]
    started: float
    view: FloatView | None  # MatMulNBits read as float MatMuls: quantized again after the rewrite
    dynamic: DynamicView | None = None  # quantize_dynamic's layers read as DequantizeLinear → MatMul: made dynamic again
    rounded: ActivationView | None = None  # static QDQ activation pairs bypassed: put back and calibrated again
    qoperator: QOperatorView | None = None  # QLinear ops read as static QDQ: fused back after the rewrite
