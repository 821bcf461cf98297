"""After verification, before writing: is the pruned model good enough to write, and what should
its user be told? A model that lost most of its behaviour is never written silently.

- `--min-fidelity X`: the held-back centred cosine (encoders, classifiers) or, for a language
  model, the next-token agreement must reach X; `--max-perplexity-ratio R`: a language model's
  held-back perplexity may grow at most R-fold. A miss writes nothing (exit 3, one line).
- Without a gate, a visible warning when the held-back fidelity is poor, or is measured on too few
  samples to judge, with what would help.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SnpError
from .verification import Fidelity

POOR_CENTRED_COSINE = 0.8  # below this an encoder's outputs have lost much of what varies between inputs
POOR_PERPLEXITY_RATIO = 1.5  # above this a language model is visibly worse at its own text
FEW_SAMPLES = 8  # fewer held-back samples than this judge nothing
GATE_EXIT = 3


@dataclass(frozen=True)
class FidelityGate:
    min_fidelity: float | None = None
    max_perplexity_ratio: float | None = None

    def __post_init__(self):
        if self.min_fidelity is not None and not -1.0 <= self.min_fidelity <= 1.0:
            raise SnpError(f"--min-fidelity must be between -1 and 1, got {self.min_fidelity!r}")
        if self.max_perplexity_ratio is not None and not self.max_perplexity_ratio >= 1.0:
            raise SnpError(f"--max-perplexity-ratio must be at least 1, got {self.max_perplexity_ratio!r}")


class GateFailed(Exception):
    """The pruned model missed a fidelity gate: nothing is written."""


def check(fidelity: Fidelity, gate: FidelityGate) -> None:
    """Raise GateFailed (one line: what was measured against what was asked) on a miss."""
    measured = f"on {fidelity.samples} held-back samples"
    if gate.max_perplexity_ratio is not None:
        if fidelity.perplexity_ratio is None:
            raise GateFailed("--max-perplexity-ratio needs a language model (a logits output over input_ids); "
                             "this model has none: use --min-fidelity")
        if fidelity.perplexity_ratio > gate.max_perplexity_ratio:
            raise GateFailed(f"perplexity grew {fidelity.perplexity_ratio:.2f}x ({fidelity.perplexity_before:.2f} -> "
                             f"{fidelity.perplexity_after:.2f}) {measured}, more than --max-perplexity-ratio "
                             f"{gate.max_perplexity_ratio}; nothing written")
    if gate.min_fidelity is not None:
        name, value = measure(fidelity)
        if value < gate.min_fidelity:
            raise GateFailed(f"{name} {value:.4f} {measured} is below --min-fidelity {gate.min_fidelity}; "
                             "nothing written")


def measure(fidelity: Fidelity) -> tuple[str, float]:
    """What --min-fidelity reads: next-token agreement for a language model, else centred cosine."""
    if fidelity.next_token_agreement is not None:
        return "next-token agreement", fidelity.next_token_agreement
    return "centred cosine", fidelity.centred_cosine


def warnings_for(fidelity: Fidelity, synthetic: bool) -> list[str]:
    """Lines to show a user whose model is damaged, or whose fidelity figure cannot be trusted."""
    lines = []
    if fidelity.perplexity_ratio is not None and fidelity.perplexity_ratio > POOR_PERPLEXITY_RATIO:
        lines.append(f"the pruned model's perplexity is {fidelity.perplexity_ratio:.2f}x the original's on the "
                     "held-back text: try a smaller cut (--ratio, --target-flops) or more calibration text "
                     "(--calib-text with a few hundred passages)")
    elif fidelity.perplexity_ratio is None and fidelity.centred_cosine < POOR_CENTRED_COSINE:
        lines.append(f"the pruned model keeps little of what varies between inputs (held-back centred cosine "
                     f"{fidelity.centred_cosine:.3f}): try a smaller cut or more calibration data")
    if fidelity.samples < FEW_SAMPLES and not synthetic:
        lines.append(f"fidelity was measured on only {fidelity.samples} held-back sample(s) (an eighth of the "
                     f"calibration data is held back): it cannot judge the model; give at least "
                     f"{8 * FEW_SAMPLES} calibration samples")
    return lines
