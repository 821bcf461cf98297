"""tools/oracle_split.py (the bench's `--oracle choose-*` diagnosis): a prune forced to keep what
another prune recorded fits only the rescales and refits on its own data — on the same data it
is the plain prune byte for byte; on other data it keeps the recorded units and refits them
there."""
from __future__ import annotations

import numpy as np
import pytest

from decoders import calibration
from oracle_split import Choices, forcing, recording
from onnxsnp.options import make_options
from onnxsnp.pipeline import prune_model

pytestmark = pytest.mark.slow  # a torch export


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from decoder_export import export_dynamo, tiny_llama

    return export_dynamo(tiny_llama(), tmp_path_factory.mktemp("split") / "llama.onnx")


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _same(a, b) -> bool:
    x, y = _initializers(a), _initializers(b)
    return x.keys() == y.keys() and all(x[n].shape == y[n].shape and np.array_equal(x[n], y[n]) for n in x)


def test_forced_on_the_same_data_is_the_plain_prune_and_on_other_data_keeps_the_recorded_units(model):
    options = make_options(ratio=0.5, measure_latency=False)
    first, second = calibration(100, 32, 12, seed=5), calibration(100, 32, 12, seed=9)
    plain = prune_model(str(model), options, calib=first).model
    chosen = Choices()
    with recording(chosen):
        recorded = prune_model(str(model), options, calib=first).model
    layers = len([n for n in chosen.hidden])
    assert layers > 0 and len(chosen.pairs) == len(chosen.values) == layers  # every block's three choices
    assert _same(plain, recorded)  # recording changes nothing
    with forcing(chosen):
        again = prune_model(str(model), options, calib=first).model
    assert _same(plain, again)  # every choice carried: the rest is fitted as the plain prune fits it

    other = Choices()
    with recording(other):
        own = prune_model(str(model), options, calib=second).model
    assert any(not np.array_equal(chosen.hidden[n], other.hidden[n]) for n in chosen.hidden)  # the data choose otherwise
    with forcing(chosen):
        forced = prune_model(str(model), options, calib=second).model
    shapes = {n: v.shape for n, v in _initializers(forced).items()}
    assert shapes == {n: v.shape for n, v in _initializers(own).items()}  # the same widths
    assert not _same(forced, own) and not _same(forced, plain)  # first's units, second's refits
    # V, gate and up are only sliced, never refitted: the forced prune's are the first prune's
    # wherever the second data chose otherwise; the refits (Q/K rescale, o_proj, down) are its own
    mine, theirs, before = _initializers(forced), _initializers(plain), _initializers(own)
    sliced = [n for n in mine if np.array_equal(mine[n], theirs[n]) and not np.array_equal(mine[n], before[n])]
    assert len(sliced) >= layers
