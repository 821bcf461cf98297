"""One BLAS thread for the many small matrix operations of scoring and refitting.

OpenBLAS parallelises every call, however small. For batches of small matrices (a d×d
eigen-decomposition per sample and head, a solve per head) the threads cost far more than they
save, and on a busy machine — onnxruntime's threads, other processes — they wait on each other:
a batch of 336 64×64 eigen-decompositions took 8 s with two threads and 0.23 s with one on a
shared 2-core machine. Large products (Grams and refits of matrices LARGE wide and more) keep every thread.
Needs threadpoolctl; without it nothing is limited (results are the same either way).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl is an install requirement; be lenient all the same
    ThreadpoolController = None

F = TypeVar("F", bound=Callable)


@functools.lru_cache(maxsize=1)
def _controller():
    # found once: looking the loaded BLAS libraries up costs milliseconds per call
    return ThreadpoolController() if ThreadpoolController is not None else None


def one_blas_thread() -> contextlib.AbstractContextManager:
    controller = _controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


LARGE = 1024  # matrices at least this wide keep every BLAS thread


def threads_for(width: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for work on matrices narrower than LARGE, else no limit."""
    return one_blas_thread() if width < LARGE else contextlib.nullcontext()


def small_linear_algebra(function: F) -> F:
    """Run `function` with one BLAS thread (see the module docstring)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
