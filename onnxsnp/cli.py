"""Command line: `onnxsnp IN OUT [options]` prunes, `onnxsnp inspect IN` lists what was found."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import onnx

from . import __version__
from .errors import SnpError
from .option_schema import BY_NAME, OPTIONS, Front, Group, OptionSpec, names
from .options import PruneOptions, make_options
from .sweeping import csv as sweep_csv, markdown as sweep_markdown, page as sweep_page, parse_goals, sweep as run_sweep
from .match import Matches
from .report.html import render as render_html
from .io.loading import load_model
from .verify.gate import GATE_EXIT, FidelityGate, GateFailed
from .verify.gate import check as check_gate, warnings_for as fidelity_warnings
from .report.inspection import inspect_model
from .ir.quant_form import QuantForm
from .pipeline import prune_model
from .data.calib_data import RawCalibration, load_raw_calibration, raw_request
from .progress import reporting, stage
from .io.writing import data_file, write_model_atomically, write_text_atomically
from .io.genai import GenaiFolder, genai_folder, pruned_config, write_folder
from .ir.graph import ModelGraph

EXAMPLES = """examples:
  onnxsnp models/digits_vit.onnx pruned.onnx --ratio 0.5
  onnxsnp in.onnx out.onnx --qk-ratio 0.5 --v-ratio 0.25 --ffn-ratio 0.3 --calib calib.npz
  onnxsnp in.onnx out.onnx --ratio 0.3 --criterion l2 --report report.json --html report.html
  onnxsnp in.onnx out.onnx --ratio 0.3 --heads 0.25 --blocks 1
  onnxsnp in.onnx out.onnx --target-flops 0.5 --align 8 --calib calib.npz
  onnxsnp in.onnx out.onnx --target-speedup 2 --calib calib.npz
  onnxsnp bert/model.onnx out.onnx --calib-text sentences.txt          (tokenizer.json beside the model)
  onnxsnp vit/model.onnx out.onnx --calib-images photos/                (preprocessor_config.json beside it)
  onnxsnp genai-folder/ pruned-folder/ --ratio 0.3 --calib-text texts.txt   (onnxruntime-genai: folder in, folder out)
  onnxsnp inspect in.onnx
  onnxsnp sweep in.onnx --targets 0.9,0.7,0.5 --out sweep/ --calib calib.npz
"""
SWEEP_EXAMPLES = """examples:
  onnxsnp sweep models/digits_vit.onnx --targets 0.9,0.8,0.7,0.6,0.5,0.4 --out sweep/ --calib models/digits_vit_calib.npz
  onnxsnp sweep bert/model.onnx --targets 0.8,0.6 --kind params --out sweep/ --calib-text sentences.txt
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_option(parser, spec: OptionSpec) -> None:
    """The argument of one option of option_schema (its help ends with the default)."""
    default = spec.plain_default
    extra = {"type": spec.cli_type, "choices": spec.allowed or None, "metavar": spec.metavar}
    parser.add_argument(spec.flag, default=default, **{key: value for key, value in extra.items() if value is not None},
                        help=spec.help + ("" if default is None else f"; default {default}"))
    if spec.off:
        value, text = spec.off
        parser.add_argument(f"--no-{spec.flag[2:]}", dest=spec.name, action="store_const", const=value, help=text)


