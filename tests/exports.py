"""The slow tier's models: tiny transformers exported at test time with torch (and optimum, in a
venv of its own), and the lists of every exported graph form the tests cover.

Importing this module needs no torch, so that a test module can take the form lists for its
parameters and still be collected where torch is missing; torch is imported when a model is
exported, and a test that needs one is skipped there (`torch_or_skip`). Tests reach these models
through conftest's `exported` fixture, which marks them `slow`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import optimum_venv  # in tools/ (conftest puts it on the path), as torch_models, the modules exported


def torch_or_skip():
    """torch, imported only when a model is exported; the test is skipped where it is not installed."""
    return pytest.importorskip("torch")


VIT_FORMS = [("manual", False), ("manual", True), ("sdpa", False), ("sdpa", True)]
BERT_FORMS = [("eager", False), ("eager", True), ("sdpa", False), ("sdpa", True)]
# (family, attention, dynamic shapes, exporter) for every graph form the tests cover
FORMS = ([("vit", a, d, "legacy") for a, d in VIT_FORMS] + [("bert", a, d, "legacy") for a, d in BERT_FORMS]
         + [("vit", a, d, "dynamo") for a, d in VIT_FORMS] + [("bert", a, True, "dynamo") for a in ("eager", "sdpa")]
         + [("vit", "sdpa", True, "dynamo23"), ("bert", "sdpa", True, "dynamo23"), ("bert", "sdpa", False, "dynamo23")]
         + [("bert", "eager", True, "ort-optimizer"), ("bert", "eager", False, "ort-optimizer"),
            ("bert", "eager", True, "ort-mha")]
         + [("vit", "sdpa", True, "legacy-fp16"), ("bert", "eager", True, "legacy-fp16")])
# graphs saved by onnxruntime's own session optimizer (SessionOptions.optimized_model_filepath)
SESSION_FORMS = [(f, a, d, f"ort-session-{level}") for level in ("basic", "extended", "all")
                 for f, a, d in (("vit", "sdpa", False), ("vit", "manual", True), ("bert", "sdpa", False),
                                 ("bert", "eager", True))]

# weight-only int8 models: DequantizeLinear or Cast → Mul, per tensor or per output channel
INT8_FORMS = [(f, a, True, f"int8-{style}") for f, a in (("vit", "sdpa"), ("bert", "eager"))
              for style in ("dq-tensor", "dq-channel", "cast-tensor", "cast-channel")]

# DINOv2-shaped: written-out LayerNorm and LayerScale (tools/torch_models.py)
NORM_FORMS = [("dinov2", "manual", True, "legacy"), ("dinov2", "sdpa", False, "legacy"), ("dinov2", "sdpa", True, "dynamo")]

# optimum-onnx exports from a local folder (their own venv: tools/optimum_venv.py), and
# `optimum-cli onnxruntime optimize` at -O1 … -O4
OPTIMUM_FORMS = ([(family, "random", True, "optimum") for family in ("bert", "roberta", "distilbert", "vit", "clip")]
                 + [(family, "random", True, f"optimum-O{level}") for family in ("bert", "vit") for level in range(1, 5)]
                 + [("clip", "random", True, "optimum-O2")])


def optimum_python() -> Path:
    """The optimum venv's python (tools/optimum_venv.py); skips the test, with the reason, where the
    package registry cannot be reached."""
    try:
        return optimum_venv.optimum_python()
    except optimum_venv.RegistryUnreachable as error:
        pytest.skip(str(error))


def cached_exports(folder: Path, make: Callable[[Path, str], Path]) -> Callable[[str], Path]:
    """get(key): `make(folder, key)` the first time a key is asked for, then the same path (a
    session fixture's exports, each made only when a test needs it)."""
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            cache[key] = make(folder, key)
        return cache[key]

    return get


def export_optimum(folder: Path, family: str, exporter: str) -> Path:
    optimum_python()  # the venv first, so that an unreachable registry skips the test
    return optimum_venv.export_optimum(folder, family, exporter)


def form_ids(forms: list[tuple]) -> list[str]:
    return [f"{f}-{a}-{'dynamic' if d else 'static'}-{e}" for f, a, d, e in forms]


FORM_IDS = form_ids(FORMS)


def export(model, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict | None,
           exporter: str) -> None:
    """Legacy exporter (opset 17); "legacy-fp16": that with fp16 weights; "ort-optimizer": that, then onnxruntime's transformers optimizer
    (com.microsoft Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization; "ort-mha":
    MultiHeadAttention instead of Attention); the dynamo
    exporter (its default opset; "dynamo23": opset 23, where scaled_dot_product_attention becomes
    the ONNX Attention op). Dynamo writes .onnx.data."""
    from torch_models import export_legacy

    torch_or_skip()
    if exporter.startswith("int8-"):  # legacy export, then its weights quantized (tests/quantize.py)
        import onnx
        from quantize import quantize_weights

        export_legacy(model, args, str(path), inputs, outputs, axes)
        onnx.save(quantize_weights(onnx.load(str(path)), exporter[len("int8-"):]), str(path))
        return
    if exporter.startswith("ort-session-"):  # legacy export, then onnxruntime's session optimizer
        export_legacy(model, args, str(path), inputs, outputs, axes)
        session_optimize(path, exporter.rsplit("-", 1)[1])
        return
    if exporter in ("legacy", "ort-optimizer", "ort-mha", "legacy-fp16"):
        export_legacy(model, args, str(path), inputs, outputs, axes)
        if exporter == "legacy-fp16":  # fp16 weights, fp32 inputs and outputs
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))
        if exporter.startswith("ort-"):
            from onnxruntime.transformers.fusion_options import FusionOptions
            from onnxruntime.transformers.optimizer import optimize_model

            options = FusionOptions("bert")
            options.use_multi_head_attention = exporter == "ort-mha"
            optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=32, opt_level=0,
                           optimization_options=options).save_model_to_file(str(path))
        return
    torch = torch_or_skip()
    model.eval()
    shapes = None
    if axes:
        dims = {name: torch.export.Dim(name, max=64) if name == "seq" else torch.export.Dim(name)
                for name in {n for spec in axes.values() for n in spec.values()}}
        shapes = tuple({axis: dims[name] for axis, name in axes[i].items()} for i in inputs)
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                          dynamic_shapes=shapes, opset_version=23 if exporter == "dynamo23" else None)


