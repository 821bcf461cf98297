"""Calibration arrays from a folder of JPEG/PNG images, preprocessed as the model expects.

The steps are those of Hugging Face image processors, in their order — resize (Pillow, with the
processor's resampling filter), center crop, rescale, normalize, channels first — read from a
`preprocessor_config.json` beside the model; flags override any of them. Without a config the
images are resized to the model's input size, scaled to [0, 1] and normalized with the ImageNet
mean and std (with a warning)."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np

from .calibration import InputSpec
from ..errors import SnpError

CONFIG_FILE = "preprocessor_config.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLING = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # Pillow's codes
# processors whose integer `size` means the shortest edge (Hugging Face: default_to_square=False)
_SHORTEST_EDGE_TYPES = ("CLIP", "ChineseCLIP", "Bit", "MobileNetV1", "MobileNetV2", "ConvNext", "Owlv")
_CONVNEXT_FULL_CROP = 384  # ConvNext: from this size on, resize straight to a square without crop_pct


class ResizeKind(Enum):
    EXACT = "exact"  # to height × width
    SHORTEST_EDGE = "shortest edge"  # the shorter side to `height`, aspect kept (capped by `longest`)


@dataclass(frozen=True)
class Resize:
    kind: ResizeKind
    height: int
    width: int
    longest: int | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of the given size after this resize."""
        if self.kind is ResizeKind.EXACT:
            return self.width, self.height
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.height, int(self.height * long / short)
        if self.longest is not None and new_long > self.longest:
            new_short, new_long = int(self.longest * new_short / new_long), self.longest
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def describe(self) -> str:
        if self.kind is ResizeKind.EXACT:
            return f"resize {self.height}x{self.width}"
        return f"resize shortest edge {self.height}" + (f" (longest <= {self.longest})" if self.longest else "")


@dataclass(frozen=True)
class Preprocessing:
    """Each step or None where it is skipped; `source` says where the settings came from."""
    resize: Resize | None
    crop: tuple[int, int] | None  # height, width
    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    resample: int
    source: str

    def describe(self) -> str:
        steps = [self.resize.describe() if self.resize else "",
                 f"center crop {self.crop[0]}x{self.crop[1]}" if self.crop else "",
                 f"scale {self.scale:.6g}" if self.scale is not None else "",
                 f"mean {_floats(self.mean)} std {_floats(self.std)}" if self.mean is not None else ""]
        return f"{', '.join(s for s in steps if s) or 'no preprocessing'} ({self.source})"

    def apply(self, image, mode: str) -> np.ndarray:
        """A Pillow image → float32 (height, width, channels)."""
        image = image.convert(mode)
        if self.resize is not None:
            image = image.resize(self.resize.output_size(*image.size), resample=self.resample)
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        if self.scale is not None:
            pixels = pixels * self.scale
        pixels = pixels.astype(np.float32)
        if self.mean is not None:
            pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return pixels


@dataclass(frozen=True)
class ImageCalibration:
    """`--calib-images` and the preprocessing flags; a flag left None keeps the config's value."""
    folder: Path
    resize: Resize | None = None
    crop: tuple[int, int] | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resample: str | None = None


