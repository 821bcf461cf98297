"""Every option of a prune, checked in one place before any work (the CLI and the API share it)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .batches import Workers
from .least_squares import FOLDS
from .allocation import Target, parse_latency_target, parse_target
from .errors import SnpError
from .importance import CRITERIA
from .plan import Ratios
from .reconstruction import Propagation, Reduction, Selection


class Compensation(Enum):
    LSTSQ = "lstsq"  # block-by-block reconstruction (or, where the model cannot be cut into blocks, one-pass refits)
    BIAS = "bias"  # the removed neurons' mean contribution folded into the next bias (one pass)
    NONE = "none"


class ResidualCriterion(Enum):
    WEIGHTS = "weights"
    ACTIVATION = "activation"


SYNTHETIC_SAMPLES = 64  # synthetic calibration samples made when no data is given


@dataclass(frozen=True)
class PruneOptions:
    ratios: Ratios
    target: Target | None = None
    criterion: str = "snp"  # one of importance.CRITERIA
    compensation: Compensation = Compensation.LSTSQ
    propagation: Propagation = Propagation.SEQUENTIAL
    selection: Selection = Selection.OBS
    reduction: Reduction = Reduction.PROJECT
    residual_criterion: ResidualCriterion = ResidualCriterion.WEIGHTS
    calib_samples: int | None = None  # None: every sample given (SYNTHETIC_SAMPLES without data)
    seed: int = 0
    batch_size: int | None = None
    rescale_qk: bool = True
    progress: bool = False
    measure_latency: bool = True
    one_head_size: bool = False  # every attention keeps the same heads and per-head width, Q/K = V (genai.py)
    workers: Workers = Workers()  # where the reconstruction's calibration batches are held (distributed.py)


def make_options(ratio: float = 0.5, *, qk_ratio: float | None = None, v_ratio: float | None = None,
                 ffn_ratio: float | None = None, heads: float = 0.0, blocks: int | str | tuple[int, ...] = 0,
                 align: int = 1, residual: float = 0.0, target_flops: float | str | None = None,
                 target_params: float | str | None = None, target_speedup: float | str | None = None,
                 target_latency: float | str | None = None, criterion: str = "snp",
                 compensate: str | bool | Compensation = "lstsq", reconstruct: str | Propagation = "sequential",
                 selection: str | Selection = "obs", reduction: str | Reduction = "project",
                 residual_criterion: str | ResidualCriterion = "weights", calib_samples: int | None = None,
                 seed: int = 0, batch_size: int | None = None, rescale_qk: bool = True, progress: bool = False,
                 measure_latency: bool = True, one_head_size: bool = False, workers: int = 1,
                 ray_address: str | None = None) -> PruneOptions:
    """PruneOptions from plain values, or SnpError (one line) naming the bad one."""
    if criterion not in CRITERIA:
        raise SnpError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if calib_samples is not None and (isinstance(calib_samples, bool) or not isinstance(calib_samples, int)
                                      or calib_samples < 1):
        raise SnpError(f"--calib-samples must be a positive integer, got {calib_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SnpError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= FOLDS:
        raise SnpError(f"--workers must be an integer from 1 to {FOLDS} (one per cross-validation fold of the "
                       f"refits, so that the result is the one-process result), got {workers!r}")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise SnpError(f"--ray-address must be a Ray cluster address such as auto or ray://head:10001, "
                       f"got {ray_address!r}")
    if isinstance(compensate, bool):
        compensate = "lstsq" if compensate else "none"
    return PruneOptions(
        ratios=resolve_ratios(ratio, qk_ratio, v_ratio, ffn_ratio, heads, blocks, align, residual),
        target=resolve_target(target_flops, target_params, target_speedup, target_latency), criterion=criterion,
        compensation=_member(Compensation, compensate, "--compensate"),
        propagation=_member(Propagation, reconstruct, "--reconstruct"),
        selection=_member(Selection, selection, "--selection"),
        reduction=_member(Reduction, reduction, "--reduction"),
        residual_criterion=_member(ResidualCriterion, residual_criterion, "--residual-criterion"),
        calib_samples=calib_samples, seed=seed, batch_size=batch_size, rescale_qk=rescale_qk, progress=progress,
        measure_latency=measure_latency, one_head_size=bool(one_head_size), workers=Workers(workers, ray_address))


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
