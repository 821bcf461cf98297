"""Train a small Llama-architecture language model on real text on the CPU, and export it both ways.

The text is the Python standard library's own prose: every docstring and every comment of its
modules (read with `ast` and `tokenize` from the installed sources, so nothing is downloaded).
Modules are split by name — a fixed 90 % to train on, the rest held out for evaluation and
calibration — so the held-out text comes from modules the model never saw.

The model: grouped-query attention (4 query heads of 64 dims over 2 key/value heads), rotary
embeddings, SwiGLU and RMSNorm, as in Llama; a byte-level BPE tokenizer trained on the training
text. After training it is saved as a transformers folder (with the tokenizer), and exported
with a KV cache by torch's dynamo exporter (build/tiny_llama/dynamo/model.onnx) and by
onnxruntime-genai's model builder (build/tiny_llama/genai/, fp32). The held-out text goes to
build/tiny_llama/heldout.txt, the calibration texts to build/tiny_llama/calibration.txt.

usage: python tools/train_tiny_llama.py [--steps N] [--out DIR]   (about 9 minutes on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import ast
import io
import math
import random
import sysconfig
import time
import tokenize
from pathlib import Path

import torch

from harness import BUILD

OUT = BUILD / "tiny_llama"
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, CONTEXT = 1024, 256, 4, 4, 2, 512, 64


def stdlib_texts() -> dict[str, list[str]]:
    """Per module of the standard library: its docstrings and comment paragraphs, in file order."""
    source = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, list[str]] = {}
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source)
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") or part.startswith("_")
               for part in relative.parts[:-1]):
            continue
        try:
            code = path.read_text(encoding="utf-8")
            tree = ast.parse(code)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        pieces = [ast.get_docstring(node) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        pieces = [p for p in pieces if p]
        pieces += _comment_paragraphs(code)
        if pieces:
            texts[str(relative)] = pieces
    return texts


def _comment_paragraphs(code: str) -> list[str]:
    paragraphs, current = [], []
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if text and not text.startswith("!"):
                    current.append(text)
                    continue
            if current and token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                paragraphs.append(" ".join(current))
                current = []
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return [p for p in paragraphs + [" ".join(current)] if len(p) > 30]


def split(texts: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): whole modules, every tenth by a fixed shuffle held out."""
    modules = sorted(texts)
    random.Random(0).shuffle(modules)
    held = set(modules[::10])
    return ([t for m in sorted(texts) if m not in held for t in texts[m]],
            [t for m in sorted(texts) if m in held for t in texts[m]])


def train(model, ids: torch.Tensor, steps: int, batch: int = 16, rate: float = 3e-3) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of the token stream (transformers
    shifts the labels itself: a window is its own labels)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    losses, started = [], time.time()
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = rate * scale
        starts = torch.randint(0, len(ids) - CONTEXT, (batch,), generator=generator)
        window = torch.stack([ids[s:s + CONTEXT] for s in starts])
        loss = model(input_ids=window, labels=window).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {sum(losses[-25:]) / len(losses[-25:]):.3f}  ({time.time() - started:.0f} s)",
                  flush=True)
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import transformers as T

    from decoder_export import export_dynamo, export_genai, train_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    training, heldout = split(stdlib_texts())
    print(f"{len(training)} training texts ({sum(map(len, training)) / 1e6:.1f} M chars), {len(heldout)} held out")
    tokenizer = train_tokenizer(training, VOCAB)
    stream = [t for text in training for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    ids = torch.tensor(stream)
    print(f"{len(ids)} training tokens")
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE,
                           max_position_embeddings=2 * CONTEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                           tie_word_embeddings=False)
    model = T.LlamaForCausalLM(config)
    train(model, ids, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "source"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (args.out / "heldout.txt").write_text("\n".join(t.replace("\n", " ") for t in heldout) + "\n")
    (args.out / "calibration.txt").write_text(
        "\n".join(t.replace("\n", " ") for t in random.Random(1).sample(training, 256)) + "\n")
    (args.out / "dynamo").mkdir(exist_ok=True)
    export_dynamo(model, args.out / "dynamo" / "model.onnx")
    tokenizer.save_pretrained(args.out / "dynamo")
    export_genai(source, args.out / "genai", "fp32")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
