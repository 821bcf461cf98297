"""What the report of a decoder says about speed (issue 28): the prefill with its tokens a second,
the cached decode step with its, the KV cache per token, before and after — in the table, the
JSON, the HTML page and a sweep's table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from onnxsnp.data.timing import TimeBase, prompt_tokens
from onnxsnp.report.html import render as render_html
from onnxsnp.report.report import Report
from onnxsnp.sweeping import SweepResult, SweepRow, markdown
from onnxsnp.verify.verification import Fidelity

PROMPT = 32  # tokens in the timed prefill
PREFILL_MS, DECODE_MS = (40.0, 25.0), (8.0, 5.0)  # before, after
KV = (46080, 34560)  # bytes per token


def report(prefill_tokens: int | None = PROMPT, decode: bool = True, clock: TimeBase | None = None) -> Report:
    fidelity = Fidelity(4, 0.99, 0.1, None, perplexity_before=20.0, perplexity_after=21.0, next_token_agreement=0.9,
                        tokens=4 * (PROMPT - 1))
    return Report(criterion="magnitude", compensation="lstsq", compensation_kept=[], ratios={"qk": 0.25},
                  calibration="synthetic", calibration_samples=8, holdout_samples=4, params_before=100,
                  params_after=80, macs_before=1000, macs_after=800, fidelity=fidelity, blocks=[],
                  latency_ms_before=PREFILL_MS[0], latency_ms_after=PREFILL_MS[1],
                  decode_ms_before=DECODE_MS[0] if decode else None, decode_ms_after=DECODE_MS[1] if decode else None,
                  kv_cache_bytes_before=KV[0], kv_cache_bytes_after=KV[1], prefill_tokens=prefill_tokens,
                  latency_clock=clock and clock.value)


def test_the_table_shows_prefill_and_decode_in_milliseconds_and_tokens_a_second():
    table = report().table()
    prefill = next(line for line in table.splitlines() if line.startswith("prefill"))
    decode = next(line for line in table.splitlines() if line.startswith("decode step"))
    assert f"prefill, {PROMPT} tokens, 1 thread" in prefill
    assert f"({1000 * PROMPT / PREFILL_MS[0]:,.0f} tokens/s)" in prefill
    assert f"({1000 * PROMPT / PREFILL_MS[1]:,.0f} tokens/s)" in prefill
    assert f"{PREFILL_MS[0] / PREFILL_MS[1]:.2f}x faster" in prefill
    assert f"({1000 / DECODE_MS[0]:.0f} tokens/s)" in decode and f"({1000 / DECODE_MS[1]:.0f} tokens/s)" in decode
    assert "KV cache/token" in table


@pytest.mark.parametrize("clock", list(TimeBase))
def test_the_timings_say_when_they_count_the_threads_cpu_time(clock):
    table, data = report(clock=clock).table(), report(clock=clock).as_dict()
    cpu = ", CPU time" if clock is TimeBase.THREAD_CPU else ""
    assert f"prefill, {PROMPT} tokens, 1 thread{cpu} " in table and f"decode step, 1 thread{cpu} " in table
    assert data["latency_clock"] == clock.value


def test_a_model_without_a_cache_keeps_its_latency_line():
    table = report(prefill_tokens=None, decode=False).table()
    assert "latency, 1 thread" in table and "tokens/s" not in table and "prefill" not in table


def test_the_json_has_tokens_a_second_before_and_after():
    data = json.loads(json.dumps(report().as_dict()))
    assert data["prefill_tokens"] == PROMPT
    assert data["prefill_tokens_per_s_before"] == pytest.approx(1000 * PROMPT / PREFILL_MS[0])
    assert data["prefill_tokens_per_s_after"] == pytest.approx(1000 * PROMPT / PREFILL_MS[1])
    assert data["decode_tokens_per_s_before"] == pytest.approx(1000 / DECODE_MS[0])
    assert data["decode_tokens_per_s_after"] == pytest.approx(1000 / DECODE_MS[1])
    assert (data["kv_cache_bytes_before"], data["kv_cache_bytes_after"]) == KV


def test_the_html_page_has_the_decode_step_and_the_cache():
    page = render_html(report(), "decoder")
    assert f"{KV[0]:,}" in page and f"{KV[1]:,}" in page
    assert "decode step, 1 thread" in page and f"prefill, {PROMPT} tokens" in page


def test_a_sweep_of_a_decoder_shows_its_decode_step_and_cache():
    r = report()
    row = SweepRow(0.8, "target_0.8.onnx", r.flops_before, r.flops_after, r.params_before, r.params_after,
                   r.latency_ms_before, r.latency_ms_after, 0.99, 0.9, None, 1.0, perplexity_ratio=1.05,
                   next_token_agreement=0.9, decode_ms_before=DECODE_MS[0], decode_ms_after=DECODE_MS[1],
                   kv_cache_bytes_before=KV[0], kv_cache_bytes_after=KV[1])
    head, _, line = markdown(SweepResult("flops", (row,), 1.0)).splitlines()
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))
    assert cells["prefill ms"] == f"{PREFILL_MS[1]:.4g}"
    assert cells["decode ms/token"] == f"{DECODE_MS[1]:.4g}"
    assert cells["decode speedup"] == f"{DECODE_MS[0] / DECODE_MS[1]:.4g}×"
    assert cells["KV cache/token"] == f"{KV[1]:,} B ({KV[1] / KV[0]:.1%})"


def test_prompt_tokens_counts_the_ids_of_a_model_with_a_cache():
    ids = np.zeros((1, PROMPT), np.int64)
    past = np.zeros((1, 2, 0, 8), np.float32)
    assert prompt_tokens({"input_ids": ids, "attention_mask": np.ones((1, PROMPT), np.int64),
                          "past_key_values.0.key": past}) == PROMPT
    assert prompt_tokens({"input_ids": ids}) is None  # no cache: a run is not a prefill
