"""Calibration from the data people have: a text file or an image folder, turned into the arrays
`prune(..., calib=dict)` takes, with the model's own tokenizer or image preprocessing.

Inputs the data does not provide (token type ids, position ids, masks) are filled in by
`calibration.validate_calibration`, with a warning."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import calib_images
from . import calib_text
from .calib_images import RESAMPLING, ImageCalibration, ImageInput, parse_floats, parse_size
from .calib_text import TextCalibration
from .calibration import _vocabulary_size, input_specs
from ..errors import SnpError
from ..ir.graph import ModelGraph
from ..option_schema import OPTIONS, Group, defaults

__all__ = ["ImageCalibration", "RawCalibration", "TextCalibration", "load_raw_calibration", "raw_request"]

TEXT_OPTIONS = tuple(spec.name for spec in OPTIONS if spec.requires == "calib_text")
IMAGE_OPTIONS = tuple(spec.name for spec in OPTIONS if spec.requires == "calib_images")
RAW_DEFAULTS = {name: value for name, value in defaults(Group.RAW).items() if value is not None}


@dataclass(frozen=True)
class RawCalibration:
    arrays: dict[str, np.ndarray]  # keyed by model input name, first axis = samples
    label: str  # where the samples came from and how they were made, for the report


def load_raw_calibration(model_path: str | Path, g: ModelGraph, request: TextCalibration | ImageCalibration,
                         samples: int | None, seed: int) -> RawCalibration:
    """Up to `samples` texts or images (a seeded random choice, in file order, where there are
    more), made into model inputs. Raises SnpError, with one line, for anything that does not fit."""
    specs = input_specs(g)
    model_path = Path(model_path)
    if isinstance(request, TextCalibration):
        ids_input = calib_text.TokenInputs.of(specs).ids.name
        texts = calib_text.read_texts(request.path, request.field)
        tokenizer = calib_text.find_tokenizer(model_path, request.tokenizer)
        if calib_text.is_language_model(specs):  # every text, `samples` windows of their token stream
            arrays = calib_text.tokenize(request, tokenizer, texts, specs, _vocabulary_size(g, ids_input), samples)
            windows, length = arrays[ids_input].shape
            return RawCalibration(arrays, f"{request.path}: {windows} windows of {length} tokens "
                                          f"({windows * length:,} tokens), tokenizer {tokenizer}")
        arrays = calib_text.tokenize(request, tokenizer, choose(texts, samples, seed), specs,
                                     _vocabulary_size(g, ids_input))
        return RawCalibration(arrays, f"{request.path}, tokenizer {tokenizer}")
    calib_images.require_pillow()
    image_input = ImageInput.of(specs)
    files = choose(calib_images.image_files(request.folder), samples, seed)
    pre = calib_images.preprocessing_for(model_path, request, image_input)
    pixels = calib_images.load_images(request.folder, pre, image_input, files)
    return RawCalibration({image_input.spec.name: pixels}, f"{request.folder}: {pre.describe()}")


def raw_request(options, flag: Callable[[str], str] = str) -> TextCalibration | ImageCalibration | None:
    """The raw-data request of options named like the command line's (`calib`, `calib_text`,
    `text_field`, …, `image_resample`; absent ones count as unset), checked: the one place that
    validates them, for the command line (`flag` spells a name as `--calib-text`) and the Olive pass."""
    def get(name: str):
        return getattr(options, name, RAW_DEFAULTS.get(name))

    given = [flag(name) for name in ("calib", "calib_text", "calib_images") if get(name)]
    if len(given) > 1:
        raise SnpError(f"give one of {' / '.join(given)}, not several")
    for needs, names in (("calib_text", TEXT_OPTIONS), ("calib_images", IMAGE_OPTIONS)):
        stray = [flag(n) for n in names if get(n) not in (None, RAW_DEFAULTS.get(n)) and not get(needs)]
        if stray:
            raise SnpError(f"{', '.join(stray)} {'apply' if len(stray) > 1 else 'applies'} only with {flag(needs)}")
    if get("calib_text"):
        if not isinstance(get("max_length"), int) or get("max_length") < 1:
            raise SnpError(f"{flag('max_length')} must be a positive integer, got {get('max_length')!r}")
        return TextCalibration(Path(get("calib_text")), get("text_field"),
                               Path(get("tokenizer")) if get("tokenizer") else None, get("max_length"))
    if not get("calib_images"):
        return None
    scale, resample = get("image_scale"), get("image_resample")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise SnpError(f"{flag('image_scale')} must be a positive number, got {scale!r}")
    if resample is not None and resample not in RESAMPLING:
        raise SnpError(f"{flag('image_resample')} must be one of {', '.join(RESAMPLING)}, got {resample!r}")
    crop = parse_size(get("image_crop"), flag("image_crop"), exact_only=True) if get("image_crop") else None
    return ImageCalibration(
        Path(get("calib_images")),
        resize=parse_size(get("image_size"), flag("image_size")) if get("image_size") else None,
        crop=(crop.height, crop.width) if crop else None, scale=scale,
        mean=parse_floats(get("image_mean"), flag("image_mean")) if get("image_mean") else None,
        std=parse_floats(get("image_std"), flag("image_std")) if get("image_std") else None,
        resample=resample)


def choose(items: list, samples: int | None, seed: int) -> list:
    """All items, or `samples` of them drawn at random (seeded), kept in their order."""
    if samples is None or len(items) <= samples:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=samples, replace=False))
    return [items[i] for i in keep]
