"""Small PyTorch transformer modules used to build test and demo ONNX models.

timm imports torchvision, which does not load beside the CPU torch wheel used here, so this
file re-creates timm's VisionTransformer layout (fused qkv Linear reshaped to (B, N, 3, H, d),
permuted and unbound; manual or scaled_dot_product_attention) with the same parameter names
and dimensions. Only tools/ and tests/ import it: the onnxsnp package never needs torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = False):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, fused_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm-style ViT/DeiT: class token, learned position embedding, pre-norm blocks."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, fused_attn: bool = False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, fused_attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


class WrittenOutLayerNorm(nn.Module):
    """LayerNorm as arithmetic (the exporter writes ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul, Add),
    as DINOv2-style code that normalises by hand exports."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        x = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight + self.bias


class LayerScale(nn.Module):
    """DINOv2's learned per-channel scale of a sub-block's output."""

    def __init__(self, dim: int, init: float = 0.5):
        super().__init__()
        self.gamma = nn.Parameter(init * (1 + 0.2 * torch.randn(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DinoBlock(Block):
    """A DINOv2-shaped block: written-out LayerNorms and LayerScale after attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, fused_attn: bool = False):
        super().__init__(dim, num_heads, mlp_ratio, fused_attn)
        self.norm1, self.norm2 = WrittenOutLayerNorm(dim), WrittenOutLayerNorm(dim)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(VisionTransformer):
    """VisionTransformer with DinoBlocks and a written-out final norm (DINOv2's layout, small)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim, heads = self.pos_embed.shape[-1], self.blocks[0].attn.num_heads
        fused = self.blocks[0].attn.fused_attn
        self.blocks = nn.Sequential(*[DinoBlock(dim, heads, fused_attn=fused) for _ in range(len(self.blocks))])
        self.norm = WrittenOutLayerNorm(dim)


DEIT_CONFIGS = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def export_legacy(model: nn.Module, args: tuple, path: str, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict | None = None, opset: int = 17) -> None:
    """torch.onnx.export with the legacy (TorchScript) exporter, as most deployed files were made."""
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, args, path, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


class HFEncoder(nn.Module):
    """Wraps a transformers encoder so that torch.onnx.export sees plain positional inputs."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...] = ("last_hidden_state",)):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        values = tuple(getattr(out, name) for name in self.outputs)
        return values if len(values) > 1 else values[0]


def tiny_bert(attn_implementation: str = "eager", layers: int = 2, hidden: int = 32, heads: int = 4,
              intermediate: int = 64, vocab: int = 100, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     max_position_embeddings=64, attn_implementation=attn_implementation)
    return BertModel(cfg).eval()
