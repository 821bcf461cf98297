"""Decoder language models exported at test time from local folders with random weights: optimum
`text-generation-with-past` of a Llama-architecture model (grouped-query attention, rotary,
SwiGLU, RMSNorm) and of GPT-2 (fused c_attn, learned positions), and torch's dynamo exporter of
the Llama model (and of a Phi-3 one: fused qkv and gate_up projections; Phi-4-mini's shape: that
with a partial rotary embedding) with a KV cache, also converted to fp16 by onnxruntime's converter (with float32
inputs and outputs, the cache cast on its way in and out, or all in fp16), and at opset 23 ("dynamo23": ONNX's
RotaryEmbedding, Attention and RMSNormalization ops, also on Qwen3 with its QK-norm). Ratio 0 is identical; a pruned prefill and a decode step through
the pruned cache equal the original with the removed units zeroed; the default flow (block by
block reconstruction) prunes them."""
from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from exports import cached_exports, export_optimum
from decoders import calibration, genai_generate, greedy, prefill_and_step, run, step_feed
from onnxsnp import prune
from onnxsnp.cli import main
from onnxsnp.data.calibration import input_specs, validate_calibration
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.ir.nbits import float_view
from onnxsnp.report.inspection import inspect_model
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, unshare

pytestmark = pytest.mark.slow
FORMS = ["llama-optimum", "gpt2-optimum", "llama-dynamo", "llama-dynamo23", "llama-dynamo-fp16", "llama-dynamo-fp16io",
         "phi3-dynamo", "phi4mini-dynamo", "mistral-dynamo", "llama-genai-fp32", "llama-genai-int4"]
GROUPS = {"gpt2-optimum": 4}  # key/value heads per layer (2 in the Llama models)
WINDOWS = {"mistral-dynamo": 4}  # sliding windows: shorter than the tests' prompts, so the cache's slices act


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    def make(folder, form: str):
        family, exporter = form.split("-", 1)
        from decoder_export import export_dynamo, export_genai, save_folder, tiny_llama, tiny_mistral, tiny_phi3, tiny_qwen3

        if exporter == "optimum":
            return export_optimum(folder / form, family, "optimum")
        if exporter in ("dynamo", "dynamo23"):
            model = tiny_phi3() if family == "phi3" else tiny_phi3(hidden=64, rotary=0.75) if family == "phi4mini" \
                else tiny_mistral(window=WINDOWS[form]) if family == "mistral" else tiny_qwen3() if family == "qwen3" \
                else tiny_llama()
            return export_dynamo(model, folder / f"{form}.onnx", opset=23 if exporter == "dynamo23" else None)
        if exporter.startswith("dynamo-fp16"):  # keep_io_types: float32 inputs and outputs, fp16 inside
            from onnxruntime.transformers.float16 import convert_float_to_float16

            path = folder / f"{form}.onnx"
            onnx.save(convert_float_to_float16(onnx.load(str(get("llama-dynamo"))),
                                               keep_io_types=not exporter.endswith("io")), str(path))
            return path
        # onnxruntime-genai's builder: head size 32, so that 16 (its kernels' multiple) can be kept
        source = folder / "genai-source"
        if not source.exists():
            save_folder(tiny_llama(vocab=300, hidden=128), source)
        return export_genai(source, folder / form, exporter.split("-")[1]) / "model.onnx"

    get = cached_exports(tmp_path_factory.mktemp("decoders"), make)
    return get


