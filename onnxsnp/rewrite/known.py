"""The float values of the dequantizing chains the editor wrote, held as what makes them.

A quantized weight the rewrite slices, rescales or quantizes again becomes a new chain (int8
and its scales, ir/quantized.py); a later edit of the same weight (the cut after the mapped
columns, the Q rescale after the cut) reads the float values that chain computes. Held as float
arrays, every written weight of a quantized model sat in memory at four times its stored size
until the end of the rewrite (SmolLM2-135M static QDQ: docs/QUANTIZED.md). Here each is held as
a recipe — the integer levels with their scale and zero point, or a slice or a column rescale of
values the graph decodes again — and made, with the same operations in the same order (the same
bits), only when read. Shapes and dtypes are known without making them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


class Known(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def value(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Decoded:
    """A weight of the input model, decoded by the graph where read (and not kept by it)."""
    decode: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    dtype: np.dtype

    def value(self) -> np.ndarray:
        return self.decode()


@dataclass(frozen=True)
class Levels:
    """Integer levels quantized again: (levels − zero) · scale in float64, then the weight's dtype
    (ir/quantized.py `requantized`, whose values these are)."""
    levels: np.ndarray  # the integer tensor written (the levels are whole numbers in its range: exact)
    zero: np.ndarray  # float64, broadcasting against the levels
    scale: np.ndarray  # float64, likewise
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels.shape)

    def value(self) -> np.ndarray:
        return ((self.levels.astype(np.float64) - self.zero) * self.scale).astype(self.dtype)


@dataclass(frozen=True)
class Taken:
    """Indices `keep` along `axis` of another value (Editor.take)."""
    base: Known
    keep: np.ndarray
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.base.shape)
        shape[self.axis] = len(self.keep)
        return tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def value(self) -> np.ndarray:
        return np.take(self.base.value(), self.keep, self.axis)


@dataclass(frozen=True)
class Scaled:
    """Indices `columns` along `axis` of another value multiplied by `factors` (Editor.scale_along)."""
    base: Known
    columns: np.ndarray
    factors: np.ndarray
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def value(self) -> np.ndarray:
        return scaled(self.base.value(), self.columns, self.factors, self.axis)


def scaled(values: np.ndarray, columns: np.ndarray, factors: np.ndarray, axis: int) -> np.ndarray:
    """A copy of `values` with indices `columns` along `axis` multiplied by `factors`."""
    values = values.copy()
    view = np.moveaxis(values, axis, 0)
    view[columns] *= factors.reshape((-1,) + (1,) * (view.ndim - 1)).astype(values.dtype)
    return values