def _floats(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Hugging Face's center_crop: the middle (rounding the offset down), zero-padded where the
    image is smaller than the crop."""
    rows, cols = pixels.shape[:2]
    if rows < height or cols < width:
        padded = np.zeros((max(rows, height), max(cols, width), pixels.shape[2]), pixels.dtype)
        top, left = (padded.shape[0] - rows) // 2, (padded.shape[1] - cols) // 2
        padded[top:top + rows, left:left + cols] = pixels
        pixels, rows, cols = padded, *padded.shape[:2]
    top, left = (rows - height) // 2, (cols - width) // 2
    return pixels[top:top + height, left:left + width]


def parse_size(text: str, option: str, exact_only: bool = False) -> Resize:
    """`N` (shortest edge N; a square N×N for a crop) or `HxW`."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise SnpError(f"{option} must be N or HxW with positive integers, got {text!r}")
    if len(values) == 2:
        return Resize(ResizeKind.EXACT, values[0], values[1])
    return Resize(ResizeKind.EXACT if exact_only else ResizeKind.SHORTEST_EDGE, values[0], values[0])


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(np.isfinite(values)):
        raise SnpError(f"{option} must be one number or a comma-separated list, got {text!r}")
    return values


def read_config(path: Path) -> Preprocessing:
    """A Hugging Face `preprocessor_config.json` as preprocessing steps."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnpError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise SnpError(f"{path} is not a JSON object")
    try:
        return _from_config(config, path.name)
    except (TypeError, ValueError, KeyError) as exc:
        raise SnpError(f"{path}: cannot read the image preprocessing ({type(exc).__name__}: {exc})") from None


def _from_config(config: dict, source: str) -> Preprocessing:
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    resize = _config_size(config["size"], kind.startswith(_SHORTEST_EDGE_TYPES)) \
        if config.get("do_resize", True) and "size" in config else None
    crop = None
    if config.get("do_center_crop", "crop_size" in config) and "crop_size" in config:
        crop_size = _config_size(config["crop_size"], False)
        crop = (crop_size.height, crop_size.width)
    if kind.startswith("ConvNext") and resize is not None and resize.kind is ResizeKind.SHORTEST_EDGE:
        edge = resize.height  # ConvNext: resize to edge / crop_pct, then crop edge × edge
        if edge < _CONVNEXT_FULL_CROP:
            resize, crop = replace(resize, height=int(edge / config.get("crop_pct", 224 / 256))), (edge, edge)
        else:
            resize = Resize(ResizeKind.EXACT, edge, edge)
    scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
    mean = std = None
    if config.get("do_normalize", True):
        mean = _as_tuple(config.get("image_mean", 0.5))
        std = _as_tuple(config.get("image_std", 0.5))
    return Preprocessing(resize, crop, scale, mean, std, int(config.get("resample", RESAMPLING["bilinear"])), source)


def _config_size(size, shortest_edge_default: bool) -> Resize:
    if isinstance(size, int):
        kind = ResizeKind.SHORTEST_EDGE if shortest_edge_default else ResizeKind.EXACT
        return Resize(kind, size, size)
    if "height" in size and "width" in size:
        return Resize(ResizeKind.EXACT, int(size["height"]), int(size["width"]))
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        longest = size.get("longest_edge")
        return Resize(ResizeKind.SHORTEST_EDGE, edge, edge, int(longest) if longest else None)
    raise ValueError(f"size {size!r} is not height/width or shortest_edge")


def _as_tuple(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


@dataclass(frozen=True)
class ImageInput:
    """The model's image input: its name, layout and the size it fixes (None where dynamic)."""
    spec: InputSpec
    channels: int
    height: int | None
    width: int | None
    channels_last: bool

    @classmethod
    def of(cls, specs: list[InputSpec]) -> ImageInput:
        images = [s for s in specs if s.dtype.kind == "f" and len(s.shape) == 4]
        if len(images) != 1 or len(specs) != 1:
            raise SnpError("--calib-images needs a model with one input, a 4-D float image; this one takes "
                           f"{', '.join(f'{s.name} {s.dtype}{_dims(s.shape)}' for s in specs)}")
        spec = images[0]
        dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
        channels_last = dims[1] not in (1, 3) and dims[3] in (1, 3)
        channels, height, width = (dims[3], dims[1], dims[2]) if channels_last else dims[1:]
        channels = channels or 3
        if channels not in (1, 3):
            raise SnpError(f"image input {spec.name!r} {_dims(spec.shape)} has {channels} channels; "
                           "images give 1 (grayscale) or 3 (RGB)")
        return cls(spec, channels, height, width, channels_last)


def _dims(shape: tuple) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


def preprocessing_for(model_path: Path, request: ImageCalibration, image_input: ImageInput) -> Preprocessing:
    """The config beside the model (or defaults), with the flags laid over it, checked against the model."""
    config = model_path.parent / CONFIG_FILE
    if config.is_file():
        base = read_config(config)
    else:
        if image_input.height is None or image_input.width is None:
            size = None
        else:
            size = Resize(ResizeKind.EXACT, image_input.height, image_input.width)
        base = Preprocessing(size, None, 1 / 255, IMAGENET_MEAN, IMAGENET_STD, RESAMPLING["bilinear"], "defaults")
        if not any((request.mean, request.std, request.scale)):
            warnings.warn(f"no {CONFIG_FILE} beside the model: images scaled to [0, 1] and normalized with the "
                          "ImageNet mean/std; set --image-mean/--image-std/--image-scale if the model expects "
                          "other values", UserWarning, stacklevel=3)
    flags = {"resize": request.resize, "crop": request.crop, "scale": request.scale, "mean": request.mean,
             "std": request.std,
             "resample": RESAMPLING[request.resample] if request.resample is not None else None}
    given = {k: v for k, v in flags.items() if v is not None}
    pre = replace(base, **given, source=base.source + (" and flags" if given else "")) if given else base
    return _checked(pre, image_input)


def _checked(pre: Preprocessing, image_input: ImageInput) -> Preprocessing:
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if values is not None and len(values) not in (1, image_input.channels):
            raise SnpError(f"image {name} has {len(values)} values but the model's input has "
                           f"{image_input.channels} channel(s)")
    if pre.std is not None and min(pre.std) == 0:
        raise SnpError("image std must not be 0")
    if pre.crop is None and (pre.resize is None or pre.resize.kind is not ResizeKind.EXACT):
        if image_input.height is None or image_input.width is None:
            raise SnpError("the model's image size is dynamic; give --image-size HxW (or --image-crop) so that "
                           "all images come out the same size")
    return pre


def load_images(folder: Path, pre: Preprocessing, image_input: ImageInput, files: list[Path]) -> np.ndarray:
    """The chosen files, preprocessed, as the model's input array."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if image_input.channels == 3 else "L"
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                arrays.append(pre.apply(image, mode))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
            raise SnpError(f"cannot read image {path} ({type(exc).__name__})") from None
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise SnpError(f"images in {folder} come out in different sizes ({shown}) after {pre.describe()}; "
                       "give --image-size HxW or --image-crop")
    height, width = sizes.pop()
    want = (image_input.height or height, image_input.width or width)
    if (height, width) != want:
        raise SnpError(f"images come out {height}x{width} after {pre.describe()}, but the model takes "
                       f"{want[0]}x{want[1]}")
    batch = np.stack(arrays)
    return batch if image_input.channels_last else batch.transpose(0, 3, 1, 2).copy()


def image_files(folder: Path) -> list[Path]:
    """JPEG and PNG files under `folder` (sub-folders too, as class folders are), in name order."""
    if not folder.is_dir():
        raise SnpError(f"calibration image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SnpError(f"no JPEG or PNG images in {folder}")
    return files


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SnpError("--calib-images needs Pillow: pip install 'onnxsnp[images]'") from None