@pytest.mark.parametrize("form", FORMS)
def test_decoder_blocks_are_found(decoder, form):
    matches = inspect_model(decoder(form)).matches  # MatMulNBits read as float, a final norm's sum exposed
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2), matches.skipped
    for block in matches.attention:
        assert block.groups == GROUPS.get(form, 2) and len(block.kv_caches) == 2
        assert len(block.rotary) == (0 if form.startswith("gpt2") else 1 if "genai" in form else 2)
    assert all((ffn.gate is not None) == (not form.startswith("gpt2")) for ffn in matches.ffn)
    if form.startswith("phi"):  # one qkv_proj and one gate_up_proj a layer, taken apart along their features
        assert all(b.q.node == b.k.node == b.v.node for b in matches.attention)
        assert all(f.gate.node == f.fc1.node for f in matches.ffn)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_pruned_decoder_equals_masked_original_through_the_cache(decoder, tmp_path, form, heads):
    path = unshare(decoder(form), tmp_path)
    view = float_view(onnx.load(str(path)))  # int4: the oracle compares float models
    g = ModelGraph(view.model if view is not None else onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")  # caches empty, positions 0…
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=heads), "random", feed, batch=2, seed=3)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    rng = np.random.default_rng(0)
    ids, next_ids = rng.integers(0, 100, (2, 6)), rng.integers(0, 100, (2, 1))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids, next_ids), prefill_and_step(pruned, ids, next_ids)
    # fp16: each op's output is rounded to fp16 after float32 arithmetic, and a sum over fewer (the
    # removed, not zeroed) terms may round the other way: a few of fp16's steps at the logits' size
    scale = 8 * np.finfo(np.float16).eps * np.abs(want["logits"]).max() if "fp16" in form else 2e-5
    np.testing.assert_allclose(got["logits"], want["logits"], atol=scale, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=scale, rtol=1e-3)
    keep = plan.attention[0]
    if keep.block.equal_widths:  # GroupQueryAttention: one head size, a multiple of 16 with rotary
        assert keep.qk.shape[1] == keep.v.shape[1] == 16
    kept = min(6, WINDOWS.get(form, 7) - 1)  # a sliding-window cache keeps the last window − 1 positions
    assert got["present.0.key"].shape == (2, len(keep.heads), kept, keep.qk.shape[1])
    assert got["present.0.value"].shape == (2, len(keep.heads), kept, keep.v.shape[1])


