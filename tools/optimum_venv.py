"""optimum-onnx in a venv of its own, made once under build/: optimum-onnx 0.1 pins transformers
< 4.58, older than the test venv's. The tests' optimum forms (tests/exports.py) and the decoder
tools export through it with tools/optimum_export.py, run by that venv's python."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import BUILD, TOOLS

OPTIMUM_VENV = BUILD / "optimum-venv"
OPTIMUM_REQUIREMENTS = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58"]


class RegistryUnreachable(RuntimeError):
    """The venv cannot be made because the package registry cannot be reached (the tests skip)."""


def optimum_python() -> Path:
    """The optimum venv's python, made once (cached under build/)."""
    python = OPTIMUM_VENV / "bin" / "python"
    ready = OPTIMUM_VENV / ".ready"
    if ready.exists() and ready.read_text() == " ".join(OPTIMUM_REQUIREMENTS):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(OPTIMUM_VENV)], check=True)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", *OPTIMUM_REQUIREMENTS],
                             capture_output=True, text=True)
    if install.returncode:
        reason = install.stderr.strip().splitlines()[-1] if install.stderr.strip() else "pip failed"
        if any(word in install.stderr for word in ("connection", "Connection", "resolve", "Network", "No matching")):
            raise RegistryUnreachable(f"optimum-onnx cannot be installed (package registry unreachable?): {reason}")
        raise RuntimeError(f"installing {OPTIMUM_REQUIREMENTS} failed: {reason}")
    ready.write_text(" ".join(OPTIMUM_REQUIREMENTS))
    return python


def export_optimum(folder: Path, family: str, exporter: str) -> Path:
    """A tiny random-weight `family` exported by optimum into `folder` ("optimum-O2": then optimized
    at -O2); the path of its .onnx file."""
    level = exporter.split("-")[1] if "-" in exporter else None
    command = [str(optimum_python()), str(TOOLS / "optimum_export.py"), family, str(folder)]
    done = subprocess.run(command + ([level] if level else []), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"optimum export of {family} failed: {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])