def _prune_parser(sweep: bool = False) -> argparse.ArgumentParser:
    """The options of `onnxsnp IN OUT`; with `sweep`, those of `onnxsnp sweep IN --targets … --out DIR`
    (the same, but budgets instead of one output, ratios and target). option_schema declares the
    options they share with the API and the Olive pass; the rest are the command line's own."""
    if sweep:
        parser = _Parser(prog="onnxsnp sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=SWEEP_EXAMPLES,
                         description="Prune one model at several budgets, sharing the calibration and the "
                                     "sensitivity survey, and write each model with a table and a chart of FLOPs, "
                                     "parameters, measured latency and fidelity per budget.")
        parser.add_argument("input", help="the ONNX model to prune (never modified)")
        parser.add_argument("--targets", required=True, metavar="F,F,…",
                            help="budgets as fractions of the original, e.g. 0.9,0.8,0.7,0.6,0.5,0.4")
        parser.add_argument("--kind", choices=("flops", "params"), default="flops",
                            help="what the budgets count (default flops)")
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="folder for the models (target_0.7.onnx, …), sweep.md, sweep.csv and sweep.html "
                                 "(created if missing; files of an earlier sweep are replaced)")
    else:
        parser = _Parser(prog="onnxsnp", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                         description="Prune an ONNX transformer with SNP (structured neuron-level pruning). "
                                     "Use `onnxsnp inspect IN` to list the blocks it finds, `onnxsnp sweep` to "
                                     "prune at several budgets.")
        parser.add_argument("--version", action="version", version=f"onnxsnp {__version__}")
        parser.add_argument("input", help="the ONNX model to prune, or an onnxruntime-genai folder (never modified)")
        parser.add_argument("output", help="where to write the pruned model, or the pruned folder (written only "
                                           "after it verified)")
    front = Front.CLI_SWEEP if sweep else Front.CLI_PRUNE
    raw = parser.add_argument_group(
        "calibration from raw data", "instead of --calib: texts through the model's tokenizer, or images through its "
        "preprocessing (up to --calib-samples of them, a random choice by --seed where there are more)")
    for spec in OPTIONS:
        if front in spec.fronts:
            _add_option(raw if spec.group is Group.RAW else parser, spec)
    if not sweep:
        parser.add_argument("--min-fidelity", type=float, metavar="X",
                            help="write nothing and exit 3 unless the held-back centred cosine (a language model: "
                                 "next-token agreement) is at least X")
        parser.add_argument("--max-perplexity-ratio", type=float, metavar="R",
                            help="language models: write nothing and exit 3 if the held-back perplexity grows more "
                                 "than R-fold")
        parser.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
        parser.add_argument("--html", metavar="FILE.html",
                            help="write the report as a self-contained HTML page with per-block charts")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, table or warnings")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log each stage with its time (-v), and skipped candidates and tracebacks of "
                             "unexpected errors (-vv)")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxsnp inspect", description="List the attention and FFN blocks onnxsnp finds in a "
                     "model, and every candidate it skipped with the reason.",
                     epilog="example:\n  onnxsnp inspect models/digits_vit.onnx",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the ONNX model")
    parser.add_argument("--json", action="store_true", help="print what was found as JSON (for pipelines)")
    parser.epilog += ("\n\nexit status: 0 when something can be pruned, 2 when nothing can (or the model "
                      "cannot be read): a pipeline's pre-check")
    return parser