@pytest.mark.parametrize("form", ["llama-dynamo", "llama-dynamo23", "llama-optimum", "gpt2-optimum"])
def test_the_timed_decode_step_is_the_last_position_of_the_prefill(decoder, form):
    from onnxsnp.data.calibration import session
    from onnxsnp.data.timing import decode_feed

    model = onnx.load(str(decoder(form)))
    ids = np.random.default_rng(2).integers(3, 100, (2, 9))
    sess = session(model, threads=1)
    feed = validate_calibration({"input_ids": ids[:, :8], "attention_mask": np.ones((2, 8), np.int64)},
                                input_specs(ModelGraph(model)), "test")
    step = decode_feed(sess, feed)  # the first sample's last token through the cache of the 7 before it
    assert step["input_ids"].tolist() == [[ids[0, 7]]]
    want = sess.run(["logits"], step_feed(model, ids[:1, :8]))[0][:, -1]
    np.testing.assert_allclose(sess.run(["logits"], step)[0][:, -1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_ratio_zero_is_identical_and_half_prunes(decoder, form):
    path = decoder(form)
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    original = onnx.load(str(path))
    unchanged, report = prune(str(path), ratio=0.0, calib=calibration(100))
    np.testing.assert_allclose(prefill_and_step(unchanged, ids, ids[:, :1])[1]["logits"],
                               prefill_and_step(original, ids, ids[:, :1])[1]["logits"], atol=1e-5)
    assert report.params_after == report.params_before
    # a language model's fidelity line: perplexity on the held-back samples, unchanged by nothing pruned
    assert report.fidelity.perplexity_ratio == pytest.approx(1.0, abs=1e-4)
    assert report.fidelity.next_token_agreement == 1.0 and report.fidelity.tokens > 0
    assert "perplexity" in report.table()
    pruned, report = prune(str(path), ratio=0.5, calib=calibration(100))
    assert report.reconstruction is not None  # the default: block by block, on the decoder
    assert report.flops_after < 0.75 * report.flops_before
    assert report.fidelity.output_cosine > 0.5
    assert report.decode_ms_before > 0 and report.decode_ms_after > 0 and "decode step" in report.table()
    prefill_and_step(pruned, ids, ids[:, :1])  # runs with its own, narrower cache
    assert step_feed(pruned, ids)["past_key_values.0.key"].shape[3] < step_feed(original, ids)["past_key_values.0.key"].shape[3]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_folder_in_gives_a_folder_out_that_onnxruntime_genai_generates_from(decoder, tmp_path, precision):
    pytest.importorskip("onnxruntime_genai")
    folder = decoder(f"llama-genai-{precision}").parent
    texts = tmp_path / "texts.txt"  # tokenized with the folder's own tokenizer.json
    texts.write_text("\n".join(line for line in Path(inspect.__file__).read_text().splitlines() if len(line) > 20))
    same, pruned, report = tmp_path / "same", tmp_path / "pruned", tmp_path / "report.json"
    assert main([str(folder), str(same), "--ratio", "0", "--calib-text", str(texts), "--calib-samples", "24", "-q"]) == 0
    assert main([str(folder), str(pruned), "--ratio", "0.5", "--heads", "0.5", "--calib-text", str(texts),
                 "--calib-samples", "24", "-q", "--report", str(report)]) == 0
    config = json.loads((pruned / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["head_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (16, 2, 1)
    assert sorted(p.name for p in pruned.iterdir()) == sorted(p.name for p in folder.iterdir())
    data = json.loads(report.read_text())
    assert data["notes"] and "one head size" in data["notes"][0]
    assert "24 windows of 128 tokens" in data["calibration"]  # a language model reads running text
    # the decode step is timed within the 128 positions the tiny model's rotary caches hold
    assert data["decode_ms_before"] > 0 and data["decode_ms_after"] > 0
    assert bool(data["requantized"]) == (precision == "int4")
    # the refitted output projections and fc2s: quantized with error feedback on their calibration inputs
    refitted = {n.name for n in onnx.load(str(pruned / "model.onnx"), load_external_data=False).graph.node
                if n.op_type == "MatMulNBits" and ("o_proj" in n.name or "down_proj" in n.name)}
    assert set(data["requantized_feedback"] or ()) == (refitted if precision == "int4" else set())
    prompt = [5, 17, 42, 7]
    assert genai_generate(same, prompt, 16) == genai_generate(folder, prompt, 16)  # ratio 0: the same tokens
    tokens = genai_generate(pruned, prompt, 16)
    assert len(tokens) == 16
    assert tokens == greedy(onnx.load(str(pruned / "model.onnx")), prompt, 12)  # what the pruned file computes
    # every layer reads its kept pairs' columns from the one rotary cache pair the folder had
    caches = lambda path: {i.name for i in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.initializer  # noqa: E731
                           if "cos_cache" in i.name or "sin_cache" in i.name}
    assert caches(pruned) == caches(folder) == {"cos_cache", "sin_cache"}


@pytest.mark.parametrize("form", ["llama-dynamo", "llama-optimum"])
def test_a_flops_budget_on_a_decoder_is_allocated_by_measured_loss(decoder, form):
    """Grouped-query, rotary attention under --target-flops: the measured allocation (curves in the
    reconstruction's own units: key/value groups, whole rotary pairs) and the reconstruction run,
    and the budget is met as the cost model predicted it."""
    goal = 0.7
    pruned, report = prune(str(decoder(form)), target_flops=goal, calib=calibration(100, 32, 12), measure_latency=False)
    assert report.reconstruction is not None and report.allocation is not None
    assert len(report.allocation["layers"]) == 2
    assert report.flops_after / report.flops_before == pytest.approx(goal, abs=0.03)
    attention = [b for b in report.blocks if b.kind == "attention"]  # the mean heads removed, query heads counted
    assert report.ratios["heads"] == pytest.approx(1 - sum(b.heads_after for b in attention)
                                                   / sum(b.heads for b in attention), abs=1e-4)
    assert sum(c.flops_removed for c in report.cut) == pytest.approx(report.flops_before - report.flops_after,
                                                                     abs=len(report.cut))
    for block in report.blocks:
        if block.kind == "attention":
            assert block.qk_dim_after % 2 == 0  # whole rotary pairs
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    prefill_and_step(pruned, ids, ids[:, :1])


def test_a_flops_budget_on_a_genai_folder_is_met_with_one_head_size(decoder):
    """An onnxruntime-genai folder holds one head size for the model: the allocation chooses one
    attention width for every block and meets the budget with it (widened afterwards, the
    SmolLM2-shaped folder's --target-flops 0.8 had stopped at -13.9 % FLOPs)."""
    goal = 0.7
    pruned, report = prune(str(decoder("llama-genai-int4")), target_flops=goal, one_head_size=True,
                           calib=calibration(100, 32, 12), measure_latency=False)
    assert report.flops_after / report.flops_before == pytest.approx(goal, abs=0.03)
    attention = [b for b in report.blocks if b.kind == "attention"]
    assert len({(b.heads_after, b.qk_dim_after, b.v_dim_after) for b in attention}) == 1
    assert all(b.qk_dim_after == b.v_dim_after for b in attention)


def test_a_speedup_budget_on_an_int4_folder_times_int4_candidates(decoder, monkeypatch):
    """--target-speedup on a MatMulNBits folder times each candidate in the form it will be written
    (a float rewrite timed against the int4 original measured the dequantization, 0.4x, and sent the
    correction after a goal it could not reach); its Q/K cuts keep whole rotary pairs (the candidate
    with the first dims of each head had made GroupQueryAttention refuse its rotary caches)."""
    from onnxsnp.score import timed

    timed_ops = []
    compare = timed.Clock.compare

    def recording(self, candidate):
        timed_ops.append(Counter(n.op_type for n in candidate.graph.node))
        return compare(self, candidate)

    monkeypatch.setattr(timed.Clock, "compare", recording)
    folder = decoder("llama-genai-int4")
    original = Counter(n.op_type for n in onnx.load(str(folder), load_external_data=False).graph.node)
    pruned, report = prune(str(folder), target_speedup=1.1, one_head_size=True, calib=calibration(100, 32, 12))
    assert timed_ops and report.allocation["timed"]["step"] == "decode"
    assert all(ops["MatMulNBits"] == original["MatMulNBits"] and ops["MatMul"] == original["MatMul"]
               for ops in timed_ops)


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_a_speedup_budget_on_a_decoder_times_the_step_asked_for(tmp_path, step):
    """--target-speedup on a model with a KV cache times the cached decode step by default (what
    generation repeats per token), or the prefill with --timed-step prefill; the report says which.
    (A Llama wide enough that its products, not fixed per-op costs, take most of a run.)"""
    from decoder_export import export_dynamo, tiny_llama

    path = export_dynamo(tiny_llama(hidden=256, heads=4, kv_heads=2, intermediate=1024), tmp_path / "wide.onnx")
    pruned, report = prune(str(path), target_speedup=1.15, timed_step=step, calib=calibration(100, 32, 12))
    timed = report.allocation["timed"]
    assert timed["step"] == step and report.target["measured_step"] == step
    assert len(timed["trials"]) >= 1 and all(t["measured_ms_before"] > 0 for t in timed["trials"])
    if step == "decode":  # the final figure is the report's own decode-step timing
        assert report.target["measured_speedup"] == pytest.approx(report.decode_ms_before / report.decode_ms_after,
                                                                  rel=1e-3)
        assert "per decode step" in report.table()
    ids = np.random.default_rng(1).integers(0, 100, (2, 7))
    prefill_and_step(pruned, ids, ids[:, :1])


def test_whole_key_value_groups_removed_through_the_whole_flow(tmp_path):
    """--heads on grouped-query attention: a kept group keeps all its query heads, and the report's
    attention-map error compares those query heads (it once indexed them by key/value head)."""
    from decoder_export import export_dynamo, tiny_llama

    path = export_dynamo(tiny_llama(hidden=48, heads=6, kv_heads=3), tmp_path / "gqa3.onnx")
    pruned, report = prune(str(path), ratio=0.25, heads=0.34, calib=calibration(100, 32, 12), measure_latency=False)
    attention = [b for b in report.blocks if b.kind == "attention"]
    assert all(b.heads_after == 4 for b in attention)  # two of three groups, two query heads each
    assert set(report.attention_kl) == {b.name for b in attention}
    assert all(value is not None and value >= 0 for value in report.attention_kl.values())


@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_the_rewrite_adds_few_nodes_to_a_dynamo_decoder(decoder, tmp_path, heads):
    """Every node runs on each decode step (issue 28). The rotary tables of a layer whose heads keep
    different pairs cost one Gather, one Transpose and one Split (tests/test_decoder_rules.py). The dynamo export shares one shape tensor (a Concat of run-time sizes and constants) among
    the q/k/v views and the repeat_kv Expands of every layer: the rewrite edits each such shape
    once per new width, changing the constant piece in place, instead of a Concat per reader and
    a Slice-Slice-Concat splice per second edit of the same shape (issue 28: every node runs
    on each decode step). The result equals the masked original in prefill and decode."""
    path = unshare(decoder("llama-dynamo"), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.5, heads=heads), "random", feed, batch=2, seed=3)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    before = {n.name for n in g.model.graph.node}
    added = [n for n in pruned.graph.node if n.name not in before]
    assert not [n for n in added if n.op_type == "Slice"]
    concats = [tuple(n.input) for n in added if n.op_type == "Concat"]
    values = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer}
    assert len({tuple(str(values.get(i, i)) for i in inputs) for inputs in concats}) == len(concats)  # no two alike
    if heads == 0:  # q and k of a layer keep different pairs in each head
        layers = len(plan.attention)
        assert Counter(n.op_type for n in added if n.op_type != "Concat") == Counter(
            {"Gather": layers, "Split": layers, "Transpose": layers + 1, "Squeeze": 1})
    ids, next_ids = np.random.default_rng(0).integers(0, 100, (2, 6)), np.random.default_rng(1).integers(0, 100, (2, 1))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids, next_ids), prefill_and_step(pruned, ids, next_ids)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("number", [0, 1, 3])
def test_a_half_blocks_cut_is_carried_to_the_last_stream_as_the_whole_model_carries_it(decoder, number):
    """The survey's downstream factor (score/downstream.py) reads a cut's error in the last residual
    stream from half-block runs carried through every later half: that error is the one the whole
    model, with the same weights edited, has in its last stream (an added graph output)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from onnxsnp.compensate.batches import tokens
    from onnxsnp.ir import external
    from onnxsnp.options import make_options
    from onnxsnp.pipeline import ReconstructionWork, prepare as prepare_model
    from onnxsnp.score.downstream import Downstream, relative_error
    from onnxsnp.score.sensitivity import survey_shard

    options = make_options(target_flops=0.7)
    p = prepare_model(str(decoder("llama-dynamo")), options, calib=calibration(100, 32, 12))
    work = ReconstructionWork(p, options, restartable=False)
    r = work.reconstructor
    shard = survey_shard(r, p.fit_feed, work.batch, p.mask, 256)
    reach = Downstream(shard)
    halves = [h for pair in r.halves for h in pair]
    starts = [item.original for item in shard.batches]
    for half in halves[:number]:  # the original streams at half `number`'s input
        end = half.segment.outputs[0]
        starts = [shard.run_half(half, item, s, shard.original, [end])[end] for item, s in zip(shard.batches, starts)]
    layer = p.matches.layers[number // 2]
    linear = layer.attention.out if number % 2 == 0 else layer.ffn.fc2
    assert reach.last_error(number, starts, shard.original) == pytest.approx(0.0, abs=1e-10)
    rows = np.arange(linear.in_features)[::2]  # every other input row of the refitted layer, as sliced
    r.weights.set_inputs(linear, rows, None)
    measured = reach.last_error(number, starts, r.weights.values)
    assert measured > 1e-6

    slot = (linear.node, linear.weight_index)
    model = onnx.ModelProto()
    model.CopyFrom(p.g.model)
    name = p.g.node(linear.node).input[linear.weight_index]
    initializer = next(i for i in model.graph.initializer if i.name == name)
    initializer.CopyFrom(numpy_helper.from_array(r.weights.values[slot].astype(np.float32), name))
    last = halves[-1].segment.outputs[0]
    outputs = []
    for graph in (p.g.model, model):
        extended = onnx.ModelProto()
        extended.CopyFrom(graph)
        external.materialize(extended)  # a model pruned from its path holds its weights in their file
        extended.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {i.name: p.fit_feed[i.name] for i in session.get_inputs() if i.name in p.fit_feed}
        outputs.append(session.run([last], feed)[0])
    count = len(tokens(outputs[0], outputs[0].shape[0], p.fit_feed.get(p.mask) if p.mask else None))
    whole, _ = relative_error(outputs[1], outputs[0], outputs[0].shape[0], p.fit_feed.get(p.mask) if p.mask else None)
    assert measured == pytest.approx(whole / count, rel=1e-3)


def test_a_decoders_residual_stream_is_refused_with_the_reason(decoder):
    from onnxsnp import SnpError

    with pytest.raises(SnpError, match="this is a decoder, and cutting"):
        prune(str(decoder("llama-dynamo")), ratio=0.0, residual=0.25, calib=calibration(100))


@pytest.mark.parametrize("stage", ["reconstruction", "survey"])
def test_the_softmax_sums_read_the_batches_sums_from_picks(decoder, monkeypatch, stage):
    """Past SUMS_TOKENS calibration tokens, only the batches sums_from picks add to the sums that
    choose a decoder's Q/K pairs (the reconstruction's) or draw its Q/K curves (a --target-*
    survey's, which gathers no SNP scores either); the refits still read every batch."""
    import onnxsnp.pipeline as pipeline
    from onnxsnp.compensate.least_squares import RECONSTRUCTION_BATCH
    from onnxsnp.score import importance, softmax_metric

    samples, tokens = 5 * RECONSTRUCTION_BATCH, 12
    counted, read = [stage == "reconstruction"], []

    def counting(sums, q_hat, *rest):
        if counted[0]:
            read.append(len(q_hat))
        return real_sums(sums, q_hat, *rest)

    def surveying(*args, **kwargs):
        counted[0] = True
        try:
            return real_survey(*args, **kwargs)
        finally:
            counted[0] = False

    real_sums, real_survey = importance.add_sums, pipeline.survey
    monkeypatch.setattr(importance, "add_sums", counting)
    if stage == "survey":
        monkeypatch.setattr(pipeline, "survey", surveying)
    options = dict(ratio=0.5) if stage == "reconstruction" else dict(target_flops=0.7)
    calib = calibration(100, samples, tokens)
    prune(str(decoder("llama-dynamo")), calib=calib, measure_latency=False, **options)
    every = sum(read)
    read.clear()
    monkeypatch.setattr(softmax_metric, "SUMS_TOKENS", 2 * RECONSTRUCTION_BATCH * tokens)
    prune(str(decoder("llama-dynamo")), calib=calib, measure_latency=False, **options)
    fitted = samples - samples // 8  # an eighth is held back for the fidelity line
    sizes = [len(range(start, min(start + RECONSTRUCTION_BATCH, fitted)))
             for start in range(0, fitted, RECONSTRUCTION_BATCH)]
    picked = sum(size for index, size in enumerate(sizes)
                 if softmax_metric.sums_from(index, len(sizes), size * tokens))
    assert every > 0 and 2 * RECONSTRUCTION_BATCH <= picked < fitted
    assert sum(read) * fitted == every * picked


def test_a_pruned_sliding_window_decoder_decodes_past_its_window_as_it_runs_uncached(decoder):
    """Mistral with a window shorter than the prompt: its cache keeps the last window − 1
    positions, so the step's position is the prompt's length, not the cache's (fed explicitly)."""
    from decoders import run

    pruned, report = prune(str(decoder("mistral-dynamo")), ratio=0.5, calib=calibration(100, 32, 12),
                           measure_latency=False)
    assert report.reconstruction is not None and report.flops_after < report.flops_before
    ids = np.random.default_rng(2).integers(3, 100, (2, 8))
    first = run(pruned, step_feed(pruned, ids[:, :7]))
    past = {name.replace("present", "past_key_values"): value for name, value in first.items()
            if name.startswith("present")}
    assert all(value.shape[2] == WINDOWS["mistral-dynamo"] - 1 for value in past.values())
    step = run(pruned, step_feed(pruned, ids[:, 7:], past, start=7))
    whole = run(pruned, step_feed(pruned, ids))
    np.testing.assert_allclose(step["logits"][:, -1], whole["logits"][:, -1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("form", ["llama-dynamo23", "qwen3-dynamo23"])
def test_an_opset_23_export_is_matched_whole_and_its_pruned_cache_decodes_as_uncached(decoder, tmp_path, form):
    """torch.onnx.export(dynamo=True, opset_version=23): ONNX's RotaryEmbedding on the head-split q
    and k (caches of one column per pair for every head), Attention on 4-D inputs, RMSNormalization.
    Every block and layer is matched; the Llama's heads keep the same Q/K pairs, Qwen3's QK-norm
    keeps q/k whole; pruned = masked original through the cache, and the default flow's pruned
    model decodes through its cache as it runs uncached."""
    path = unshare(decoder(form), tmp_path)
    g = ModelGraph(onnx.load(str(path)))
    matches = find_blocks(g)
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2), matches.skipped
    assert not matches.skipped and inspect_model(path).reconstruction is None  # None: it can run
    qwen3 = form.startswith("qwen3")
    for block in matches.attention:
        assert [r.per_token for r in block.rotary] == [True, True] and block.rotary[0].node in block.pairs_shared
        assert bool(block.qk_whole) == qwen3 and block.groups == 2
    feed = validate_calibration(calibration(100, 4), input_specs(g), "calibration")
    plan = make_plan(g, matches, Ratios(0.5, 0.25, 0.5, heads=0.5), "random", feed, batch=2, seed=3)
    for keep in plan.attention:
        assert (keep.qk == keep.qk[:1]).all() and len(keep.heads) == 1
        assert keep.qk.shape[1] == (keep.block.head_dim if qwen3 else keep.block.head_dim // 2)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    onnx.checker.check_model(pruned)
    ids = np.random.default_rng(4).integers(0, 100, (2, 8))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids[:, :6], ids[:, 6:7]), \
        prefill_and_step(pruned, ids[:, :6], ids[:, 6:7])
    np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=2e-5, rtol=1e-3)
    assert got["present.1.key"].shape == (2, 1, 6, plan.attention[1].qk.shape[1])
    assert got["present.1.value"].shape == (2, 1, 6, plan.attention[1].v.shape[1])
    flowed, report = prune(str(path), ratio=0.5, heads=0.5, calib=calibration(100, 32, 12), measure_latency=False)
    assert report.reconstruction is not None and report.flops_after < report.flops_before
    _, step = prefill_and_step(flowed, ids[:, :7], ids[:, 7:])
    np.testing.assert_allclose(step["logits"][:, -1], run(flowed, step_feed(flowed, ids))["logits"][:, -1],
                               atol=1e-4, rtol=1e-3)
