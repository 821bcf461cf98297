"""The set-up a user lives with: the pruner runs without PyTorch or transformers installed, and
`--version` prints the package's version."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import onnxsnp
from conftest import ROOT

# A meta-path finder that makes the test-only packages unimportable in a child process, as in
# the README's first set-up (`pip install -e .`), which installs none of them.
BLOCKED = ("torch", "transformers", "tokenizers", "PIL", "sklearn", "matplotlib", "olive")
_CHILD = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked")

sys.meta_path.insert(0, Blocked())
from onnxsnp.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
print("imported:", leaked)
sys.exit(code)
"""


def test_prunes_without_torch_or_transformers(tmp_path):
    out = tmp_path / "pruned.onnx"
    done = subprocess.run([sys.executable, "-c", _CHILD, "models/digits_vit.onnx", str(out), "--ratio", "0.5",
                           "--calib", "models/digits_vit_calib.npz", "--calib-samples", "16", "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout and out.is_file()


def test_version(capsys):
    from onnxsnp.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnxsnp {onnxsnp.__version__}"
    assert version("onnxsnp") == onnxsnp.__version__  # the installed metadata reads the same attribute
    done = subprocess.run([sys.executable, "-m", "onnxsnp", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert (done.returncode, done.stdout.strip()) == (0, f"onnxsnp {onnxsnp.__version__}")
