"""The Python API: `prune`, `sweep` and `inspect`, with the command line's options as keywords
(checked by options.make_options, the one place that validates them) and calibration from arrays,
an .npz file, a text file or an image folder."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

from .data.calib_data import load_raw_calibration, raw_request
from .errors import SnpError
from .ir.graph import ModelGraph
from .io.loading import LoadedModel, load_model
from .option_schema import BY_NAME, Front, Group, names
from .options import PruneOptions, make_options
from .report.report import Report

Model = onnx.ModelProto | str | os.PathLike
Calibration = str | os.PathLike | dict[str, np.ndarray] | None
_RAW = names(Front.API_PRUNE, Group.RAW)


def _check(keywords: dict, front: Front, group: Group | None = None) -> None:
    """SnpError naming every keyword `front` does not take (option_schema says what each takes)."""
    taken = names(front, group)
    unknown = sorted(set(keywords) - set(taken))
    if unknown:
        # a ratio or a target given to a sweep, whose budgets are its targets
        what = "sweep takes no" if set(unknown) <= set(names(Front.API_PRUNE, group)) else "unknown"
        raise SnpError(f"{what} option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                       f"the options are {', '.join(taken)}")


def options(ratio: float = BY_NAME["ratio"].default, **keywords) -> PruneOptions:
    """The options of a prune from the command line's names as keywords (`qk_ratio=0.3`,
    `target_flops=0.6`, `compensate="bias"`, …); SnpError names a misspelt or bad one."""
    _check(keywords, Front.API_PRUNE, Group.PRUNE)
    return make_options(ratio, **keywords)


def _calibration(model: Model | LoadedModel, calib: Calibration, chosen: PruneOptions, raw: dict
                 ) -> tuple[Model | LoadedModel, Calibration, str | None]:
    """(model, calibration, its label): arrays made from `calib_text` / `calib_images` as the
    command line makes them (the tokenizer or preprocessing beside the model file)."""
    request = raw_request(SimpleNamespace(calib=calib, **raw), lambda name: f"{name}=")
    if request is None:
        return model, calib, None
    if isinstance(model, onnx.ModelProto):
        path, loaded = Path("model.onnx"), model
    else:
        model = model if isinstance(model, LoadedModel) else load_model(model, lazy=True)
        path, loaded = Path(model.path), model.model
    made = load_raw_calibration(path, ModelGraph(loaded), request, chosen.calib_samples, chosen.seed)
    return model, made.arrays, made.label


def _split(keywords: dict) -> tuple[dict, dict]:
    raw = {name: keywords.pop(name) for name in list(keywords) if name in _RAW}
    return keywords, raw


def prune(model: Model, ratio: float = BY_NAME["ratio"].default, *, calib: Calibration = None,
          **keywords) -> tuple[onnx.ModelProto, Report]:
    """Prune a transformer with SNP: (pruned model, Report). The input is not changed.

    `model`: an .onnx path (external data beside it) or a ModelProto. `ratio`: the fraction of
    neurons removed from every group (Q/K pairs, V, FFN); or a budget instead — `target_flops`,
    `target_params` (a fraction of the original or an absolute count), `target_speedup`,
    `target_latency` (ms). Per group: `qk_ratio`, `v_ratio`, `ffn_ratio`; whole units: `heads`
    (a fraction of key/value groups), `blocks` (a count or indices), `residual` (stream
    channels). How: `criterion` ("snp", "l2", …), `compensate` ("lstsq", "bias", "none"),
    `align`, `seed`, `calib_samples`, `workers`; see README, Command line.

    Calibration: `calib` — arrays keyed by input name (first axis = samples) or an .npz path;
    or `calib_text` — a text file (one text per line, or JSONL with `text_field`), tokenized
    with `tokenizer` (default: tokenizer.json beside the model) to `max_length`; or
    `calib_images` — an image folder, preprocessed as preprocessor_config.json beside the model
    says or by `image_size`, `image_crop`, `image_scale`, `image_mean`, `image_std`,
    `image_resample`. Without any, synthetic inputs (the report says so).

    Raises SnpError (one line) for a bad option, model or calibration."""
    from .pipeline import prune_model

    _check(keywords, Front.API_PRUNE)
    keywords, raw = _split(dict(keywords))
    chosen = options(ratio, **keywords)
    model, calib, label = _calibration(model, calib, chosen, raw)
    result = prune_model(model, chosen, calib=calib, calib_label=label)
    return result.model, result.report


def sweep(model: Model, targets: tuple[float, ...] | list[float], out: str | os.PathLike, *, kind: str = "flops",
          calib: Calibration = None, **keywords):
    """Prune at every budget of `targets` (fractions of the original's FLOPs, parameters — `kind`
    "flops" / "params" — or speedups over it, `kind` "speedup") sharing the calibration and the
    sensitivity survey; writes `out`/target_<target>.onnx, sweep.md, sweep.csv and sweep.html
    (fidelity against measured speedup) and returns the SweepResult. Other keywords as `prune`."""
    from .sweeping import csv, markdown, page, sweep as run
    from .io.writing import write_model_atomically, write_text_atomically

    budgets = {"flops": "target_flops", "params": "target_params", "speedup": "target_speedup"}
    if kind not in budgets:
        raise SnpError(f"kind must be one of {', '.join(budgets)}, got {kind!r}")
    goals = tuple(targets)
    if not goals:
        raise SnpError("give at least one target")
    _check(keywords, Front.API_SWEEP)
    keywords, raw = _split(dict(keywords))
    first = options(**keywords, **{budgets[kind]: goals[0]})
    for goal in goals[1:]:  # every budget checked before any work
        options(**keywords, **{budgets[kind]: goal})
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, lazy=True)
    model, calib, label = _calibration(model, calib, first, raw)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SnpError(f"out is not a folder: {folder}")
    names = {goal: folder / f"target_{goal:g}.onnx" for goal in goals}
    if isinstance(model, LoadedModel) and any(path.resolve() in model.files for path in names.values()):
        raise SnpError(f"a sweep into {folder} would overwrite its input model")
    folder.mkdir(parents=True, exist_ok=True)

    def write(goal: float, result) -> str:
        write_model_atomically(result.model, names[goal], result.external_data)
        return names[goal].name

    result = run(model, goals, lambda goal: options(**keywords, **{budgets[kind]: goal}), write, calib=calib,
                 calib_label=label)
    write_text_atomically(folder / "sweep.md", markdown(result))
    write_text_atomically(folder / "sweep.csv", csv(result))
    write_text_atomically(folder / "sweep.html", page(result, f"onnxsnp sweep: {getattr(model, 'path', model)}"))
    return result


def inspect(model: str | os.PathLike):
    """What onnxsnp matches in the model at `model` (an .onnx file or an onnxruntime-genai folder):
    its `matches` (attention and FFN blocks, whole layers, every candidate skipped with the reason)."""
    from .report.inspection import inspect_model

    return inspect_model(model)
