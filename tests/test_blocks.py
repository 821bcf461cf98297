"""Whole transformer blocks: removing one equals the torch model without it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from exports import FORM_IDS, FORMS, export_bert, export_dinov2, export_vit
from onnxsnp import SnpError, prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import Placement, find_blocks


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_every_form_exposes_its_transformer_blocks(exported, family, attention, dynamic, exporter):
    matches = find_blocks(ModelGraph(onnx.load(str(exported(family, attention, dynamic, exporter)))))
    assert len(matches.layers) == 2
    assert {layer.norm for layer in matches.layers} == {Placement.PRE if family == "vit" else Placement.POST}


@pytest.mark.parametrize("family", ["vit", "dinov2"])  # dinov2: written-out LayerNorms, LayerScale
@pytest.mark.parametrize("removed", [0, 1])
def test_removing_a_vit_block_equals_torch_without_it(tmp_path, torch, family, removed):
    from torch_models import DinoVisionTransformer, VisionTransformer

    path = (export_vit if family == "vit" else export_dinov2)(tmp_path / "vit.onnx", "manual", True)
    pruned, report = prune(str(path), ratio=0.0, blocks=f"{removed},", calib_samples=8)
    assert len(report.removed_blocks) == 1
    torch.manual_seed(0)  # the same weights the export made
    model = (VisionTransformer if family == "vit" else DinoVisionTransformer)(
        img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=4).eval()
    model.blocks[removed] = torch.nn.Identity()
    feed = feed_for(path, batch=3)
    with torch.no_grad():
        want = model(torch.from_numpy(feed["pixel_values"])).numpy()
    np.testing.assert_allclose(run(pruned, feed)[0], want, atol=1e-4)


def test_removing_a_bert_layer_equals_torch_without_it(tmp_path, torch):
    from torch_models import HFEncoder

    path = export_bert(tmp_path / "bert.onnx", "eager", True)
    pruned, _ = prune(str(path), ratio=0.0, blocks="0,", calib_samples=8)
    model = HFEncoder(__import__("torch_models").tiny_bert("eager", layers=2, seed=0),
                      ("last_hidden_state", "pooler_output"))
    with torch.no_grad():  # the same bias values export_bert set
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    del model.model.encoder.layer[0]
    model.eval()
    feed = feed_for(path, batch=2, seq=6)
    with torch.no_grad():
        want = model(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    for got, expected in zip(run(pruned, feed), want):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_blocks_are_chosen_by_calibration_and_combine_with_neurons(exported):
    pruned, report = prune(str(exported("bert", "eager", True, "ort-optimizer")), ratio=0.5, heads=0.5, blocks=1,
                           calib_samples=8)
    assert len(report.removed_blocks) == 1
    kept = [b for b in report.blocks if b.kind == "attention"]
    assert len(kept) == 1 and kept[0].heads_after == 2 and kept[0].qk_dim_after == 4


@pytest.mark.parametrize("spec", [2, "2,", "-1", "x", "0,0,1", 1.5])
def test_bad_block_requests_fail_cleanly(exported, spec):
    with pytest.raises(SnpError, match="blocks"):
        prune(str(exported("vit", "manual", True)), ratio=0.0, blocks=spec, calib_samples=8)
