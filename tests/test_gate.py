"""A damaged model is never written silently: --min-fidelity / --max-perplexity-ratio write
nothing and exit 3 on a miss; without them a warning says when fidelity is poor or unjudgeable."""
from __future__ import annotations

import pytest

from conftest import ROOT
from onnxsnp.cli import main
from onnxsnp.errors import SnpError
from onnxsnp.verify.gate import FEW_SAMPLES, GATE_EXIT, POOR_CENTRED_COSINE, POOR_PERPLEXITY_RATIO, FidelityGate, GateFailed
from onnxsnp.verify.gate import check, warnings_for
from onnxsnp.verify.verification import Fidelity

MODEL, CALIB = ROOT / "models" / "digits_vit.onnx", ROOT / "models" / "digits_vit_calib.npz"


def encoder(centred: float, samples: int = 64) -> Fidelity:
    return Fidelity(samples, 0.99, 0.1, None, centred_cosine=centred)


def language_model(ratio: float, agreement: float = 0.9, samples: int = 64) -> Fidelity:
    return Fidelity(samples, 0.99, 0.1, None, perplexity_before=20.0, perplexity_after=20.0 * ratio,
                    next_token_agreement=agreement, tokens=1000)


def test_the_gate_reads_centred_cosine_or_next_token_agreement():
    check(encoder(0.95), FidelityGate(min_fidelity=0.9))
    with pytest.raises(GateFailed, match="centred cosine 0.8500 on 64 held-back samples is below --min-fidelity 0.9"):
        check(encoder(0.85), FidelityGate(min_fidelity=0.9))
    check(language_model(1.1, agreement=0.9), FidelityGate(min_fidelity=0.85, max_perplexity_ratio=1.2))
    with pytest.raises(GateFailed, match="next-token agreement 0.8000"):
        check(language_model(1.1, agreement=0.8), FidelityGate(min_fidelity=0.85))
    with pytest.raises(GateFailed, match=r"perplexity grew 1.30x \(20.00 -> 26.00\)"):
        check(language_model(1.3), FidelityGate(max_perplexity_ratio=1.2))
    with pytest.raises(GateFailed, match="needs a language model"):
        check(encoder(0.99), FidelityGate(max_perplexity_ratio=1.2))
    for bad in ({"min_fidelity": 1.5}, {"min_fidelity": float("nan")}, {"max_perplexity_ratio": 0.5}):
        with pytest.raises(SnpError):
            FidelityGate(**bad)


def test_warnings_name_poor_or_unjudgeable_fidelity():
    assert warnings_for(encoder(POOR_CENTRED_COSINE + 0.01), synthetic=False) == []
    assert "centred cosine" in " ".join(warnings_for(encoder(POOR_CENTRED_COSINE - 0.01), synthetic=False))
    assert warnings_for(language_model(POOR_PERPLEXITY_RATIO - 0.01), synthetic=False) == []
    assert "perplexity is" in " ".join(warnings_for(language_model(POOR_PERPLEXITY_RATIO + 0.01), synthetic=False))
    few = warnings_for(encoder(0.99, samples=FEW_SAMPLES - 1), synthetic=False)
    assert len(few) == 1 and f"only {FEW_SAMPLES - 1} held-back" in few[0]
    assert warnings_for(encoder(0.99, samples=FEW_SAMPLES), synthetic=False) == []


@pytest.mark.slow  # prunes the shipped model end to end: seconds
def test_a_missed_gate_writes_nothing_and_exits_3(tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    args = [str(MODEL), str(out), "--ratio", "0.7", "--calib", str(CALIB), "--calib-samples", "64", "-q"]
    assert main(args + ["--min-fidelity", "0.99999"]) == GATE_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxsnp: fidelity gate: centred cosine") and "nothing written" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(args + ["--min-fidelity", "-1"]) == 0 and out.exists()
