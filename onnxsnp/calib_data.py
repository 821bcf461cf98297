"""Calibration from the data people have: a text file or an image folder, turned into the arrays
`prune(..., calib=dict)` takes, with the model's own tokenizer or image preprocessing.

Inputs the data does not provide (token type ids, position ids, masks) are filled in by
`calibration.validate_calibration`, with a warning."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import calib_images, calib_text
from .calib_images import ImageCalibration, ImageInput
from .calib_text import TextCalibration
from .calibration import _vocabulary_size, input_specs
from .graph import ModelGraph

__all__ = ["ImageCalibration", "RawCalibration", "TextCalibration", "load_raw_calibration"]


@dataclass(frozen=True)
class RawCalibration:
    arrays: dict[str, np.ndarray]  # keyed by model input name, first axis = samples
    label: str  # where the samples came from and how they were made, for the report


def load_raw_calibration(model_path: str | Path, g: ModelGraph, request: TextCalibration | ImageCalibration,
                         samples: int, seed: int) -> RawCalibration:
    """Up to `samples` texts or images (a seeded random choice, in file order, where there are
    more), made into model inputs. Raises SnpError, with one line, for anything that does not fit."""
    specs = input_specs(g)
    model_path = Path(model_path)
    if isinstance(request, TextCalibration):
        ids_input = calib_text.TokenInputs.of(specs).ids.name
        texts = choose(calib_text.read_texts(request.path, request.field), samples, seed)
        tokenizer = calib_text.find_tokenizer(model_path, request.tokenizer)
        arrays = calib_text.tokenize(request, tokenizer, texts, specs, _vocabulary_size(g, ids_input))
        return RawCalibration(arrays, f"{request.path}, tokenizer {tokenizer}")
    calib_images.require_pillow()
    image_input = ImageInput.of(specs)
    files = choose(calib_images.image_files(request.folder), samples, seed)
    pre = calib_images.preprocessing_for(model_path, request, image_input)
    pixels = calib_images.load_images(request.folder, pre, image_input, files)
    return RawCalibration({image_input.spec.name: pixels}, f"{request.folder}: {pre.describe()}")


def choose(items: list, samples: int, seed: int) -> list:
    """All items, or `samples` of them drawn at random (seeded), kept in their order."""
    if len(items) <= samples:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=samples, replace=False))
    return [items[i] for i in keep]
