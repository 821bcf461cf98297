"""The QK-norm statistic alone, on Gemma 3 270M in torch (transformers, the real-decoder bench's float
source folder): every layer's q/k keep the same share of rotary pairs — the pairs whose post-norm q
and k carry the most energy on the calibration windows (one choice for all variants) — and each
head's RMSNorm is then computed

- `exact`: over all d dims, the removed ones zeroed after the norm (the unattainable reference: the
  removed dims' values are what the cut saves computing);
- `sliced`: over the kept dims (what the pruned graph does with `--qk-norm-cut sliced`);
- `calibrated`: over the kept dims, γ times √(mean ms_kept/ms_full) per head over the calibration
  tokens (`--qk-norm-cut calibrated`'s factor, compensate/qk_norm.py);
- `affine`: over the kept dims, then ms_full estimated per head as a·ms_kept + b, a and b fitted by
  least squares on a second pass over the calibration windows (b ≥ 0; a graph could take it exactly
  as γ/√a and a per-head ε' = (b + ε)/a). Measured worse than `calibrated`, so not built.

No refit, no Q/K rescale: this isolates what the norm's changed statistic costs and what the
factor wins back. Held-out perplexity and next-token agreement with the original → stdout.

    python tools/probe_qk_norm_statistic.py --source build/real/gemma3/source [--calibration 8] [--heldout 8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench_real_decoders import WINDOW, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--ratios", default="0.25,0.5")
    args = parser.parse_args()
    import torch
    import transformers as T
    from tokenizers import Tokenizer

    from onnxsnp.data.calib_text import stream_windows

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(args.source / "tokenizer.json"))
    calibration_texts, heldout_texts = texts()
    calibration = torch.tensor(stream_windows(tokenizer, calibration_texts, WINDOW, args.calibration))
    heldout = torch.tensor(stream_windows(tokenizer, heldout_texts, WINDOW, args.heldout))
    model = T.AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    norms = [(layer.self_attn.q_norm, layer.self_attn.k_norm) for layer in model.model.layers]
    d = model.config.head_dim
    state: dict = {"mode": None}

    def hook(index: int, part: int):
        def forward(module, inputs, output):
            x = inputs[0].float()  # (B, heads, T, d)
            mode = state["mode"]
            if mode == "gather":
                post = output.float().pow(2)
                pairs = post[..., :d // 2] + post[..., d // 2:]  # rotary pairs (j, j + d/2): a rotation keeps their norm
                state["energy"][index][part] += pairs.sum(dim=(0, 2)).double()
                share = x.pow(2) / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30)  # Σ_t x_j²/ms_full
                state["share"][index][part] += share.sum(dim=(0, 2)).double()
                state["tokens"][index][part] += x.shape[0] * x.shape[2]
                return None
            if mode is None:
                return None
            if mode == "fit":
                kept = state["kept"][index]
                ms_full = x.pow(2).mean(-1).double()  # (B, H, T)
                ms_kept = ((x * kept).pow(2).sum(-1) / kept.sum()).double()
                sums = state["sums"][index][part]
                for key, value in (("kk", ms_kept * ms_kept), ("kf", ms_kept * ms_full), ("k", ms_kept),
                                   ("f", ms_full), ("n", torch.ones_like(ms_kept))):
                    sums[key] = sums.get(key, 0) + value.sum(dim=(0, 2))
                return None
            kept = state["kept"][index]  # (d,) bool
            weight = 1.0 + module.weight.float()
            if mode == "exact":
                return (output.float() * kept).type_as(output)
            xk = x * kept
            ms = xk.pow(2).sum(-1, keepdim=True) / kept.sum()
            y = xk * torch.rsqrt(ms + module.eps) * weight
            if mode == "calibrated":
                y = y * state["factor"][index][part].view(1, -1, 1, 1)
            if mode == "affine":
                a, b = state["affine"][index][part]
                y = xk * torch.rsqrt(a.view(1, -1, 1, 1) * ms + b.view(1, -1, 1, 1) + module.eps) * weight
            return y.type_as(output)
        return forward

    for index, (q_norm, k_norm) in enumerate(norms):
        q_norm.register_forward_hook(hook(index, 0))
        k_norm.register_forward_hook(hook(index, 1))

    state.update(mode="gather", energy=[[0.0, 0.0] for _ in norms], share=[[0.0, 0.0] for _ in norms],
                 tokens=[[0, 0] for _ in norms])
    with torch.no_grad():
        for window in calibration:
            model(window[None])

    def scores(ids):
        picked, best = [], []
        with torch.no_grad():
            for window in ids:
                logits = model(window[None]).logits[0, :-1].double()
                log_probs = torch.log_softmax(logits, -1)
                picked.append(log_probs.gather(-1, window[1:, None])[:, 0].numpy())
                best.append(logits.argmax(-1).numpy())
        return np.concatenate(picked), np.concatenate(best)

    state["mode"] = None
    reference_picked, reference = scores(heldout)
    base = float(np.exp(-reference_picked.mean()))
    print(f"calibration {len(calibration)} windows, held-out {len(heldout)} windows of {WINDOW} tokens")
    print("| Q/K pairs cut | norm statistic | perplexity | × original | next-token agreement |")
    print("|---|---|---|---|---|")
    print(f"| – | – | {base:.2f} | 1.00× | 100.0 % |", flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        keep_pairs = d // 2 - int(round(ratio * d / 2))
        kept, factors = [], []
        for index in range(len(norms)):
            q_energy, k_energy = state["energy"][index]
            score = q_energy.sum(0) * k_energy.sum(0)  # (d/2,): every query head reads the one key head
            pairs = torch.argsort(score, descending=True)[:keep_pairs]
            mask = torch.zeros(d)
            mask[pairs] = 1
            mask[pairs + d // 2] = 1
            kept.append(mask)
            factors.append([torch.sqrt((share * mask.double()).sum(-1) / (mask.sum() * tokens)).float()
                            for share, tokens in zip(state["share"][index], state["tokens"][index])])
        state.update(kept=kept, factor=factors, mode="fit", sums=[[{}, {}] for _ in norms])
        with torch.no_grad():
            for window in calibration:
                model(window[None])
        affine = []
        for index in range(len(norms)):
            pair = []
            for sums in state["sums"][index]:
                n, k, f, kk, kf = sums["n"], sums["k"], sums["f"], sums["kk"], sums["kf"]
                det = n * kk - k * k
                a = (n * kf - k * f) / det
                b = (f - a * k) / n
                b = torch.clamp(b, min=0.0)
                a = torch.where(b > 0, a, kf / kk)  # through the origin where the offset would go negative
                pair.append((a.float(), b.float()))
            affine.append(pair)
        state["affine"] = affine
        for mode in ("exact", "sliced", "calibrated", "affine"):
            state["mode"] = mode
            picked, best = scores(heldout)
            value = float(np.exp(-picked.mean()))
            print(f"| {ratio:.0%} | {mode} | {value:.2f} | {value / base:.3f}× | {float((best == reference).mean()):.1%} |",
                  flush=True)
        print(f"mean factor (q, k) over layers at {ratio:.0%}: "
              f"{np.mean([f[0].mean().item() for f in factors]):.3f}, {np.mean([f[1].mean().item() for f in factors]):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
