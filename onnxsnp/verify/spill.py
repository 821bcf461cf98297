"""Held-back outputs kept on disk instead of in memory, above SPILL_BYTES.

A language model's logits over its vocabulary are most of what the verification holds: SmolLM2's
49,152 tokens take 25 MB per 128-token window, so the original's and the pruned model's logits of
60 held-back windows were 3 GB of a 10 GB prune (docs/SCALING.md, "Peak memory"). Above the
threshold each output is written batch by batch to a .npy file in a temporary folder and read back
a few samples at a time; every read maps the file only for that copy, so the pages read do not stay
in the process's resident memory. The folder is removed when the outputs are dropped (or on error,
or at exit at the latest)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

SPILL_BYTES = 128 * 2**20  # the held-back outputs of a run, all together, above which they go to disk


class OnDisk:
    """One output of every held-back sample, (samples, ...) in a .npy file, filled batch by batch.
    Indexing reads the samples asked for (an int, a slice or a tuple starting with either) into
    memory; `shape`, `dtype` and `ndim` are the array's."""

    def __init__(self, spill: Spill, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.spill = spill  # the folder lives as long as any of its arrays
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)  # the header, the size

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def write(self, start: int, values: np.ndarray) -> None:
        mapped = np.load(self.path, mmap_mode="r+")
        mapped[start:start + len(values)] = values
        mapped.flush()
        del mapped  # unmapped: the written pages leave this process's resident memory

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> Rows:
        """Samples start…stop, one flattened row each, read a block at a time (verification.fidelity)."""
        return Rows(self, start, stop)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(first, (int, np.integer, slice)):
            raise TypeError(f"OnDisk reads samples by an int or a slice, not {type(first).__name__}")
        mapped = np.load(self.path, mmap_mode="r")
        values = np.array(mapped[first])  # a copy: the mapping goes now, and with it the pages read
        del mapped
        if not rest:
            return values
        return values[rest] if isinstance(first, (int, np.integer)) else values[(slice(None), *rest)]


class Rows:
    """Samples start…stop of an OnDisk, flattened to one row each, read block by block: slicing
    `[rows, columns]` (two slices) reads just that block from the file."""

    def __init__(self, array: OnDisk, start: int, stop: int):
        self.array, self.start = array, start
        count = max(0, min(stop, len(array)) - start)
        self.shape = (count, int(np.prod(array.shape[1:], dtype=np.int64)))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, columns = key
        top, bottom, _ = rows.indices(self.shape[0])
        mapped = np.load(self.array.path, mmap_mode="r")
        values = np.array(mapped[self.start + top:self.start + max(top, bottom)].reshape(-1, self.shape[1])[:, columns])
        del mapped  # as OnDisk.__getitem__: the pages read leave with the mapping
        return values


class Spill:
    """A temporary folder for OnDisk outputs; removed by `close` (or when collected, or at exit)."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="onnxsnp-outputs-")
        self.folder = Path(self._folder.name)
        self.count = 0

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> OnDisk:
        self.count += 1
        return OnDisk(self, self.folder / f"output{self.count}.npy", dtype, shape)

    def close(self) -> None:
        self._folder.cleanup()


class Outputs:
    """Per-batch outputs (views of onnxruntime's buffers: copied here) gathered into one array per
    output: concatenated in memory, or written to a Spill when the first batch says that all
    `total` samples' outputs would take more than SPILL_BYTES."""

    def __init__(self, total: int):
        self.total, self.filled = total, 0
        self.batches: list[list[np.ndarray]] = []
        self.arrays: list[OnDisk] | None = None
        self.spill: Spill | None = None

    def add(self, values: list[np.ndarray], samples: int | None = None) -> None:
        """One batch's values; `samples`: the batch's samples (default: the first value's rows).
        Only values laid out one row per sample go to disk (attention maps of (samples × heads,
        queries, keys) stay in memory)."""
        if self.filled == 0 and self.arrays is None:
            rows = samples or max(len(values[0]) if values and values[0].ndim else 1, 1)
            expected = sum(v.nbytes for v in values if v.ndim) * self.total // rows
            if expected > SPILL_BYTES and all(v.ndim and len(v) == rows for v in values):
                self.spill = Spill()
                try:
                    self.arrays = [self.spill.array(v.dtype, (self.total, *v.shape[1:])) for v in values]
                except BaseException:
                    self.spill.close()
                    raise
        if self.arrays is None:
            self.batches.append([np.array(v) for v in values])  # copies: a kept view pins onnxruntime's buffers
            return
        try:
            for array, value in zip(self.arrays, values):
                array.write(self.filled, value)
        except BaseException:
            self.spill.close()
            raise
        self.filled += samples or len(values[0])

    def close(self) -> None:
        """The spilled files removed (after an error: nothing will read them)."""
        if self.spill is not None:
            self.spill.close()

    def joined(self) -> list:
        """One array (or OnDisk) per output; scalar outputs: the first batch's."""
        if self.arrays is not None:
            return list(self.arrays)
        from ..data.calibration import join_outputs

        joined = join_outputs(self.batches)
        self.batches = []
        return joined
