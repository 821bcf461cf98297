"""Every option of a prune, checked in one place before any work (the CLI, the API and the Olive pass
share it; option_schema declares the options and their defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from types import SimpleNamespace

from .compensate.batches import Workers
from .score.allocation import Target, parse_latency_target, parse_target
from .errors import SnpError
from .score.criteria import CRITERIA
from .option_schema import Compensation, Group, ResidualCriterion, defaults  # noqa: F401 (Compensation re-exported)
from .plan import Ratios
from .match.blocks import QkNormCut
from .plan import Propagation, Reduction, Selection, TimedStep


SYNTHETIC_SAMPLES = 64  # synthetic calibration samples made when no data is given


@dataclass(frozen=True)
class PruneOptions:
    """The checked options of a prune (no defaults here: option_schema declares them, make_options fills them)."""
    ratios: Ratios
    target: Target | None
    criterion: str  # one of importance.CRITERIA
    compensation: Compensation
    propagation: Propagation
    selection: Selection
    reduction: Reduction
    residual_criterion: ResidualCriterion
    calib_samples: int | None  # None: every sample given (SYNTHETIC_SAMPLES without data)
    seed: int
    batch_size: int | None
    rescale_qk: bool
    progress: bool
    measure_latency: bool
    one_head_size: bool  # every attention keeps the same heads and per-head width, Q/K = V (genai.py)
    workers: Workers  # where the reconstruction's calibration batches are held (distributed.py)
    timed_step: TimedStep  # what a latency budget times on a model with a KV cache
    qk_norm_cut: QkNormCut  # Q/K dims within the heads of a per-head QK-norm (match/qk_norm.py)


_DEFAULTS = defaults(Group.PRUNE)


def make_options(ratio: float = _DEFAULTS["ratio"], **keywords) -> PruneOptions:
    """PruneOptions from plain values named as in option_schema (`qk_ratio=0.3`, `compensate="bias"`;
    unset ones take the schema's defaults), or SnpError (one line) naming the bad one."""
    unknown = sorted(set(keywords) - set(_DEFAULTS))
    if unknown:
        raise SnpError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                       f"the options are {', '.join(_DEFAULTS)}")
    v = SimpleNamespace(**(_DEFAULTS | keywords | {"ratio": ratio}))
    if v.criterion not in CRITERIA:
        raise SnpError(f"--criterion must be one of {', '.join(CRITERIA)}, got {v.criterion!r}")
    if v.calib_samples is not None and (isinstance(v.calib_samples, bool) or not isinstance(v.calib_samples, int)
                                        or v.calib_samples < 1):
        raise SnpError(f"--calib-samples must be a positive integer, got {v.calib_samples!r}")
    if v.batch_size is not None and (isinstance(v.batch_size, bool) or not isinstance(v.batch_size, int)
                                     or v.batch_size < 1):
        raise SnpError(f"batch size must be a positive integer, got {v.batch_size!r}")
    if isinstance(v.workers, bool) or not isinstance(v.workers, int) or v.workers < 1:
        # the upper bound, one calibration batch per worker, is checked once the batches are cut
        raise SnpError(f"--workers must be a positive integer, got {v.workers!r}")
    if v.ray_address is not None and (not isinstance(v.ray_address, str) or not v.ray_address.strip()):
        raise SnpError(f"--ray-address must be a Ray cluster address such as auto or ray://head:10001, "
                       f"got {v.ray_address!r}")
    compensate = ("lstsq" if v.compensate else "none") if isinstance(v.compensate, bool) else v.compensate
    return PruneOptions(
        ratios=resolve_ratios(v.ratio, v.qk_ratio, v.v_ratio, v.ffn_ratio, v.heads, v.blocks, v.align, v.residual),
        target=resolve_target(v.target_flops, v.target_params, v.target_speedup, v.target_latency),
        criterion=v.criterion, compensation=_member(Compensation, compensate, "--compensate"),
        propagation=_member(Propagation, v.reconstruct, "--reconstruct"),
        selection=_member(Selection, v.selection, "--selection"),
        reduction=_member(Reduction, v.reduction, "--reduction"),
        residual_criterion=_member(ResidualCriterion, v.residual_criterion, "--residual-criterion"),
        calib_samples=v.calib_samples, seed=v.seed, batch_size=v.batch_size, rescale_qk=v.rescale_qk,
        progress=v.progress, measure_latency=v.measure_latency, one_head_size=bool(v.one_head_size),
        workers=Workers(v.workers, v.ray_address), timed_step=_member(TimedStep, v.timed_step, "--timed-step"),
        qk_norm_cut=_member(QkNormCut, v.qk_norm_cut, "--qk-norm-cut"))


def _member(kind: type[Enum], value, flag: str):
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise SnpError(f"{flag} must be one of {', '.join(m.value for m in kind)}, got {value!r}") from None


def resolve_target(flops: float | str | None, params: float | str | None, speedup: float | str | None = None,
                   latency: float | str | None = None) -> Target | None:
    given = [flag for flag, value in (("--target-flops", flops), ("--target-params", params),
                                      ("--target-speedup", speedup), ("--target-latency", latency))
             if value is not None]
    if len(given) > 1:
        raise SnpError(f"give one budget, not {' and '.join(given)}")
    if flops is not None:
        return parse_target(flops, "flops")
    if params is not None:
        return parse_target(params, "params")
    return parse_latency_target(speedup, latency) if given else None


def resolve_ratios(ratio: float, qk: float | None = None, v: float | None = None, ffn: float | None = None,
                   heads: float = 0.0, blocks: int | str | tuple[int, ...] = 0, align: int = 1,
                   residual: float = 0.0) -> Ratios:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise SnpError(f"--align must be a positive integer, got {align!r}")
    values = {"ratio": ratio, "qk-ratio": qk, "v-ratio": v, "ffn-ratio": ffn, "heads": heads, "residual": residual}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
            raise SnpError(f"--{name} must be a number with 0 <= value < 1, got {value!r}")
    count, indices = parse_blocks(blocks)
    return Ratios(ratio if qk is None else qk, ratio if v is None else v, ratio if ffn is None else ffn, heads,
                  count, indices, align, residual)


def parse_blocks(blocks: int | str | tuple[int, ...] | list[int]) -> tuple[int, tuple[int, ...]]:
    """`--blocks`: a count ("2"), or block indices ("3,7"; "5," for one index)."""
    try:
        if isinstance(blocks, str) and "," in blocks:
            indices = tuple(int(part) for part in blocks.split(",") if part.strip())
            if indices and min(indices) >= 0:
                return 0, indices
        elif isinstance(blocks, (tuple, list)) and all(isinstance(b, int) and b >= 0 for b in blocks):
            return 0, tuple(blocks)
        elif not isinstance(blocks, bool) and int(blocks) >= 0 and float(blocks) == int(blocks):
            return int(blocks), ()
    except (TypeError, ValueError):
        pass
    raise SnpError(f"--blocks must be a count (e.g. 2) or block indices (e.g. 3,7 or 5,), got {blocks!r}")
