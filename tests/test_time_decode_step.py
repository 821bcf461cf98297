"""tools/time_decode_step.py's prompt: an empty cache in each model's own shape, the head size
onnxruntime-genai leaves symbolic read from its config (issue 28's landing check)."""
from __future__ import annotations

import json
import types

import pytest

import time_decode_step as tool

KV_HEADS, HEAD_SIZE, TOKENS, VOCAB = 3, 64, 16, 100


def fake_session(head_dim):
    inputs = [types.SimpleNamespace(name="input_ids", shape=["batch", "sequence"], type="tensor(int64)"),
              types.SimpleNamespace(name="attention_mask", shape=["batch", "total"], type="tensor(int64)"),
              types.SimpleNamespace(name="past_key_values.0.key", shape=["batch", KV_HEADS, "past", head_dim],
                                    type="tensor(float)")]
    return types.SimpleNamespace(get_inputs=lambda: inputs)


def test_a_symbolic_head_size_comes_from_the_genai_config(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": HEAD_SIZE}}}))
    size = tool.head_size(tmp_path / "model.onnx")
    feed = tool.prompt_feed(fake_session("kv_cache_dim"), TOKENS, VOCAB, size)
    assert size == HEAD_SIZE and feed["past_key_values.0.key"].shape == (1, KV_HEADS, 0, HEAD_SIZE)
    assert feed["input_ids"].shape == feed["attention_mask"].shape == (1, TOKENS)
    assert feed["input_ids"].min() >= 3 and feed["input_ids"].max() < VOCAB


def test_a_declared_head_size_is_kept_and_a_missing_one_is_a_one_line_exit(tmp_path):
    pruned = HEAD_SIZE * 3 // 4  # a pruned folder declares its own
    assert tool.prompt_feed(fake_session(pruned), TOKENS, VOCAB, None)["past_key_values.0.key"].shape[3] == pruned
    assert tool.head_size(tmp_path / "model.onnx") is None
    with pytest.raises(SystemExit, match="head size"):
        tool.prompt_feed(fake_session("kv_cache_dim"), TOKENS, VOCAB, None)
