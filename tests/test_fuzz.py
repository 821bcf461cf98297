"""Property-based fuzzing (hypothesis): random byte-level and structural mutations of valid
models keep the CLI contract — exit 0 with a verified model, or exit 2 with one line, no
traceback, nothing at OUT, the input untouched.

CI runs a short profile; a long run:  ONNXSNP_FUZZ=long python -m pytest tests/test_fuzz.py
"""
from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corpus import SHIPPED
from onnxsnp.cli import main

pytestmark = pytest.mark.slow  # tens of CLI runs per property: seconds

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("long" if os.environ.get("ONNXSNP_FUZZ") == "long" else "ci")

VALID = SHIPPED.read_bytes()
MODEL = onnx.load(str(SHIPPED))


HANG_SECONDS = 120  # one example takes seconds; a loop that never ends must fail the test, not stall CI


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that the CLI's own error handling cannot swallow it."""


def _hang(signum, frame):
    raise Hang(f"one example ran for more than {HANG_SECONDS} s")


def check_contract(data: bytes, extra: list[str]) -> None:
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_SECONDS)
    try:
        _check_contract(data, extra)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_contract(data: bytes, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        source.write_bytes(data)
        before = hashlib.sha256(data).hexdigest()
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(source), str(out), "--calib-samples", "8", "-q", *extra])
        assert hashlib.sha256(source.read_bytes()).hexdigest() == before
        assert "Traceback" not in err.getvalue()
        if code == 0:
            onnx.checker.check_model(onnx.load(str(out)))
        else:
            assert code == 2
            assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
            assert sorted(p.name for p in Path(folder).iterdir()) == ["in.onnx"]


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips(flips):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    check_contract(bytes(data), ["--ratio", "0.3"])


@given(node=st.integers(0, len(MODEL.graph.node) - 1), which=st.sampled_from(["input", "attr", "op", "output"]),
       value=st.integers(-4, 70), ratio=st.sampled_from(["0", "0.25", "0.5", "0.9"]))
def test_structural_mutations(node, which, value, ratio):
    model = onnx.ModelProto()
    model.CopyFrom(MODEL)
    target = model.graph.node[node]
    names = [t for n in model.graph.node for t in n.output] + [t.name for t in model.graph.initializer]
    if which == "input" and target.input:
        target.input[value % len(target.input)] = names[value % len(names)]
    elif which == "attr" and target.attribute:
        attribute = target.attribute[value % len(target.attribute)]
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = value
        elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
            attribute.ints[value % len(attribute.ints)] = value % 5 - 1
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = float(value)
    elif which == "op":
        target.op_type = ["Add", "Mul", "Relu", "Identity", "Softmax", "MatMul", "Transpose"][value % 7]
    elif which == "output":
        target.output[0] = names[value % len(names)]
    check_contract(model.SerializeToString(), ["--ratio", ratio])
