"""Every corpus case: exit 2 with one line and no traceback (or a verified model where the input
was in fact fine), nothing left at OUT on failure, the input byte-identical afterwards."""
from __future__ import annotations

import hashlib

import onnx
import pytest

from corpus import cases
from onnxsnp.cli import main

CASES = list(cases())


def test_corpus_is_large_enough():
    assert len(CASES) >= 200
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_contract(tmp_path, capsys, case):
    source = tmp_path / "in.onnx"
    source.write_bytes(case.model)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    fill = {"{IN}": str(source), "{TMP}": str(tmp_path)}

    def expand(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    out = expand(case.out)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    code = main([str(source), out, *[expand(a) for a in case.extra], "-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    if code == 0:  # the input was fine after all: the output must be a verified model
        onnx.checker.check_model(onnx.load(out))
    else:
        assert code == 2, err
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("onnxsnp: error:"), err
        assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # no output, no temp file


@pytest.mark.slow  # a Python process per case: seconds
@pytest.mark.parametrize("case", CASES[::20], ids=[c.name for c in CASES[::20]])
def test_real_process_prints_one_line(tmp_path, case):
    """Through `python -m onnxsnp`, so that anything native libraries print to stderr counts too."""
    import subprocess
    import sys

    from conftest import ROOT

    source = tmp_path / "in.onnx"
    source.write_bytes(case.model)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    expand = lambda text: text.replace("{IN}", str(source)).replace("{TMP}", str(tmp_path))  # noqa: E731
    result = subprocess.run([sys.executable, "-m", "onnxsnp", str(source), expand(case.out),
                             *[expand(a) for a in case.extra], "-q"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode in (0, 2)
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
