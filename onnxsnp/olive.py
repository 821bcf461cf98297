"""SNP pruning as a pass of Microsoft Olive workflows (`pip install "onnxsnp[olive]"`).

Olive looks passes up in its package configuration (olive_config.json), which `olive run
--package-config FILE` replaces as a whole. `package_config()` is Olive's own with `SnpPruning`
added, so a workflow can put `{"type": "SnpPruning", ...}` between conversion and quantization:

    python -m onnxsnp.olive WORKFLOW.json                # runs the workflow with the pass known
    python -m onnxsnp.olive --package-config pkg.json    # or: olive run --config WORKFLOW.json --package-config pkg.json

The pass takes the options of the command line (option_schema's with Front.OLIVE: `ratio`,
`qk_ratio`, …, `calib` an .npz, `calib_text`/`calib_images` raw data; relative paths are read
from the working directory) and
writes the pruned model with Olive's external-data settings. A model onnxsnp cannot prune
safely fails the pass with onnxsnp's one-line message.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from .data.calib_data import load_raw_calibration, raw_request
from .errors import SnpError
from .ir.graph import ModelGraph
from .io.loading import load_model
from .option_schema import OPTIONS, Front, Group
from .api import prune

PASS_NAME = "SnpPruning"

_OPTIONS = tuple(spec for spec in OPTIONS if Front.OLIVE in spec.fronts)


class SnpPruning(Pass):
    """Structured neuron-level pruning (SNP) of the attention and FFN blocks of an ONNX transformer."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        # the defaults as a JSON config spells them (an Enum's value), so Olive's config hashes stay plain
        return {spec.name: PassConfigParam(type_=spec.config_type, default_value=spec.plain_default,
                                           description=spec.help) for spec in _OPTIONS} | get_external_data_config()

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        try:
            calib = _calibration(config, Path(model.model_path))
            pruned, _ = prune(model.model_path, calib=calib, **{spec.name: getattr(config, spec.name)
                                                                for spec in _OPTIONS if spec.group is Group.PRUNE})
        except SnpError as exc:
            raise ValueError(f"onnxsnp: {exc}") from None
        return model_proto_to_olive_model(pruned, output_model_path, config)


def _calibration(config, model_path: Path):
    """The .npz path, the arrays made from raw data, or None (synthetic inputs)."""
    request = raw_request(config)
    if request is None:
        return config.calib
    graph = ModelGraph(load_model(model_path).model)
    return load_raw_calibration(model_path, graph, request, config.calib_samples, config.seed).arrays


def package_config() -> dict:
    """Olive's package configuration with the SnpPruning pass added."""
    from olive.package_config import OlivePackageConfig

    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config["passes"][PASS_NAME] = {
        "module_path": f"onnxsnp.olive.{PASS_NAME}",  # not __name__: that is __main__ under python -m
        "supported_providers": ["*"], "supported_accelerators": ["*"], "supported_precisions": ["*"],
        "supported_algorithms": [], "supported_quantization_encodings": [],
        "dataset": "dataset_not_required",
    }
    return config


def run(workflow: str | Path | dict):
    """`olive.workflows.run` with the SnpPruning pass known; returns Olive's result."""
    from olive.workflows import run as olive_run

    return olive_run(str(workflow) if isinstance(workflow, Path) else workflow, package_config=package_config())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxsnp.olive",
                                     description="Run an Olive workflow in which SnpPruning is a known pass.")
    parser.add_argument("workflow", nargs="?", help="the Olive workflow (run config) JSON")
    parser.add_argument("--package-config", metavar="FILE",
                        help="instead: write Olive's package config with SnpPruning added, for `olive run "
                             "--package-config FILE`")
    args = parser.parse_args(argv)
    if args.package_config:
        Path(args.package_config).write_text(json.dumps(package_config(), indent=2) + "\n")
        return 0
    if not args.workflow:
        parser.error("give a workflow JSON or --package-config FILE")
    run(Path(args.workflow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
