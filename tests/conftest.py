"""Shared helpers: running a model on a feed, and the `exported` fixture — tiny transformers
exported with torch at test time (tests/exports.py).

Two tiers: `pytest -m "not slow"` runs the tests on hand-built graphs and the shipped model
without importing torch; `slow` holds the export matrix and whatever else takes seconds. Every
test that asks for `exported` or `torch` is marked slow here, so no export can slip into the
fast tier; modules that need torch when imported are marked slow themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(items):
    # a test that exports, or builds a model in torch, is slow by what it asks for
    for item in items:
        if {"exported", "torch"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_costs():
    """The shipped digits ViT: (its graph, its blocks, its cost model measured on one calibration
    sample), for the allocation tests."""
    import onnx

    from onnxsnp.data.calibration import Runner
    from onnxsnp.ir.graph import ModelGraph
    from onnxsnp.ir.stats import count_params, macs_from_shapes, shape_tensors
    from onnxsnp.match import find_blocks
    from onnxsnp.score.costs import CostModel

    g = ModelGraph(onnx.load(str(ROOT / "models" / "digits_vit.onnx")))
    matches = find_blocks(g)
    names = shape_tensors(g.model)
    feed = {"pixel_values": np.load(ROOT / "models" / "digits_vit_calib.npz")["pixel_values"][:1]}
    (_, values), = list(Runner(g.model, names).batches(feed, names, 1))
    costs = CostModel(g, matches, macs_from_shapes(g.model, {n: values[n].shape for n in names}, 1),
                      count_params(g.model))
    return g, matches, costs


@pytest.fixture(scope="session")
def torch():
    """torch itself, for tests that build or run a model in it; skipped where it is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Lazily exported models keyed by (family, attention, dynamic)."""
    folder = tmp_path_factory.mktemp("models")
    cache: dict[tuple, Path] = {}

    def get(family: str, attention: str, dynamic: bool, exporter: str = "legacy") -> Path:
        from exports import export_bert, export_dinov2, export_optimum, export_vit

        key = (family, attention, dynamic, exporter)
        if key not in cache and exporter.startswith("optimum"):
            cache[key] = export_optimum(folder / f"{family}_{exporter}", family, exporter)
        if key not in cache:
            path = folder / f"{family}_{attention}_{'dyn' if dynamic else 'static'}_{exporter}.onnx"
            make = {"vit": export_vit, "bert": export_bert, "dinov2": export_dinov2}[family]
            cache[key] = make(path, attention, dynamic, exporter)
        return cache[key]

    return get


def feed_for(path: Path, batch: int, seq: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    import onnx

    rng = np.random.default_rng(seed)
    model = onnx.load(str(path), load_external_data=False)
    feed = {}
    for info in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        if info.name == "pixel_values":  # optimum exports leave channels and size dynamic: 3 × 32 × 32
            shape = [d or default for d, default in zip(dims[1:], (3, 32, 32))]
            feed[info.name] = rng.standard_normal((batch, *shape)).astype(np.float32)
        elif info.name == "input_ids":
            feed[info.name] = rng.integers(0, 100, (batch, dims[1] or seq)).astype(np.int64)
        else:
            feed[info.name] = np.ones((batch, dims[1] or seq), dtype=np.int64)
    return feed


def run(model, feed: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """The model's outputs on `feed`; `optimize=False` runs the graph as written (onnxruntime's
    extended optimizer fails on some test-made copies of its own output: see oracle.unshare)."""
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)  # a path keeps .data
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)
