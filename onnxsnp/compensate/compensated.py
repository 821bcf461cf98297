"""What the compensate stage decided (pipeline._compensate builds it; the report stage reads it)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..plan import PrunePlan, Ratios
from .reconstruction import Reconstruction


@dataclass(frozen=True)
class Compensated:
    """What the compensate stage decided: the plan (and, on the one-pass route, the model it
    already rewrote), with what the report says of how it got there."""
    plan: PrunePlan
    pruned: onnx.ModelProto | None  # None: the rewrite stage writes it
    kept_pieces: tuple[str, ...]
    ratios: Ratios  # the mean ratios (a budget's allocation differs per block)
    searched: tuple = ()  # uniform shares the one-pass route tried for a budget
    reconstruction: Reconstruction | None = None
    allocation: dict | None = None
