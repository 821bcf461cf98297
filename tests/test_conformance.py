"""Conformance (fast): every hand-built attention form of tests/forms.py matched, pruned with a
small plan, and the result a valid model that onnxruntime runs and that equals the original with
the removed units masked out (tests/oracle.py, placed without the rewrite's dependency groups)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from forms import EXPORT_ONLY, FORMS
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import AttentionForm
from onnxsnp.pipeline import make_plan
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original


def outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def declared(model: onnx.ModelProto, run: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with each output the fixtures declare without a shape given its rank from `run` (each
    dim symbolic): onnx.checker requires a shape on graph outputs; the builders leave them open."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for output in copy.graph.output:
        if not output.type.tensor_type.HasField("shape"):
            for axis in range(run[output.name].ndim):
                output.type.tensor_type.shape.dim.add().dim_param = f"{output.name}_{axis}"
    return copy


def weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_every_attention_form_has_a_conformance_entry():
    """A new AttentionForm fails here until tests/forms.py has a graph of it (or says why not)."""
    covered = {f.form for f in FORMS.values()}
    assert set(AttentionForm) - covered - set(EXPORT_ONLY) == set()
    assert not covered & set(EXPORT_ONLY)  # an entry made an exception stale


@pytest.mark.parametrize("name", FORMS)
def test_pruned_form_is_valid_and_equals_the_masked_original(name):
    form = FORMS[name]
    g = ModelGraph(form.build())
    matches = find_blocks(g)
    (block,) = matches.attention
    assert block.form is form.form
    calib, batch = form.calibration(g.model)
    plan = make_plan(g, matches, form.ratios, "random", calib, batch=batch, seed=3)
    (keep,) = plan.attention
    assert keep.v.shape[1] < block.head_dim  # the plan cuts V in every form
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    assert weights(pruned) < weights(g.model)
    got, want = outputs(pruned, form.feed(pruned)), outputs(zeroed, form.feed(zeroed))
    onnx.checker.check_model(declared(pruned, got), full_check=True)
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
