"""Shared fixtures: tiny transformers exported with torch at test time."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

torch = pytest.importorskip("torch")

VIT_FORMS = [("manual", False), ("manual", True), ("sdpa", False), ("sdpa", True)]
BERT_FORMS = [("eager", False), ("eager", True), ("sdpa", False), ("sdpa", True)]


def export_vit(path: Path, attention: str, dynamic: bool, depth: int = 2, seed: int = 0) -> Path:
    from torch_models import VisionTransformer, export_legacy

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=depth,
                              num_heads=4, fused_attn=attention == "sdpa")
    axes = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    export_legacy(model, (torch.randn(2, 3, 32, 32),), str(path), ["pixel_values"], ["logits"], axes)
    return path


def export_bert(path: Path, attention: str, dynamic: bool, seed: int = 0) -> Path:
    from torch_models import HFEncoder, export_legacy, tiny_bert

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
    export_legacy(model, (ids, mask), str(path), ["input_ids", "attention_mask"],
                  ["last_hidden_state", "pooler_output"], axes)
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Lazily exported models keyed by (family, attention, dynamic)."""
    folder = tmp_path_factory.mktemp("models")
    cache: dict[tuple, Path] = {}

    def get(family: str, attention: str, dynamic: bool) -> Path:
        key = (family, attention, dynamic)
        if key not in cache:
            path = folder / f"{family}_{attention}_{'dyn' if dynamic else 'static'}.onnx"
            cache[key] = (export_vit if family == "vit" else export_bert)(path, attention, dynamic)
        return cache[key]

    return get


def feed_for(path: Path, batch: int, seq: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    import onnx

    rng = np.random.default_rng(seed)
    model = onnx.load(str(path), load_external_data=False)
    feed = {}
    for info in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        if info.name == "pixel_values":
            feed[info.name] = rng.standard_normal((batch, *dims[1:])).astype(np.float32)
        elif info.name == "input_ids":
            feed[info.name] = rng.integers(0, 100, (batch, dims[1] or seq)).astype(np.int64)
        else:
            feed[info.name] = np.ones((batch, dims[1] or seq), dtype=np.int64)
    return feed


def run(model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)
