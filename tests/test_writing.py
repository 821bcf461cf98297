"""Atomic writes: an interrupt while staging leaves nothing; one during the final moves is held
until the file is in place and listed as written."""
from __future__ import annotations

import signal

import pytest

from onnxsnp.writing import Moves, publish, write_text_atomically


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
    import onnxsnp.writing as writing

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
