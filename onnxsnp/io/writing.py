"""Writing results: every file appears complete at its path or not at all.

Each write goes into a hidden staging folder beside the target and is moved into place at the end.
The folder is created, moved from and removed with SIGINT/SIGTERM held back, so an interrupt
cannot leave it behind, cannot split a model from its external data, and cannot arrive between a
file landing and its being listed in `written` (the CLI names those files when it is interrupted)."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx

from ..errors import SnpError
from .loading import is_big

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)

# what a staged write moves into place, in order: (file in the staging folder, final path)
Moves = list[tuple[Path, Path]]


def data_file(target: Path) -> Path:
    """Where the external weights of a model written to `target` go."""
    return target.with_name(f"{target.name}.data")


def write_model_atomically(model: onnx.ModelProto, target: Path, external_data: bool,
                           written: list[Path] | None = None) -> None:
    """The model at `target` (its external data beside it, moved first, the model file last).

    External data is kept when the input used it or when the model is too big for one protobuf."""
    def stage(staging: Path) -> Moves:
        staged = staging / target.name
        if external_data or is_big(model):
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file(target).name, size_threshold=1024)
            return [(staging / data_file(target).name, data_file(target)), (staged, target)]
        onnx.save_model(model, str(staged))
        return [(staged, target)]

    publish(target, stage, written)


def write_text_atomically(target: Path, text: str, written: list[Path] | None = None) -> None:
    def stage(staging: Path) -> Moves:
        (staging / target.name).write_text(text)
        return [(staging / target.name, target)]

    publish(target, stage, written)


def publish(target: Path, stage: Callable[[Path], Moves], written: list[Path] | None = None) -> None:
    """`stage(folder)` writes into a new hidden folder beside `target` (interruptible); the moves it
    returns then run, and `target` is added to `written`, with interrupts held until both are done."""
    parent = target.parent if str(target.parent) else Path(".")
    try:
        with _interrupts_held() as held:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
            try:
                with held.released():
                    moves = stage(staging)
                    for source, _ in moves:
                        _as_created(source)
                for source, destination in moves:
                    os.replace(source, destination)
                if written is not None:
                    written.append(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise SnpError(f"cannot write {target}: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: put it straight back
    os.umask(mask)
    return mask


def _as_created(path: Path) -> None:
    """The modes a file or folder the user creates gets from their umask: onnx writes external
    data 0600 and the staging folder is 0700, which a service running as another user cannot read."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


class _Held:
    """SIGINT/SIGTERM recorded instead of handled; delivered when released or at the end."""

    def __init__(self, active: bool) -> None:
        self.active = active  # only the main thread can set signal handlers
        self.pending: list[int] = []
        self.previous = {sig: signal.getsignal(sig) for sig in _INTERRUPTS} if active else {}

    def hold(self) -> None:
        for sig in self.previous:
            signal.signal(sig, lambda signum, frame: self.pending.append(signum))

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending:  # delivered again, to whatever handler the caller had
            first = self.pending[0]
            self.pending.clear()
            signal.raise_signal(first)

    @contextmanager
    def released(self) -> Iterator[None]:
        try:
            self.release()
            yield
        finally:
            self.hold()


@contextmanager
def _interrupts_held() -> Iterator[_Held]:
    held = _Held(threading.current_thread() is threading.main_thread())
    held.hold()
    try:
        yield held
    finally:
        held.release()
