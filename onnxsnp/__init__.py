"""onnxsnp: SNP (Structured Neuron-level Pruning) for exported ONNX transformers.

    import onnxsnp
    pruned, report = onnxsnp.prune("model.onnx", 0.3, calib_text="texts.txt")
    onnx.save(pruned, "pruned.onnx"); print(report.table())

- prune(model, ratio=0.5, *, calib=None, calib_text=None, calib_images=None, **options)
  → (onnx.ModelProto, Report): the options are the command line's, as keywords (target_flops,
  heads, compensate, criterion, …); a misspelt or bad one raises SnpError.
- sweep(model, targets, out, *, kind="flops", calib=None, **options) → SweepResult: one pruned
  model per budget, sweep.md / .csv / .html in `out`.
- inspect(path) → what is matched and what is skipped, with reasons.
- Report: what a prune did (fields: flops_before/after, params_before/after, fidelity, blocks, …;
  table(), as_dict()).
- SnpError: every error onnxsnp raises about its input (one line).

The command line: `python -m onnxsnp in.onnx out.onnx --ratio 0.5` (`--help`).
"""
from .errors import SnpError

__all__ = ["prune", "sweep", "inspect", "Report", "SnpError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the API pulls in onnx and onnxruntime; loading them lazily lets `python -m onnxsnp`
    # install its signal handling before the heavy imports
    if name in ("prune", "sweep", "inspect"):
        from . import api

        return getattr(api, name)
    if name == "Report":
        from .report.report import Report

        return Report
    raise AttributeError(f"module 'onnxsnp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
