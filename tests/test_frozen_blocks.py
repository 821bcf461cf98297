"""What the match stage finds are values: frozen, hashable dataclasses built once, so that later
stages key their dicts by the block itself. A dict keyed by id() is only as good as the one
object the id was taken of: a block rebuilt with dataclasses.replace (as attention.assemble
builds one) would silently miss its entry, and a freed object's id can be handed to another."""
from __future__ import annotations

import ast
import dataclasses
import inspect

import onnx
import pytest

import decoder_graphs as dg
import graphs
from conftest import ROOT
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import AttentionForm, Placement, blocks, find_blocks
from onnxsnp.match.attention import AttentionCore
from onnxsnp.match.blocks import Candidate, Part
from onnxsnp.match.residual import ResidualStream, find_stream

BLOCK_TYPES = [cls for _, cls in inspect.getmembers(blocks, inspect.isclass)
               if dataclasses.is_dataclass(cls) and cls.__module__ == blocks.__name__] + [ResidualStream, AttentionCore]
MODELS = {"shipped": lambda: onnx.load(str(ROOT / "models" / "digits_vit.onnx")),
          "fused-qkv": lambda: graphs.fused_qkv("Split"), "ort-attention": graphs.ort_attention,
          "decoder": dg.decoder_attention, "gqa": dg.group_query_attention}


def test_every_block_type_is_a_frozen_dataclass():
    names = {cls.__name__ for cls in BLOCK_TYPES}
    assert {"AttentionBlock", "FfnBlock", "Layer", "Linear", "Matches", "Skipped", "ResidualStream", "AttentionCore"} <= names
    for cls in BLOCK_TYPES:
        params = cls.__dataclass_params__
        assert params.frozen and params.eq, f"{cls.__name__} must be a frozen dataclass compared by value"


def _found(model: onnx.ModelProto) -> list:
    """Every dataclass value reachable from what the match stage finds in `model`."""
    g = ModelGraph(model)
    matches = find_blocks(g)
    values, stack = [], [matches]
    if matches.layers:
        stack.append(find_stream(g, matches))
    while stack:
        value = stack.pop()
        if dataclasses.is_dataclass(value):
            values.append(value)
            stack += [getattr(value, f.name) for f in dataclasses.fields(value)]
        elif isinstance(value, (tuple, frozenset)):
            stack += list(value)
    return values


@pytest.mark.parametrize("model", MODELS)
def test_found_blocks_refuse_assignment_and_key_dicts_by_value(model):
    found = _found(MODELS[model]())
    kinds = {type(v).__name__ for v in found}
    assert {"Matches", "AttentionBlock", "Linear"} <= kinds
    for value in found:
        for field in dataclasses.fields(value):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(value, field.name, getattr(value, field.name))
        if isinstance(value, (blocks.AttentionBlock, blocks.FfnBlock, blocks.Layer, ResidualStream)):
            rebuilt = dataclasses.replace(value)  # a copy, as a later stage may make: the same key
            assert rebuilt is not value and {value: 1}[rebuilt] == 1


@pytest.mark.parametrize("model", MODELS)
def test_what_a_match_branches_on_is_an_enum(model):
    """Forms, norm placements, cache parts and skipped candidates: members, never bare strings."""
    matches = find_blocks(ModelGraph(MODELS[model]()))
    assert matches.attention and all(isinstance(b.form, AttentionForm) for b in matches.attention)
    assert all(isinstance(layer.norm, Placement) for layer in matches.layers)
    assert all(isinstance(c.part, Part) for b in matches.attention for c in b.kv_caches)
    assert all(isinstance(s.kind, Candidate) for s in matches.skipped)


def test_a_model_matched_twice_gives_equal_blocks():
    """Values, not identities: two matches of one model are equal and hash alike, block by block."""
    model = onnx.load(str(ROOT / "models" / "digits_vit.onnx"))
    first, second = find_blocks(ModelGraph(model)), find_blocks(ModelGraph(model))
    assert first == second and first.layers and first is not second
    assert {layer: layer.name for layer in first.layers} == {layer: layer.name for layer in second.layers}


def _calls(tree: ast.AST, test) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and test(node.func)]


def test_no_identity_keys_or_forced_assignment_in_the_package():
    """A source scan: no id() call (key by the value, or by a name or position where the object is
    an unhashable protobuf message) and no object.__setattr__ (which would write through `frozen`)."""
    found = {}
    for path in sorted((ROOT / "onnxsnp").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lines = _calls(tree, lambda f: isinstance(f, ast.Name) and f.id == "id") + _calls(
            tree, lambda f: isinstance(f, ast.Attribute) and f.attr == "__setattr__")
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert found == {}
