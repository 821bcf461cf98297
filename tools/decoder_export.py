"""Decoder language models as ONNX, made from local folders (nothing from a model hub):

- `tiny_llama`: a Llama-architecture causal LM (grouped-query attention, rotary, SwiGLU, RMSNorm)
  with random weights, and `save_folder` writes it with a byte-level BPE tokenizer trained on the
  given texts, as transformers' save_pretrained does (what optimum and onnxruntime-genai read);
  `tiny_qwen3`: the same with QK-norm (Qwen3); `tiny_phi3`: with fused qkv and gate_up projections; `tiny_mistral`: with a sliding window;
- `export_dynamo`: torch's dynamo exporter with a KV cache (past_key_values.* in, present.* out);
- `export_genai`: onnxruntime-genai's model builder (fp32 or int4) on such a folder;
- `export_optimum_folder`: optimum's export with a KV cache of such a folder (a Llama one), in the
  optimum venv (tools/optimum_venv.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def tiny_llama(vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 64, positions: int = 128, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, intermediate_size=intermediate,
                           max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return T.LlamaForCausalLM(config).eval()


def tiny_phi3(vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 64, positions: int = 128, rotary: float = 1.0, seed: int = 0):
    """A Phi-3-architecture causal LM: a Llama whose q, k and v come from one qkv_proj and whose
    MLP's gate and up from one gate_up_proj, each taken apart along its features; `rotary` < 1:
    a partial rotary embedding (Phi-4-mini: 0.75)."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.Phi3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=intermediate,
                          max_position_embeddings=positions, original_max_position_embeddings=positions,
                          partial_rotary_factor=rotary, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return T.Phi3ForCausalLM(config).eval()


def tiny_mistral(vocab: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 64, positions: int = 128, window: int = 4, seed: int = 0):
    """A Mistral-architecture causal LM: a Llama whose attention sees the last `window` positions;
    its cache keeps the last window − 1 of them (a Slice along the sequence before and after the
    join, in torch's dynamo export)."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.MistralConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, intermediate_size=intermediate, sliding_window=window,
                             max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return T.MistralForCausalLM(config).eval()


def tiny_gemma2(vocab: int = 300, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 32, intermediate: int = 256, positions: int = 128, seed: int = 0):
    """A Gemma 2 decoder: soft-capped attention scores (cap·tanh(s/cap)), a GELU(tanh)-gated MLP,
    norms before and after each sub-block, a sliding-window layer and a global one."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.Gemma2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                            max_position_embeddings=positions, sliding_window=4, attn_logit_softcapping=50.0,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return T.Gemma2ForCausalLM(config).eval()


def tiny_cohere(vocab: int = 100, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, positions: int = 128, seed: int = 0):
    """A Cohere (Command R) decoder: an interleaved rotary embedding, attention and MLP in
    parallel on one LayerNorm."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.CohereConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, intermediate_size=intermediate,
                            max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return T.CohereForCausalLM(config).eval()


def tiny_qwen3(vocab: int = 300, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 32, intermediate: int = 256, positions: int = 128, seed: int = 0):
    """A Qwen3-architecture causal LM: a Llama with an RMSNorm over each head's q and k (QK-norm)."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                           max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = T.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # trained QK-norm weights are not all one: let the test see them
        for name, parameter in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model


def tiny_gemma3(vocab: int = 300, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 32, intermediate: int = 256, positions: int = 128, seed: int = 0):
    """A Gemma 3 text decoder: QK-norm, a GELU(tanh)-gated MLP, norms before and after each sub-block,
    a sliding-window layer and a global one (each with its own rotary base), scaled embeddings."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                intermediate_size=intermediate, max_position_embeddings=positions, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"][:layers],
                                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = T.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # trained norm weights are not all zero (Gemma's norms scale by 1 + w)
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)
    return model


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer (GPT-2 style) with <s>, </s>, <pad> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_partial_rotary(family: str, vocab: int = 100, hidden: int = 64, layers: int = 2, heads: int = 4,
                        intermediate: int = 128, positions: int = 128, seed: int = 0):
    """Small decoders whose rotary embedding turns only the first dims of each head (head dim 16):
    "stablelm" (StableLM 2: a quarter of them, grouped-query attention, LayerNorm with bias),
    "phi" (Phi-2: half, parallel attention + MLP on one LayerNorm, biases, GELU(tanh)) and "neox"
    (GPT-NeoX/Pythia: a quarter, a fused per-head q|k|v projection, parallel residual)."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=positions, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2)
    if family == "stablelm":
        return T.StableLmForCausalLM(T.StableLmConfig(num_key_value_heads=2, partial_rotary_factor=0.25, **common)).eval()
    if family == "phi":
        return T.PhiForCausalLM(T.PhiConfig(partial_rotary_factor=0.5, **common)).eval()
    if family == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(rotary_pct=0.25, **common)).eval()
    raise ValueError(f"no tiny {family} model")


