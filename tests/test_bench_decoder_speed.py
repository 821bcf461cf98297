"""tools/bench_decoder_speed.py's options and rows: the cuts and thread counts it is asked for, and
each speedup set beside the FLOPs cut (issue 28's goal is a share of it)."""
from __future__ import annotations

import pytest

import bench_decoder_speed as bench


def test_ratios_and_flops_budgets_become_prunes_in_order():
    listed = bench.cuts("0.25", "0.8,0.5")
    assert [c.args for c in listed] == [["--ratio", "0.25"], ["--target-flops", "0.8"], ["--target-flops", "0.5"]]
    assert len({c.stem for c in listed}) == 3  # one file each


@pytest.mark.parametrize("ratios, flops, speedups", [("", "", ""), ("x", "", ""), ("", "1.5", ""), ("0", "", ""),
                                                     ("", "", "0.9")])
def test_a_bad_cut_is_a_one_line_exit(ratios, flops, speedups):
    with pytest.raises(SystemExit) as stopped:
        bench.cuts(ratios, flops, speedups)
    assert "bench_decoder_speed" in str(stopped.value)


def test_thread_counts():
    assert bench.thread_counts("1,2") == (1, 2)
    for bad in ("", "0", "1,1", "two"):
        with pytest.raises(SystemExit):
            bench.thread_counts(bad)


def test_a_row_sets_each_speedup_beside_the_flops_cut():
    flops, kept = 1000, 800  # 20 % fewer FLOPs: ideal 1.25×
    prefill, decode = 100.0, 10.0
    row = bench.table_row("dynamo", bench.Cut("--target-flops", "0.8"), 2, (flops, kept),
                          (prefill, decode, 4096), (prefill / 1.25, decode / 1.0, 2048), (2_000_000, 1_500_000))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["dynamo", "`--target-flops 0.8`", "2", "−20.0% (1.250×)"]
    assert cells[4] == "100.0 → 80.0 (1.25×, 1.00)"  # prefill at the cut's speedup
    assert cells[5] == "10.00 → 10.00 (1.00×, 0.80)"  # decode not faster: 1 ÷ 1.25
    assert cells[6] == "2.0 → 1.5 MB (0.75×)" and cells[7] == "4.0 → 2.0 KiB"
    assert len(cells) == len(bench.HEADER[1].strip("|").split("|"))


def test_a_speedup_goal_row_says_where_the_decode_step_landed():
    goal, decode = 1.25, 10.0
    (cut,) = bench.cuts("", "", str(goal))
    assert cut.args == ["--target-speedup", str(goal)]
    row = bench.table_row("dynamo", cut, 1, (1000, 800), (100.0, decode, 4096), (80.0, decode / (goal * 1.04), 2048),
                          (2_000_000, 1_500_000))
    assert f"goal {goal:.2f}×, +4.0%" in row.split("|")[6]  # 4 % faster than asked


def test_the_calibration_prompts_are_as_long_as_the_timed_prefill(tmp_path):
    import numpy as np

    samples = 3
    path = bench.prompts(tmp_path, samples)
    ids = np.load(path)["input_ids"]
    assert ids.shape == (samples, bench.PROMPT) and ids.min() >= 0 and ids.max() < bench.SHAPE["vocab"]
    assert bench.prompts(tmp_path, samples) == path  # made once, reused


def test_the_cpu_clock_times_one_thread_only():
    import time

    assert bench.clock("wall", (1, 2)) is time.perf_counter
    assert bench.clock("cpu", (1,)) is time.thread_time
    for name, threads in (("cpu", (1, 2)), ("cpu", (2,)), ("gpu", (1,))):
        with pytest.raises(SystemExit) as stopped:
            bench.clock(name, threads)
        assert "bench_decoder_speed" in str(stopped.value)


def test_a_one_thread_sessions_kernels_run_on_the_callers_cpu_clock(tmp_path):
    """--clock cpu rests on this: with one intra-op thread onnxruntime runs the kernels on the thread
    that calls run(), so its CPU time grows with their work (on another thread it would stay ~0)."""
    import time

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    width, chained = 256, 8
    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")

    def session(count: int):
        nodes = [helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]) for i in range(count)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, [width, width])],
                                  [helper.make_tensor_value_info(f"x{count}", onnx.TensorProto.FLOAT, [width, width])],
                                  [weight])
        onnx.save(helper.make_model(graph), tmp_path / f"chain{count}.onnx")
        return bench.session(tmp_path / f"chain{count}.onnx", 1)

    feed = {"x0": np.ones((width, width), np.float32)}
    spent = []
    for sess in (session(1), session(chained)):
        sess.run(None, feed)
        started = time.thread_time()
        for _ in range(10):
            sess.run(None, feed)
        spent.append(time.thread_time() - started)
    assert spent[1] > chained / 3 * spent[0] > 0
