"""Stage 1: read an ONNX file (with its external data) into memory, with clear errors."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import SnpError
from ..ir import external
from ..ir.sizes import raw_bytes


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external_data: bool  # the file kept its weights in separate data files
    files: frozenset[Path]  # the model file and its external data files, resolved

# protobuf cannot serialise a message of 2 GiB or more: bigger models go through files with
# external data (a margin is kept for the graph itself)
PROTOBUF_LIMIT = 2**31 - 2**26


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(raw_bytes(t) for t in model.graph.initializer)


def is_big(model: onnx.ModelProto) -> bool:
    """Too big to serialise as one protobuf."""
    return weight_bytes(model) >= PROTOBUF_LIMIT


@contextmanager
def model_file(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` saved in a temporary folder (weights as external data), for tools that need a path."""
    with tempfile.TemporaryDirectory(prefix="onnxsnp-") as folder:
        path = Path(folder) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data empties the tensors it writes out
        external.materialize(copy)  # onnx's writer would write a stub still in its file as empty
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        del copy
        yield path


def load_model(path: str | os.PathLike, lazy: bool = False) -> LoadedModel:
    """Load `path` and its external data. Raises SnpError for anything that is not a usable model.

    `lazy`: a float model's external weights stay in their file, read where asked for
    (ir/external.py): the prune's stages decode what they use from there, and the protobuf no
    longer holds a copy of every weight for the whole run. Models with quantized operators are
    read whole (their views read initializers directly)."""
    path = Path(path)
    if not path.exists():
        raise SnpError(f"input file not found: {path}")
    if not path.is_file():
        raise SnpError(f"input is not a file: {path}")
    if path.stat().st_size == 0:
        raise SnpError(f"input file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise SnpError(f"{path} is not an ONNX model or is truncated ({type(exc).__name__})") from None
    except Exception as exc:  # protobuf raises a handful of internal types for garbage input
        raise SnpError(f"{path} could not be parsed as ONNX ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise SnpError(f"{path} is not an ONNX model (no graph nodes); is it truncated?")
    if not model.opset_import:
        raise SnpError(f"{path} declares no opset; it is not a valid ONNX model")
    locations = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    files = frozenset({path.resolve()} | {(path.parent / location).resolve() for location in locations})
    try:
        if lazy and locations and _float_only(model):
            _point_at_files(model, path.parent.resolve())
        else:
            onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise SnpError(f"external data of {path} could not be read: {_line(exc)}") from None
    return LoadedModel(model, path, bool(locations), files)


_QUANTIZED = ("Quant", "Integer", "QLinear", "NBits", "QOrdered", "QAttention", "QGemm", "QEmbed")


def _float_only(model: onnx.ModelProto) -> bool:
    """Standard operators only, none of them quantized (what the lazy route is checked on)."""
    return all(node.domain in ("", "ai.onnx") and not any(word in node.op_type for word in _QUANTIZED)
               for node in model.graph.node)


def _point_at_files(model: onnx.ModelProto, folder: Path) -> None:
    """Each external initializer's location made absolute (external.is_lazy's marker), after
    checking that its bytes are in the file: a missing or short file fails here, as a whole load
    would have."""
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = (folder / info["location"]).resolve()
        if folder not in location.parents:
            raise ValueError(f"{tensor.name}: external data outside the model's folder ({info['location']})")
        if location not in sizes:
            sizes[location] = location.stat().st_size  # OSError for a missing file
        end = int(info.get("offset", 0)) + int(info.get("length", raw_bytes(tensor)))
        if end > sizes[location]:
            raise ValueError(f"{tensor.name} ends past the end of {location.name}")
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(location)


def _line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
