"""Feeds and runs for decoder language models with a KV cache: prefill (an empty cache, shaped as
each model declares it) and decode steps that read the previous step's present outputs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnxsnp.data.calibration import InputSpec, input_specs
from onnxsnp.data.kv_cache import empty_cache
from onnxsnp.ir.graph import ModelGraph


def cache_inputs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The past inputs, with the head size onnxsnp reads from the graph where it is symbolic and a
    ring buffer's capacity (onnxruntime-genai's sliding-window layers)."""
    return {spec.name: spec for spec in input_specs(ModelGraph(model)) if spec.name.startswith("past")}


def step_feed(model: onnx.ModelProto, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
              start: int | None = None) -> dict[str, np.ndarray]:
    """input_ids `ids` after `start` cached positions (none: prefill); mask and positions to match.
    Without `start`, the cached positions are read off a cache that grows with them (a ring
    buffer's length is its capacity, not the positions it has seen)."""
    names = {i.name for i in model.graph.input}
    batch, seq = ids.shape
    if past is None:
        past = {name: empty_cache(spec, batch) for name, spec in cache_inputs(model).items()}
        start = 0
    if start is None:  # read off the graph only here: greedy decoding passes its position every step
        caches = cache_inputs(model)
        growing = [value.shape[2] for name, value in past.items() if not (name in caches and caches[name].capacity)]
        start = growing[0] if growing else 0
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, start + seq), np.int64), **past}
    if "position_ids" in names:
        feed["position_ids"] = np.tile(np.arange(start, start + seq), (batch, 1)).astype(np.int64)
    return {k: v for k, v in feed.items() if k in names}


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def prefill_and_step(model: onnx.ModelProto, ids: np.ndarray, next_ids: np.ndarray) -> tuple[dict, dict]:
    """The outputs of a prefill on `ids`, then of one decode step on `next_ids` through the cache."""
    first = run(model, step_feed(model, ids))
    past = {name.replace("present", "past_key_values"): value for name, value in first.items()
            if name.startswith("present")}
    return first, run(model, step_feed(model, next_ids, past))


def calibration(vocab: int, samples: int = 24, tokens: int = 12, seed: int = 5) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, vocab, (samples, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def greedy(model: onnx.ModelProto, prompt: list[int], steps: int) -> list[int]:
    """Greedy generation through the KV cache with onnxruntime: the prompt and `steps` new tokens."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    tokens, past = list(prompt), None
    ids = np.array([prompt])
    for _ in range(steps):
        out = dict(zip(names, session.run(None, step_feed(model, ids, past, len(tokens) - ids.shape[1]))))
        past = {name.replace("present", "past_key_values"): value for name, value in out.items()
                if name.startswith("present")}
        tokens.append(int(out["logits"][0, -1].argmax()))
        ids = np.array([[tokens[-1]]])
    return tokens


def genai_generate(folder, prompt: list[int], length: int) -> list[int]:
    """Greedy generation with onnxruntime-genai from a model folder, up to `length` tokens in all."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def sample(model: onnx.ModelProto, prompts: np.ndarray, length: int, seed: int, temperature: float = 1.0,
           top_p: float = 0.95, banned: list[int] = (), batch: int = 16) -> np.ndarray:
    """Windows of `length` tokens the model writes itself: each row of `prompts` (equal lengths)
    continued by sampling through the KV cache with onnxruntime (temperature, nucleus `top_p`),
    seeded so that the same arguments give the same tokens. `banned` ids (special tokens: an
    end-of-turn in a calibration stream that has none) are never sampled."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    rows = []
    for first in range(0, len(prompts), batch):
        tokens = prompts[first:first + batch].astype(np.int64)
        ids, past = tokens, None
        while tokens.shape[1] < length:
            out = dict(zip(names, session.run(None, step_feed(model, ids, past, tokens.shape[1] - ids.shape[1]))))
            past = {name.replace("present", "past_key_values"): value for name, value in out.items()
                    if name.startswith("present")}
            logits = out["logits"][:, -1].astype(np.float64) / temperature
            logits[:, list(banned)] = -np.inf
            ids = np.array([[_nucleus(row, top_p, rng)] for row in logits], np.int64)
            tokens = np.concatenate([tokens, ids], axis=1)
        rows.append(tokens)
    return np.concatenate(rows)


def _nucleus(logits: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """One token drawn from the smallest set of most likely tokens whose probability reaches top_p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = order[:int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])
