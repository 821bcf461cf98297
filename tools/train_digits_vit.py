"""Train a small ViT on scikit-learn's 8x8 digits and export it as the shipped demo ONNX model.

The digits are upsampled to 32x32 and standardized with the training split's mean/std; the
exported model takes that already-normalized tensor (``pixel_values``, N x 1 x 32 x 32, float32)
and returns ``logits``. The held-out split is saved, normalized, next to the model so that
tools/eval_digits.py can score pruned variants without torch or scikit-learn preprocessing.

    /work/venv/bin/python tools/train_digits_vit.py [--out-dir models] [--epochs 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from harness import MODELS
from torch_models import VisionTransformer, export_legacy

IMG_SIZE = 32
MAX_SHIFT = 2  # pixels at 32x32, i.e. half a source pixel: enough jitter without cropping strokes


def upsample(images_8x8: np.ndarray) -> torch.Tensor:
    """(N, 64) raw digits in 0..16 -> (N, 1, 32, 32) in 0..1."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)


def random_shift(batch: torch.Tensor, background: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels, filling the exposed border with background."""
    padded = F.pad(batch, [MAX_SHIFT] * 4, value=background)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (batch.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + IMG_SIZE, dx:dx + IMG_SIZE]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def build_model() -> VisionTransformer:
    return VisionTransformer(img_size=IMG_SIZE, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=4, fused_attn=False)


def train(model: VisionTransformer, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int,
          background: float, generator: torch.Generator, batch_size: int = 64) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, pct_start=0.1,
                                                   total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for start in range(0, len(x_train), batch_size):
            idx = order[start:start + batch_size]
            inputs = random_shift(x_train[idx], background, generator)
            loss = F.cross_entropy(model(inputs), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total_loss / len(x_train):.4f}", flush=True)


def onnx_accuracy(path: Path, pixel_values: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixel_values": pixel_values})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=MODELS)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    digits = load_digits()
    train_raw, test_raw, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=0)
    x_train, x_test = upsample(train_raw), upsample(test_raw)
    # Scalar statistics from the training split only, so the held-out set stays unseen.
    mean, std = x_train.mean().item(), x_train.std().item()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    background = (0.0 - mean) / std  # a blank pixel after normalization

    model = build_model()
    started = time.perf_counter()
    train(model, x_train, torch.from_numpy(y_train).long(), args.epochs, background, generator)
    train_seconds = time.perf_counter() - started

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "digits_vit.onnx"
    data_path = args.out_dir / "digits_vit_heldout.npz"
    calib_path = args.out_dir / "digits_vit_calib.npz"
    export_legacy(model, (x_test[:2],), str(model_path), ["pixel_values"], ["logits"],
                  {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, opset=17)
    pixel_values = x_test.numpy().astype(np.float32)
    labels = y_test.astype(np.int64)
    # mean/std ride along so raw 8x8 digits can be normalized the same way later.
    np.savez_compressed(data_path, pixel_values=pixel_values, labels=labels,
                        mean=np.float32(mean), std=np.float32(std))

    # Calibration images for onnxsnp come from the training split, so held-out accuracy stays honest.
    calib_rows = np.random.default_rng(args.seed).permutation(len(x_train))[:128]
    np.savez_compressed(calib_path, pixel_values=x_train.numpy()[calib_rows].astype(np.float32))

    accuracy = onnx_accuracy(model_path, pixel_values, labels)
    print(f"train time {train_seconds:.1f} s ({args.epochs} epochs, {len(x_train)} samples)")
    print(f"normalization mean {mean:.6f} std {std:.6f}")
    print(f"held-out top-1 (onnxruntime) {accuracy:.4f} on {len(labels)} samples")
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes), "
          f"{data_path} ({data_path.stat().st_size} bytes), {calib_path} ({calib_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
