"""The verification's probed run without the tensors it measures held (docs/SCALING.md, "Seventh
round"): shapes from Shape nodes equal to the tensors' own; the pruned model's maps compared batch
by batch giving the same KL as whole arrays; the original's maps and the outputs on disk read block
by block giving the same statistics, bit for bit."""
from __future__ import annotations

import numpy as np

from onnxsnp.data.calibration import Runner, shape_output
from onnxsnp.ir.stats import shape_tensors
from onnxsnp.verify import spill, verification
from onnxsnp.verify.observation import _probe_run
from test_weight_file import _chain

WIDTH, LAYERS, SAMPLES = 48, 3, 10


def _feed(samples: int = SAMPLES) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((samples, WIDTH)).astype(np.float32)}


def test_shapes_come_from_shape_nodes_equal_to_the_tensors_own():
    model, feed = _chain(WIDTH, LAYERS), _feed(1)
    names = shape_tensors(model)
    assert len(names) >= 2 * LAYERS  # each MatMul's input and output
    runner = Runner(model, names, shapes_of=names)
    (_, values), = runner.batches(feed, names + [shape_output(n) for n in names], 1)
    assert {n: tuple(values[shape_output(n)]) for n in names} == {n: values[n].shape for n in names}
    _, _, shapes = _probe_run(model, "model", [], feed, 1, None)
    assert shapes == {n: values[n].shape for n in names}


def test_maps_handed_over_batch_by_batch_are_the_maps_kept_whole():
    model, feed = _chain(WIDTH, LAYERS), _feed()
    kept, outputs, _ = _probe_run(model, "model", ["r0", "r1"], feed, 4, None)
    seen = []
    _, streamed, _ = _probe_run(model, "model", ["r0", "r1"], feed, 4, None,
                                maps_seen=lambda inputs, maps: seen.append({k: np.array(v) for k, v in maps.items()}))
    assert len(seen) == SAMPLES  # one probed sample a run (no fixed batch), every sample below MAP_SAMPLES
    for name in ("r0", "r1"):
        np.testing.assert_array_equal(np.concatenate([s[name] for s in seen]), kept[name])
    np.testing.assert_array_equal(streamed[0], outputs[0])


def test_attention_terms_fed_per_sample_are_attention_error_of_the_whole_arrays():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6), size=(5, 3, 6)).astype(np.float32)  # (samples, heads, queries, keys)
    q = rng.dirichlet(np.ones(6), size=(5, 3, 6)).astype(np.float32)
    mask = (rng.random((5, 6)) > 0.2).astype(np.int64)
    probs = {"block": ("t", np.arange(3))}
    whole = verification.attention_error([({"m": mask}, {"t": p}, {"t": q})], probs, "m")
    terms = verification.AttentionTerms(probs, "m")
    for s in range(5):
        terms.add({"m": mask[s:s + 1]}, {"t": p[s:s + 1]}, {"t": q[s:s + 1]})
    assert terms.means() == whole and whole["block"] > 0


def test_statistics_of_outputs_on_disk_read_by_block_are_those_of_the_arrays(monkeypatch):
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)  # every output to disk
    monkeypatch.setattr(verification, "_BLOCK_VALUES", 64)  # many blocks per sample
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((6, 5, 40)).astype(np.float32)
    got = (ref + 0.1 * rng.standard_normal(ref.shape)).astype(np.float32)
    on_disk = []
    for values in (ref, got):
        outputs = spill.Outputs(len(values))
        for s in range(len(values)):
            outputs.add([values[s:s + 1]], 1)
        on_disk.append(outputs.joined()[0])
    assert all(isinstance(o, spill.OnDisk) for o in on_disk)
    rows = on_disk[0].rows(1, 4)
    np.testing.assert_array_equal(rows[0:2, 7:90], ref[1:3].reshape(2, -1)[:, 7:90])
    assert verification.fidelity(on_disk[:1], on_disk[1:]) == verification.fidelity([ref], [got])


def test_probe_sessions_run_without_the_arena_and_give_the_arenas_values(monkeypatch):
    """The arena kept each probe run's working set for the next (observation._without_arena):
    both of _probe_run's sessions go without it, and what they hand back is what a session with
    the arena computes, bit for bit."""
    from onnxsnp.verify import observation

    built = []

    class Recorded(Runner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(observation, "Runner", Recorded)
    model, feed = _chain(WIDTH, LAYERS), _feed(observation.MAP_SAMPLES + 4)  # a probed part and a rest
    kept, outputs, _ = _probe_run(model, "model", ["r0", "r1"], feed, 4, None)
    assert len(built) == 2  # the probed samples' session and the rest's
    assert not any(r.session.get_session_options().enable_cpu_mem_arena for r in built)
    arena = Runner(model, ["r0", "r1"])
    assert arena.session.get_session_options().enable_cpu_mem_arena
    probed = observation.MAP_SAMPLES

    def arena_run(part: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
        return [{k: np.array(v) for k, v in values.items()}  # copies: the views are of buffers run again
                for _, values in arena.batches(part, arena.output_names + ["r0", "r1"], batch)]

    # as _probe_run batches: the probed samples one a run, the rest 4 a run (y sums over a batch)
    want = arena_run({k: v[:probed] for k, v in feed.items()}, 1)
    want += arena_run({k: v[probed:] for k, v in feed.items()}, 4)
    np.testing.assert_array_equal(outputs[0], np.concatenate([v[arena.output_names[0]] for v in want]))
    for name in ("r0", "r1"):
        np.testing.assert_array_equal(kept[name], np.concatenate([v[name] for v in want])[:probed])


def test_each_shape_node_runs_right_after_its_tensor(tmp_path):
    """onnxruntime's default order walks back from the last-added leaf first: the Shape nodes,
    added latest tensor first, run each before the next layer's MatMul (in the model's order
    they all ran after the whole pass, each measured tensor held to its end). Read from
    onnxruntime's own profile of one run."""
    import json

    import onnxruntime as ort

    from onnxsnp.data.calibration import session

    model = _chain(WIDTH, LAYERS)
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    names = [f"r{i}" for i in range(LAYERS)]

    def profiled(options: ort.SessionOptions) -> None:
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "run")

    sess = session(model, shapes_of=names, configure=profiled)
    sess.run([shape_output(n) for n in names], _feed(1))
    events = json.loads(open(sess.end_profiling()).read())
    ran = [e["name"].removesuffix("_kernel_time") for e in sorted(events, key=lambda e: e["ts"])
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    matmuls = [n for n in ran if "MatMul_" in n]  # "fused MatMul_0/MatMulAddFusion": the Add folded in
    assert len(matmuls) == LAYERS, ran  # one a layer: the layers can be told apart
    for layer in range(LAYERS - 1):
        assert ran.index(shape_output(f"r{layer}")) < ran.index(matmuls[layer + 1]), ran
