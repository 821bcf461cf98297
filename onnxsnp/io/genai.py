"""onnxruntime-genai model folders: a decoder (model.onnx, maybe with external data) beside
genai_config.json, the tokenizer and other files. A folder in gives a folder out: the pruned
decoder under the same file name, every other file copied, and genai_config.json telling the new
head size and head counts.

onnxruntime-genai allocates one KV buffer shape for every layer from `head_size` and
`num_key_value_heads`, keys and values alike: so for this form every attention keeps the same
heads and the same per-head width, equal for Q/K and V (`one_head_size`), and the report says so.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from ..errors import SnpError
from ..ir.graph import attribute
from ..plan import AttentionWidth, Widths
from .writing import Moves, publish, write_model_atomically

CONFIG = "genai_config.json"
NOTE = ("onnxruntime-genai folder: its KV buffers take one head size for keys and values in every layer, so every "
        "attention keeps the same heads and the same per-head width for Q/K and V")


@dataclass(frozen=True)
class GenaiFolder:
    folder: Path
    config: dict

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    @property
    def model_file(self) -> Path:
        return self.folder / self.decoder["filename"]


def genai_folder(path: str | os.PathLike) -> GenaiFolder | None:
    """The onnxruntime-genai folder at `path`, or None where `path` is not one."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return None
    try:
        config = json.loads((path / CONFIG).read_text())
        config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnpError(f"{path / CONFIG} is not an onnxruntime-genai config ({type(exc).__name__})") from None
    return GenaiFolder(path, config)


def one_head_size(widths: Widths) -> Widths:
    """Every attention with the largest heads count and per-head width any of them keeps, Q/K and V alike."""
    if not widths.attention:
        return widths
    heads = max(w.heads for w in widths.attention.values())
    size = max(max(w.qk, w.v) for w in widths.attention.values())
    return replace(widths, attention={name: AttentionWidth(heads, size, size) for name in widths.attention})


def pruned_config(source: GenaiFolder, model: onnx.ModelProto) -> dict:
    """genai_config.json for the pruned decoder: the head size and head counts its KV cache inputs
    and attention ops now declare (one of each, or onnxruntime-genai could not load it)."""
    decoder = source.decoder
    caches = {tuple(d.dim_value for d in i.type.tensor_type.shape.dim)[1::2] for i in model.graph.input
              if i.name.startswith("past")}
    heads = {attribute(n, "num_heads") for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    if len(caches) != 1 or len(heads) > 1:
        raise SnpError("the pruned attentions differ in head size or heads, which onnxruntime-genai cannot load")
    (kv_heads, size), = caches
    if not kv_heads or not size:
        return source.config
    query_heads = heads.pop() if heads else kv_heads * decoder["num_attention_heads"] // decoder["num_key_value_heads"]
    config = json.loads(json.dumps(source.config))
    config["model"]["decoder"].update(head_size=size, num_attention_heads=query_heads, num_key_value_heads=kv_heads)
    return config


def write_folder(source: GenaiFolder, target: Path, model: onnx.ModelProto, config: dict, external_data: bool,
                 written: list[Path] | None = None) -> None:
    """The pruned folder at `target` (which must not exist, or be an empty folder), written beside
    it first and moved into place only when complete."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SnpError(f"output folder {target} exists and is not empty")

    def stage(staging: Path) -> Moves:
        folder = staging / target.name
        folder.mkdir()
        _fill(folder, source, model, config, external_data)
        return [(folder, target)]  # a rename replaces an empty folder at `target`

    publish(target, stage, written)


def _fill(staging: Path, source: GenaiFolder, model: onnx.ModelProto, config: dict, external_data: bool) -> None:
    decoder = source.decoder["filename"]
    data = {t.external_data[0].value for t in _external(source.model_file)}  # the source's own weight files
    for item in source.folder.iterdir():
        if item.name in ({decoder, CONFIG} | data) or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    write_model_atomically(model, staging / decoder, external_data)
    (staging / CONFIG).write_text(json.dumps(config, indent=4) + "\n")


def _external(path: Path) -> list[onnx.TensorProto]:
    model = onnx.load(str(path), load_external_data=False)
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL and t.external_data]
