"""Run inside the optimum venv (see optimum_venv.optimum_python): save a tiny random-weight
transformers model with save_pretrained, export it with `optimum-cli export onnx` from that
local folder, and optionally optimize it with `optimum-cli onnxruntime optimize -O<level>`.

usage: python optimum_export.py FAMILY FOLDER [LEVEL]  → prints the path of the .onnx file
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import transformers as T

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TASKS = {"bert": "feature-extraction", "roberta": "feature-extraction", "distilbert": "feature-extraction",
         "vit": "image-classification", "clip": "zero-shot-image-classification",
         "llama": "text-generation-with-past", "gpt2": "text-generation-with-past",
         "qwen3": "text-generation-with-past", "gemma3": "text-generation-with-past", "olmo2": "text-generation-with-past",
         "stablelm": "text-generation-with-past", "phi": "text-generation-with-past"}


def tiny(family: str):
    torch.manual_seed(0)
    if family == "bert":
        model = T.BertModel(T.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL))
    elif family == "roberta":
        model = T.RobertaModel(T.RobertaConfig(vocab_size=100, max_position_embeddings=64, **SMALL))
    elif family == "distilbert":
        model = T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                     max_position_embeddings=64))
    elif family == "llama":  # grouped-query attention (2 key/value heads for 4), rotary, SwiGLU, RMSNorm
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                                 **SMALL))
    elif family == "qwen3":  # per-head RMSNorm on queries and keys ("QK-norm"), GQA, rotary, SwiGLU
        model = T.Qwen3ForCausalLM(T.Qwen3Config(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                                 head_dim=8, **SMALL))
    elif family == "gemma3":  # QK-norm, GELU(tanh)-gated MLP, sliding-window and global layers, scaled embeddings
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                                       head_dim=8, sliding_window=4,
                                                       layer_types=["sliding_attention", "full_attention"], **SMALL))
    elif family == "olmo2":  # RMSNorm over all heads' queries and keys together, norms after each sublayer
        model = T.Olmo2ForCausalLM(T.Olmo2Config(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                                 **SMALL))
    elif family == "stablelm":  # a partial rotary embedding (a quarter of each head), GQA, LayerNorm with bias
        model = T.StableLmForCausalLM(T.StableLmConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2,
                                                       partial_rotary_factor=0.25, **SMALL))
    elif family == "phi":  # Phi-2: half of each head rotated, attention and MLP in parallel on one LayerNorm
        model = T.PhiForCausalLM(T.PhiConfig(vocab_size=100, max_position_embeddings=64, partial_rotary_factor=0.5,
                                             **SMALL))
    elif family == "gpt2":  # fused c_attn (Conv1D), learned positions
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=10, **SMALL))
    else:
        model = T.CLIPModel(T.CLIPConfig(text_config=dict(vocab_size=100, max_position_embeddings=16, **SMALL),
                                         vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=16))
    with torch.no_grad():  # trained models have non-zero biases and norm weights not all one (or zero)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
            elif name.endswith(("q_norm.weight", "k_norm.weight", "feedforward_layernorm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model


def main(family: str, folder: Path, level: str | None) -> None:
    cli = Path(sys.executable).with_name("optimum-cli")
    tiny(family).save_pretrained(folder / "source")
    subprocess.run([str(cli), "export", "onnx", "-m", str(folder / "source"), "--task", TASKS[family],
                    str(folder / "onnx")], check=True, capture_output=True)
    model = folder / "onnx" / "model.onnx"
    if level:
        subprocess.run([str(cli), "onnxruntime", "optimize", "--onnx_model", str(folder / "onnx"), f"-{level}",
                        "-o", str(folder / level)], check=True, capture_output=True)
        model = folder / level / "model_optimized.onnx"
    print(model)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
