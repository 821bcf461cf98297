"""Atomic writes: an interrupt while staging leaves nothing; one during the final moves is held
until the file is in place and listed as written."""
from __future__ import annotations

import signal

import pytest

from onnxsnp.io.writing import Moves, publish, write_text_atomically


@pytest.fixture(autouse=True)
def interruptible():
    """Ctrl-C as in a terminal: a shell that starts a job in the background without job control
    (nohup'd CI, `cmd &` in a script) hands it SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _hidden(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_text_is_written_and_listed(tmp_path):
    written = []
    write_text_atomically(tmp_path / "a.txt", "hello", written)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert written == [tmp_path / "a.txt"] and not _hidden(tmp_path)


def test_interrupt_while_staging_leaves_nothing(tmp_path):
    def stage(staging) -> Moves:
        (staging / "a.txt").write_text("partial")
        signal.raise_signal(signal.SIGINT)  # delivered at once: staging is interruptible
        raise AssertionError("the interrupt was not delivered while staging")

    written = []
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path / "a.txt", stage, written)
    assert list(tmp_path.iterdir()) == [] and written == []


def test_interrupt_during_the_moves_waits_for_them(tmp_path, monkeypatch):
    import onnxsnp.io.writing as writing

    real_replace = writing.os.replace

    def replace_then_signal(source, destination):
        real_replace(source, destination)
        signal.raise_signal(signal.SIGINT)  # arrives between the move and the listing

    monkeypatch.setattr(writing.os, "replace", replace_then_signal)

    def stage(staging) -> Moves:
        (staging / "a.txt").write_text("whole")
        return [(staging / "a.txt", tmp_path / "a.txt")]

    written = []
    with pytest.raises(KeyboardInterrupt):  # still delivered, once everything is consistent
        publish(tmp_path / "a.txt", stage, written)
    assert (tmp_path / "a.txt").read_text() == "whole"
    assert written == [tmp_path / "a.txt"] and not _hidden(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_written_take_the_modes_the_umask_gives(tmp_path, umask):
    """onnx writes external data 0600 and staging folders are 0700: what lands must be readable
    as any file the user creates is (a service running as another user reads the model)."""
    import os

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from onnxsnp.io.writing import data_file, write_model_atomically

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    previous = os.umask(umask)
    try:
        target = tmp_path / "m.onnx"
        write_model_atomically(helper.make_model(graph), target, external_data=True)
        write_text_atomically(tmp_path / "r.json", "{}")
    finally:
        os.umask(previous)
    for path in (target, data_file(target), tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