def matches_json(inspection) -> dict:
    """What inspect found, as plain data: blocks, whole layers, skipped candidates with reasons."""
    matches = inspection.matches
    return {"prunable": bool(matches.attention or matches.ffn),
            "attention": [{"name": b.name, "form": b.form.value, "heads": b.heads, "kv_heads": b.groups,
                           "head_dim": b.head_dim, "rotary": bool(b.rotary), "kv_cache": bool(b.kv_caches),
                           "heads_fixed": b.heads_fixed, "qk_whole": b.qk_whole, "pairs_shared": b.pairs_shared}
                          for b in matches.attention],
            "ffn": [{"name": f.name, "activation": f.activation, "hidden": f.hidden, "gated": f.gate is not None}
                    for f in matches.ffn],
            "layers": [layer.name for layer in matches.layers],
            "skipped": [{"kind": s.kind.value, "where": s.where, "reason": s.reason} for s in matches.skipped],
            "reconstruction": inspection.reconstruction or "yes",
            "quantized_form": inspection.form.name.lower(), "weights": inspection.granularity,
            "unsupported": inspection.unsupported}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _interrupt)
    verbosity = sum(arg.count("v") for arg in argv if arg.startswith("-v") and set(arg[1:]) == {"v"}) + \
        argv.count("--verbose")
    _configure_logging(verbosity)
    written: list[Path] = []  # complete outputs in place, named if an interrupt stops the rest
    try:
        if argv and argv[0] == "inspect":
            args = _inspect_parser().parse_args(argv[1:])
            inspection = inspect_model(args.input)
            if args.json:
                print(json.dumps(matches_json(inspection), indent=1))
            else:
                if inspection.form != QuantForm.FLOAT:
                    print(f"quantized form: {inspection.form.value}"
                          + (f", weights {inspection.granularity}" if inspection.granularity else ""))
                if inspection.unsupported:
                    print(f"cannot prune this form: {inspection.unsupported}")
                print(format_matches(inspection.matches))
                print("block-by-block reconstruction (--compensate lstsq): "
                      + ("yes" if inspection.reconstruction is None else f"no, the one-pass refit runs instead: "
                                                                          f"{inspection.reconstruction}"))
            if not (inspection.matches.attention or inspection.matches.ffn):
                print(f"onnxsnp: nothing to prune: no attention or FFN block was matched "
                      f"({len(inspection.matches.skipped)} candidate(s) skipped, reasons above)", file=sys.stderr)
                return 2
            return 0
        if argv and argv[0] == "sweep":
            return _run_sweep(_prune_parser(sweep=True).parse_args(argv[1:]), written)
        return _run_prune(_prune_parser().parse_args(argv), written)
    except SnpError as exc:
        print(f"onnxsnp: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stderr.close()
        return 0
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("onnxsnp: interrupted; " + (f"only {', '.join(map(str, written))} written" if written
                                          else "nothing written"), file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxsnp: error: out of memory", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for the user (unless asked for with -vv): one line, exit 2
        if verbosity >= 2:
            import traceback

            traceback.print_exc()
        detail = str(exc).strip().splitlines()
        print(f"onnxsnp: error: unexpected {type(exc).__name__}: {detail[0][:300] if detail else ''} "
              "(please report this with the model)", file=sys.stderr)
        return 2


def _configure_logging(verbosity: int) -> None:
    import logging

    logger = logging.getLogger("onnxsnp")
    logger.handlers[:] = []
    if verbosity:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("onnxsnp: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
        logger.propagate = False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _options(args: argparse.Namespace, **chosen) -> PruneOptions:
    """The options of a prune or of one budget of a sweep (`chosen`: what differs)."""
    values = {name: getattr(args, name) for name in names(Front.CLI_PRUNE, Group.PRUNE) if hasattr(args, name)}
    return make_options(**values | chosen, progress=not args.quiet,
                        # latency is a report figure: not measured when no report is shown or written
                        measure_latency=bool(getattr(args, "report", None) or getattr(args, "html", None)
                                             or getattr(args, "out", None)) or not args.quiet)


def _run_sweep(args: argparse.Namespace, written: list[Path]) -> int:
    source, folder = Path(args.input), Path(args.out)
    goals = parse_goals(args.targets)
    options_for = {goal: _options(args, **{f"target_{args.kind}": goal}) for goal in goals}  # all checked first
    if folder.exists() and not folder.is_dir():
        raise SnpError(f"--out is not a folder: {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    names = {goal: folder / f"target_{goal:g}.onnx" for goal in goals}
    _check_outputs([(path, "output") for path in names.values()])
    loaded = load_model(source, lazy=True)
    for path in names.values():
        _check_not_inputs(loaded.files, path, [])

    def write(goal: float, result) -> str:
        write_model_atomically(result.model, names[goal], result.external_data, written)
        if not args.quiet:
            print(f"target {goal:g} × {args.kind}: wrote {names[goal]}")
        return names[goal].name

    result = _with_calibration(args, source, loaded.model, lambda calib, label: run_sweep(
        loaded, goals, options_for.__getitem__, write, calib=calib, calib_label=label))
    for name, text in (("sweep.md", sweep_markdown(result)), ("sweep.csv", sweep_csv(result)),
                       ("sweep.html", sweep_page(result, f"onnxsnp sweep: {source.name}"))):
        write_text_atomically(folder / name, text, written)
    if not args.quiet:
        print(sweep_markdown(result))
        print(f"shared work {result.shared_seconds:.1f} s, then {sum(r.seconds for r in result.rows):.1f} s for "
              f"{len(result.rows)} budgets; wrote {folder / 'sweep.html'}")
    return 0


def _with_calibration(args: argparse.Namespace, source: Path, model: onnx.ModelProto, job):
    """`job(calib, calib_label)` with the calibration the arguments name (arrays made from raw
    data, or the --calib path), warnings shown in one line each or, with -q, not at all."""
    with warnings.catch_warnings():
        if args.quiet:
            warnings.simplefilter("ignore")
        else:
            warnings.showwarning = _show_warning
        raw = _raw_calibration(args, source, model)
        return job(raw.arrays if raw else args.calib, raw.label if raw else None)


def _run_prune(args: argparse.Namespace, written: list[Path]) -> int:
    source, target = Path(args.input), Path(args.output)
    folder = genai_folder(source)  # an onnxruntime-genai folder in gives a folder out
    if folder is not None:
        source = folder.model_file
    options = _options(args, one_head_size=folder is not None)
    reports = [Path(p) for p in (args.report, args.html) if p]
    _check_outputs(([] if folder is not None else [(target, "output")]) + [(report, "report") for report in reports])
    if folder is not None:
        _check_output_folder(target, folder)
    gate = FidelityGate(args.min_fidelity, args.max_perplexity_ratio)
    loaded = load_model(source, lazy=True)
    _check_not_inputs(loaded.files, target, reports)
    result = _with_calibration(args, source, loaded.model, lambda calib, label: prune_model(
        loaded, options, calib=calib, calib_label=label))
    try:
        check_gate(result.report.fidelity, gate)
    except GateFailed as exc:
        print(f"onnxsnp: fidelity gate: {exc}", file=sys.stderr)
        return GATE_EXIT
    if not args.quiet:
        for line in fidelity_warnings(result.report.fidelity, result.report.calibration == "synthetic"):
            print(f"onnxsnp: warning: {line}", file=sys.stderr)
    with reporting(not args.quiet), stage(f"writing {target}"):
        if folder is not None:
            write_folder(folder, target, result.model, pruned_config(folder, result.model), result.external_data,
                         written)
        else:
            write_model_atomically(result.model, target, result.external_data, written)
    if args.report:
        write_text_atomically(Path(args.report), json.dumps(result.report.as_dict(), indent=2) + "\n", written)
    if args.html:
        write_text_atomically(Path(args.html), render_html(result.report, f"onnxsnp: {source.name}"), written)
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {target}")
    return 0


# --- calibration from raw data: --calib-text, --calib-images (onnxsnp/data/calib_data.py) ----------------

def _raw_calibration(args: argparse.Namespace, source: Path, model: onnx.ModelProto) -> RawCalibration | None:
    request = raw_request(args, lambda name: BY_NAME[name].flag)
    if request is None:
        return None
    return load_raw_calibration(source, ModelGraph(model), request, args.calib_samples, args.seed)


# ------------------------------------------------------------------------------------------------

def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"onnxsnp: warning: {message}", file=sys.stderr)


def _check_outputs(paths: list[tuple[Path, str]]) -> None:
    """Fail before any work on outputs that cannot be written."""
    for path, what in paths:
        if path.is_dir():
            raise SnpError(f"{what} path is a directory: {path}")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise SnpError(f"{what} folder does not exist: {folder}")
        if not os.access(folder, os.W_OK):
            raise SnpError(f"{what} folder is not writable: {folder}")


def _check_output_folder(target: Path, source: GenaiFolder) -> None:
    """A genai folder's output: a new (or empty) folder, not the input's."""
    if target.resolve() == source.folder.resolve():
        raise SnpError("the output folder is the input folder; choose another so the input is kept")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SnpError(f"output folder {target} exists and is not empty")
    _check_outputs([(target / "x", "output")]) if target.is_dir() else _check_outputs([(target, "output")])


def _check_not_inputs(inputs: frozenset[Path], target: Path, reports: list[Path]) -> None:
    """The model and its external data are never overwritten, and outputs do not collide."""
    written = {target.resolve(): "output", data_file(target).resolve(): "output's external data"}
    for report in reports:
        if report.resolve() in written:
            raise SnpError(f"report path {report} would overwrite the {written[report.resolve()]}")
        written[report.resolve()] = "report"
    for path, what in written.items():
        if path in inputs:
            raise SnpError(f"the {what} path {path} is part of the input model; choose another so the input is kept")


def format_matches(matches: Matches) -> str:
    lines = [f"{len(matches.attention)} attention block(s):"]
    for b in matches.attention:
        lines.append(f"  {b.name:<44} {b.form.value:<10} heads {b.heads:<3} head dim {b.head_dim:<4} "
                     f"q/k/v width {b.heads * b.head_dim}  out proj {b.out.node}")
        if b.heads_fixed:
            lines.append(f"    (whole heads cannot be removed: {b.heads_fixed})")
        if b.qk_whole:
            lines.append(f"    (Q/K keep every dim of a kept head: {b.qk_whole})")
        elif b.pairs_shared:
            lines.append(f"    (every head keeps the same Q/K pairs: {b.pairs_shared})")
    lines.append(f"{len(matches.ffn)} FFN block(s):")
    for f in matches.ffn:
        lines.append(f"  {f.name:<44} {f.activation:<18} hidden {f.hidden}")
    lines.append(f"{len(matches.layers)} whole transformer block(s) removable with --blocks:")
    for index, layer in enumerate(matches.layers):
        lines.append(f"  {index}: {layer.name} ({layer.norm.value}-norm)")
    if matches.skipped:
        lines.append(f"{len(matches.skipped)} skipped:")
        for s in matches.skipped:
            lines.append(f"  {s.kind.value:<9} at {s.where}: {s.reason}")
    return "\n".join(lines)
