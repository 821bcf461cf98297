"""A ~1 B-parameter Llama-architecture decoder for the prune-cost bench (issue 25): no such real
checkpoint is on the package index, so a transformers config of that size with its weights
initialised (transformers' own init, seed 0). Its cost does not depend on the weights' values.

Shape: TinyLlama-1.1B's (22 layers, hidden 2,048, 32 query / 4 key-value heads, SwiGLU 5,632) with
SmolLM2's 49,152-token vocabulary, tied embeddings, so that SmolLM2's tokenizer cuts the
calibration text (`tokenizer.json` is copied beside the model). Exported with a KV cache by torch's
dynamo exporter (tools/decoder_export.py), fp32.

    python tools/build_llama_1b.py [--build build/real]   # → build/real/llama-1b/model.onnx
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             intermediate_size=5632, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def llama_1b(build: Path) -> Path:
    model = build / "llama-1b" / "model.onnx"
    if model.exists():
        return model
    import torch
    import transformers as T

    from decoder_export import export_dynamo

    tokenizer = build / "smollm2" / "tokenizer.json"
    if not tokenizer.exists():
        raise SystemExit(f"{tokenizer} is missing: build SmolLM2 first (tools/bench_real_decoders.py)")
    torch.manual_seed(0)
    float_model = T.LlamaForCausalLM(T.LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2)).eval()
    model.parent.mkdir(parents=True, exist_ok=True)
    float_model.config.save_pretrained(model.parent)
    shutil.copy(tokenizer, model.parent / "tokenizer.json")
    print(f"{sum(p.numel() for p in float_model.parameters()) / 1e9:.3f} B parameters", flush=True)
    return export_dynamo(float_model, model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path("build/real"))
    print(llama_1b(parser.parse_args().build))