def session_optimize(path: Path, level: str) -> None:
    """Replace the model at `path` by the graph onnxruntime's session optimizer saves at `level`
    (basic, extended or all; "all" adds layout ops for this machine's CPU)."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3  # "all" warns that its layout is specific to this machine
    saved = path.with_name(path.stem + f"_{level}.onnx")
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    saved.replace(path)


def export_vit(path: Path, attention: str, dynamic: bool, exporter: str = "legacy", depth: int = 2,
               seed: int = 0) -> Path:
    torch = torch_or_skip()
    from torch_models import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=depth,
                              num_heads=4, fused_attn=attention == "sdpa")
    axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    export(model, (torch.randn(2, 3, 32, 32),), path, ["pixel_values"], ["logits"], axes, exporter)
    return path


def export_dinov2(path: Path, attention: str, dynamic: bool, exporter: str = "legacy", depth: int = 2) -> Path:
    """A DINOv2-shaped ViT: LayerNorms written out as arithmetic and LayerScale after each sub-block."""
    torch = torch_or_skip()
    from torch_models import DinoVisionTransformer

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=depth,
                                  num_heads=4, fused_attn=attention == "sdpa")
    axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    export(model, (torch.randn(2, 3, 32, 32),), path, ["pixel_values"], ["logits"], axes, exporter)
    return path


def export_bert(path: Path, attention: str, dynamic: bool, exporter: str = "legacy", seed: int = 0) -> Path:
    torch = torch_or_skip()
    from torch_models import HFEncoder, tiny_bert

    model = HFEncoder(tiny_bert(attention, layers=2, seed=seed), ("last_hidden_state", "pooler_output"))
    # trained BERTs have non-zero biases; give the random one some so that slicing them is tested
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = None
    if dynamic:
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}}
    export(model, (ids, mask), path, ["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"], axes,
           exporter)
    return path