def save_folder(model, folder: Path, texts: list[str] | None = None) -> Path:
    """The model and a tokenizer (trained on `texts`, or on a few lines of this file) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    sample = texts or Path(__file__).read_text().splitlines()
    train_tokenizer(sample, model.config.vocab_size).save_pretrained(folder)
    return folder


class _WithCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) → (logits, *present), the cache flat."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_dynamo(model, path: Path, opset: int | None = None) -> Path:
    """torch.onnx.export(dynamo=True) with a KV cache: inputs input_ids, attention_mask,
    position_ids, past_key_values.{i}.key/value; outputs logits, present.{i}.key/value. `opset`:
    the exporter's default where None; 23 writes ONNX's RotaryEmbedding, Attention and
    RMSNormalization ops instead of their standard-op forms."""
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # GPT-NeoX has none
    head_dim = config.hidden_size // config.num_attention_heads
    batch, seq, past = 2, 5, 3
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq)[None].expand(batch, seq)
    cache = tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers))
    dims = {name: torch.export.Dim(name) for name in ("batch", "seq", "past", "total")}
    shapes = ({0: dims["batch"], 1: dims["seq"]}, {0: dims["batch"], 1: dims["total"]},
              {0: dims["batch"], 1: dims["seq"]}, tuple({0: dims["batch"], 2: dims["past"]} for _ in cache))
    names = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    outputs = ["logits"] + [name.replace("past_key_values", "present") for name in names]
    with torch.no_grad():
        torch.onnx.export(_WithCache(model.eval()), (ids, mask, positions, cache), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask", "position_ids", *names], output_names=outputs,
                          dynamic_shapes=shapes, opset_version=opset)
    return path


def export_genai(folder: Path, out: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder on a local folder: out/model.onnx and out/genai_config.json."""
    builder = Path(__file__).with_name("genai_builder.py")  # the builder, given Gemma 3's rotary bases as it reads them
    done = subprocess.run([sys.executable, str(builder), "-i", str(folder), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"onnxruntime-genai's builder failed: {done.stderr.strip()[-2000:]}")
    return out


def export_optimum_folder(folder: Path, out: Path) -> Path:
    """optimum-cli's export (`text-generation-with-past`, fp32) of a Llama folder as transformers 5
    saves it: out/model.onnx. optimum-onnx pins transformers < 4.58 (its own venv), whose Llama
    config reads the rotary base as `rope_theta`, not transformers 5's `rope_parameters`, and which
    cannot read transformers 5's tokenizer_config (so optimum writes no tokenizer): the folder is
    staged in out.parent/"source" with the config in the older form and the weights linked, and
    the folder's tokenizer.json is linked beside the export."""
    from optimum_venv import optimum_python

    source = out.parent / "source"
    source.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).exists() and not (source / name).exists():  # linked: the folder stays the one source
            (source / name).symlink_to((folder / name).resolve())
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope:
        kind = rope.get("rope_type", "default")
        config.update(rope_theta=rope["rope_theta"],
                      rope_scaling=None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"})
    (source / "config.json").write_text(json.dumps(config, indent=1))
    cli = optimum_python().with_name("optimum-cli")
    done = subprocess.run([str(cli), "export", "onnx", "-m", str(source), "--task", "text-generation-with-past",
                           str(out)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"optimum's export of {folder} failed: {done.stderr.strip()[-2000:]}")
    if (folder / "tokenizer.json").exists() and not (out / "tokenizer.json").exists():
        (out / "tokenizer.json").symlink_to((folder / "tokenizer.json").resolve())
    return out / "model.onnx"
