"""--workers: the reconstruction's batches on Ray worker processes give the one-process model, bit
for bit, because every statistic comes back in a form whose merge is exact (batches.py)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT, feed_for
from onnxsnp import SnpError, prune
from onnxsnp.compensate.batches import Workers, owner
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.compensate.least_squares import FOLDS
from onnxsnp.match import find_blocks
from onnxsnp.options import make_options
from onnxsnp.pipeline import RECONSTRUCTION_BATCH
from onnxsnp.compensate.reconstruction import Reconstructor

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"

pytestmark = pytest.mark.slow


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_identical(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_up_to_four_workers_hold_whole_folds():
    for count in range(1, FOLDS + 1):
        for index in range(3 * FOLDS):
            assert owner(index, count, 4 * FOLDS) == owner(index + FOLDS, count, 4 * FOLDS)  # a fold on one worker
        assert {owner(index, count, 4 * FOLDS) for index in range(FOLDS)} == set(range(count))  # every worker holds some


@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"target_flops": 0.5}])
def test_two_workers_write_the_one_process_model(budget):
    pytest.importorskip("ray")
    alone, report = prune(str(DIGITS), **budget, calib=str(DIGITS_CALIB))
    spread, spread_report = prune(str(DIGITS), **budget, calib=str(DIGITS_CALIB), workers=2)
    _assert_identical(alone, spread)
    assert spread_report.reconstruction["samples"] == report.reconstruction["samples"]
    assert spread_report.reconstruction["tokens"] == report.reconstruction["tokens"]


def test_six_workers_split_folds_and_write_the_one_process_model():
    """More workers than folds (7 batches on 6 workers: folds 1 and 2 split, their second batches
    sent back alone); 30–41 s more on this 2-core machine at a load of 10–17, most of it Ray
    starting six workers and the two prunes."""
    pytest.importorskip("ray")
    from test_worker_runs import more_batches

    feed = more_batches()
    alone, report = prune(str(DIGITS), ratio=0.5, calib=feed)
    spread, spread_report = prune(str(DIGITS), ratio=0.5, calib=feed, workers=6)
    _assert_identical(alone, spread)
    assert spread_report.reconstruction["samples"] == report.reconstruction["samples"]


def test_padded_text_on_two_workers_is_the_one_process_model(exported):
    """Token masks, and shapes of the stream read back by Shape nodes, on workers."""
    pytest.importorskip("ray")
    path = exported("bert", "eager", True)
    feed = feed_for(path, batch=96, seq=8)
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 9, 96)
    feed["attention_mask"] = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    alone, _ = prune(str(path), ratio=0.5, calib=feed)
    spread, _ = prune(str(path), ratio=0.5, calib=feed, workers=2)
    _assert_identical(alone, spread)


def test_each_worker_holds_its_own_batches():
    ray = pytest.importorskip("ray")
    g = ModelGraph(onnx.load(str(DIGITS)))
    reconstructor = Reconstructor(g, find_blocks(g))
    feed = dict(np.load(DIGITS_CALIB))
    shards = reconstructor.prepare(feed, RECONSTRUCTION_BATCH, None, Workers(2))
    try:
        held = shards._all("counts")
        batches = -(-len(feed["pixel_values"]) // RECONSTRUCTION_BATCH)
        expected = [sum(min(RECONSTRUCTION_BATCH, len(feed["pixel_values"]) - i * RECONSTRUCTION_BATCH)
                        for i in range(batches) if owner(i, 2, batches) == rank) for rank in range(2)]
        assert [samples for samples, _ in held] == expected and min(expected) > 0
    finally:
        shards.close()
    assert not ray.is_initialized()  # the Ray instance started for the run is gone with it


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_worker_counts_out_of_range_are_refused(value):
    with pytest.raises(SnpError, match="--workers"):
        make_options(0.5, workers=value)


def test_without_ray_the_cli_says_how_to_get_it(tmp_path):
    script = ("import sys; sys.modules['ray'] = None\n"  # an import of ray now fails as if not installed
              "from onnxsnp.cli import main\n"
              f"sys.exit(main([{str(DIGITS)!r}, {str(tmp_path / 'out.onnx')!r}, '--calib', {str(DIGITS_CALIB)!r}, "
              "'--workers', '2', '-q']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["onnxsnp: error: --workers and --ray-address need Ray: "
                                                "pip install 'onnxsnp[ray]'"]
    assert not (tmp_path / "out.onnx").exists()


def test_the_workers_protobuf_is_the_model_without_its_weights():
    """A worker's protobuf (worker_graph.weightless) keeps every initializer below HELD_MIN_BYTES
    whole and the rest as stubs of their declared size (the weights travel per half-block, as
    arrays: no 2 GB protobuf limit); the model's nodes, inputs and outputs are unchanged."""
    from onnxsnp.compensate.worker_graph import HELD_MIN_BYTES, weightless
    from onnxsnp.ir.sizes import raw_bytes

    model = onnx.load(str(DIGITS))
    light, held = weightless(model)
    stubs = onnx.load_from_string(light)
    assert [t.name for t in stubs.graph.initializer] == [t.name for t in model.graph.initializer]
    for tensor, stub in zip(model.graph.initializer, stubs.graph.initializer):
        if raw_bytes(tensor) >= HELD_MIN_BYTES:
            assert tensor.name in held and not stub.HasField("raw_data") and raw_bytes(stub) == raw_bytes(tensor)
            assert list(stub.dims) == list(tensor.dims) and stub.data_type == tensor.data_type
        else:
            assert tensor.name not in held and stub.SerializeToString() == tensor.SerializeToString()
    assert held and stubs.graph.node == model.graph.node
    assert len(light) < model.ByteSize() - sum(raw_bytes(t) for t in model.graph.initializer if t.name in held) + 4096
