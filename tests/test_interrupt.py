"""An interrupted run (SIGINT, SIGTERM) exits 130 and leaves nothing at OUT, no staging folder;
a signal that comes after OUT is in place neither removes it nor goes unmentioned."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import onnx
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # real processes, signalled at delays of up to seconds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(tmp_path, sig):
    interrupted = 0
    for delay in (0.5, 1.0, 1.5, 2.5):
        out = tmp_path / f"out_{delay}.onnx"
        process = subprocess.Popen([sys.executable, "-m", "onnxsnp", str(ROOT / "models" / "digits_vit.onnx"),
                                    str(out), "--ratio", "0.5", "--calib", str(ROOT / "models" / "digits_vit_calib.npz"),
                                    "--calib-samples", "128", "-q"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:  # finished before the signal arrived
            assert out.exists()
            continue
        interrupted += 1
        assert process.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        if out.exists():  # the signal came after the model was moved into place: the message says so
            assert f"only {out} written" in err
            onnx.checker.check_model(str(out))
        else:
            assert "nothing written" in err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert interrupted, "every run finished before the signal; nothing was tested"
