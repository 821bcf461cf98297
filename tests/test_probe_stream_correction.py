"""tools/probe_stream_correction.py's fits: a linear distortion of a stream that the fit is given
enough windows of is undone, and the ridge pulls a fit on few noisy windows towards the identity."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import probe_stream_correction as probe

WINDOWS, TOKENS, WIDTH = 16, 32, 8


def streams(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((WINDOWS, TOKENS, WIDTH)) * rng.uniform(0.5, 2.0, WIDTH)


def test_a_full_map_and_its_bias_are_recovered_from_clean_windows():
    pruned = streams()
    mixing = np.eye(WIDTH) + 0.2 * np.random.default_rng(1).standard_normal((WIDTH, WIDTH))
    shift = np.linspace(-1, 1, WIDTH)
    weight, bias, ridge, every = probe.fit_full(pruned, pruned @ mixing + shift)
    assert ridge == min(every)  # noiseless: the least ridge predicts held-out windows best
    np.testing.assert_allclose(weight, mixing, atol=1e-3)
    np.testing.assert_allclose(bias, shift, atol=1e-3)


def test_a_per_channel_scale_is_recovered_and_noise_keeps_it_near_one():
    pruned = streams()
    scale = np.linspace(0.8, 1.2, WIDTH)
    fitted, ridge = probe.fit_diagonal(pruned, pruned * scale)
    np.testing.assert_allclose(fitted, scale, rtol=1e-6)
    assert ridge == 0.0
    rng = np.random.default_rng(2)
    few = pruned[:, :1]  # one token a window, the target the stream itself under much noise: the true scale is 1
    target = few + 3 * rng.standard_normal(few.shape)
    free = probe.fit_diagonal(few, target, grid=(0.0,))[0]
    pulled, ridge = probe.fit_diagonal(few, target)
    assert ridge > 0.0
    assert np.abs(pulled - 1).max() < np.abs(free - 1).max()


def test_scores_of_the_original_itself_agree_everywhere():
    rng = np.random.default_rng(3)
    embedding = rng.standard_normal((20, WIDTH)).astype(np.float32)
    normed = streams()[:2]
    ids = rng.integers(0, 20, (2, TOKENS))
    picked, best = probe.next_token_scores(normed, embedding, ids)
    logits = normed[:, :-1] @ embedding.T
    assert best.tolist() == logits.argmax(-1).reshape(-1).tolist()
    want = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), ids[:, 1:, None], -1)
    np.testing.assert_allclose(picked, want.reshape(-1), rtol=1e-5)


def test_the_final_norm_is_found_by_its_place_before_the_logits():
    nodes = [helper.make_node("Pow", ["h", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rt"]),
             helper.make_node("Reciprocal", ["rt"], ["inv"]), helper.make_node("Mul", ["h", "inv"], ["scaled"]),
             helper.make_node("Mul", ["gamma", "scaled"], ["normed"]),
             helper.make_node("MatMul", ["normed", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])])
    assert probe.final_tensors(helper.make_model(graph)) == ("h", "normed")


def test_rms_norm_matches_its_definition():
    stream = streams()[0]
    gamma = np.linspace(0.5, 1.5, WIDTH)
    want = stream / np.sqrt((stream ** 2).mean(-1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(probe.rms_norm(stream, gamma), want, rtol=1e-12)
    assert pytest.approx(float(np.sqrt((probe.rms_norm(stream, np.ones(WIDTH)) ** 2).mean(-1)).mean()), rel=1e-3) == 1.0


def test_the_linear_bound_takes_back_a_linear_error_and_not_noise():
    rng = np.random.default_rng(4)
    original = streams()
    distorted = original @ (np.eye(WIDTH) + 0.1 * rng.standard_normal((WIDTH, WIDTH)))
    bound = probe.linear_bound(distorted[:12], original[:12], distorted[12:], original[12:], grid=(1e-4,))[1e-4]
    assert bound[0] > 0.01 and bound[1] < 1e-4 * bound[0] and bound[3] < 1e-3 * bound[2]
    noisy = original + 0.3 * rng.standard_normal(original.shape)
    before, after, held_before, held_after = probe.linear_bound(noisy[:12], original[:12], noisy[12:],
                                                                original[12:], grid=(1e-4,))[1e-4]
    assert after < before and held_after > 0.5 * held_before  # noise: a map fits little of it
