"""Preprocessing that travels with the model (after timm's ``PretrainedCfg`` / ``resolve_model_data_config``).

One :class:`PreprocessConfig` is written to every bundle as ``preprocess.json`` and read by every runtime:
the training loop's evaluation transform, ONNX Runtime, TensorRT, ``infer`` and ``serve`` all call the
same :class:`Preprocessor`, so the device reproduces the workstation's input exactly. It needs only
Pillow and NumPy (no torch). Resize and crop follow torchvision's ``Resize(int)`` and ``CenterCrop`` on
PIL images (Pillow's filters, the same rounding), so a torchvision eval transform and this one agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_tl.core.errors import EdgeTLError

PREPROCESS_SCHEMA_VERSION = 1

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# what a transparent pixel becomes (alpha is composited over this, the same in training and on the device)
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessConfig(BaseModel):
    """What turns a decoded image into the network's input tensor, in order:

    1. convert to RGB with :func:`to_rgb` (grayscale replicated to three channels, 16-bit scaled to 8-bit,
       alpha composited over white);
    2. resize so the shorter side is ``resize`` (aspect kept), with ``interpolation``;
    3. center-crop to ``input_size`` (H, W);
    4. scale to [0, 1] (``x * scale``), subtract ``mean``, divide by ``std`` (per channel, RGB order);
    5. reorder channels to ``channel_order`` and lay out as ``layout`` (``NCHW``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = PREPROCESS_SCHEMA_VERSION
    input_size: tuple[int, int] = Field(description="network input (height, width) after the crop")
    resize: int = Field(gt=0, description="shorter side before the center crop")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"

    @field_validator("input_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0:
            raise ValueError("input_size must be positive (height, width)")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain zeros")
        return v

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (3, self.input_size[0], self.input_size[1])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessConfig:
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise EdgeTLError(f"{path} does not exist", "point at a bundle built by `edge-tl build`") from exc
        except (ValueError, json.JSONDecodeError) as exc:
            first = str(exc).splitlines()[0]
            raise EdgeTLError(f"{path} is not a valid preprocess.json: {first}", "rebuild the bundle") from exc


def _unsupported(image: Image.Image, why: str) -> EdgeTLError:
    return EdgeTLError(f"image mode {image.mode} ({why}) is not supported",
                       "convert it to 8-bit RGB or grayscale (or 16-bit grayscale PNG)")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow opens as an 8-bit RGB image, the one conversion used by training, the golden outputs,
    ``infer`` and ``serve``; raises EdgeTLError for what has no defined conversion.

    * 16-bit grayscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs): scaled by 255/65535 (Pillow's own
      ``convert`` clips it to 255, turning almost every pixel white);
    * ``I`` from other formats and ``F`` (32-bit integer/float): refused, their range is not defined;
    * alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P`` with a transparent index):
      composited over :data:`ALPHA_BACKGROUND`;
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``, ``RGBX``: Pillow's colour conversion (``LAB``
      through LittleCMS where Pillow has no direct one).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or (mode == "I" and image.format == "PNG"):
        arr = np.asarray(image).astype(np.uint32)
        if arr.ndim != 2:
            raise _unsupported(image, "unexpected layout")
        gray = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "I":
        raise _unsupported(image, "32-bit integer pixels, range not defined")
    if mode == "F":
        raise _unsupported(image, "32-bit float pixels, range not defined")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        if mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        if mode == "LAB":
            from PIL import ImageCms

            transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                "LAB", "RGB")
            return ImageCms.applyTransform(image, transform)  # type: ignore[return-value]
        raise _unsupported(image, str(exc)) from exc


#: the longest side an image may have relative to its shorter one. Resizing keeps the aspect ratio (shorter side =
#: resize), so a 1 x 2,000,000 px PNG (2 KB) would become 32 x 64,000,000 px, about 6 GB (issue 24). 32:1 keeps
#: every camera and panorama format (a 360 degree panorama is 2:1 to 10:1) and bounds the resized image to
#: 32 x resize^2 pixels (6 MB at resize 256).
MAX_ASPECT_RATIO = 32


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of this size (from its header, before decoding) can't be preprocessed, or None."""
    if width < 1 or height < 1:
        return f"the image has no pixels ({width}x{height})"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (f"the image is {width}x{height} px, an aspect ratio of {ratio:.0f}:1, above the {MAX_ASPECT_RATIO}:1 "
                "that preprocessing accepts (resizing it would take gigabytes)")
    return None


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for an int size: shorter side = size, truncation."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


class Preprocessor:
    """Applies a :class:`PreprocessConfig`. Thread-safe (holds no mutable state)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(config.std, dtype=np.float32)).reshape(3, 1, 1)
        self._filter = _FILTERS[config.interpolation]

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Steps 1-3: RGB, resize, center crop. Returns a PIL image of exactly ``input_size``."""
        cfg = self.config
        w, h = image.size
        problem = image_size_problem(w, h)
        if problem:
            raise EdgeTLError(problem, "crop the image to the region of interest (at most "
                              f"{MAX_ASPECT_RATIO}:1) before classifying it")
        image = to_rgb(image)
        (new_w, new_h), (left, top) = self.geometry(w, h)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self._filter)
        ch, cw = cfg.input_size
        return image.crop((left, top, left + cw, top + ch))

    def geometry(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where a ``w`` x ``h`` picture goes in steps 2-3: its resized size and the crop's (left, top) corner in it
        (the crop is ``input_size``). Also maps a map over the crop back onto the picture (Grad-CAM)."""
        cfg = self.config
        new_w, new_h = _resized_size(w, h, cfg.resize)
        ch, cw = cfg.input_size
        if new_w < cw or new_h < ch:
            raise EdgeTLError(
                f"resize {cfg.resize} gives {new_w}x{new_h}, smaller than the crop {cw}x{ch}",
                "set resize >= the input size in the build spec",
            )
        return (new_w, new_h), (int(round((new_w - cw) / 2.0)), int(round((new_h - ch) / 2.0)))

    def normalize(self, rgb_hwc_uint8: np.ndarray) -> np.ndarray:
        """Steps 4-5 on an RGB HxWx3 uint8 array; returns CxHxW float32."""
        chw = rgb_hwc_uint8.transpose(2, 0, 1).astype(np.float32) * np.float32(self.config.scale)
        chw = (chw - self._mean) * self._inv_std
        if self.config.channel_order == "BGR":
            chw = chw[::-1]
        return np.ascontiguousarray(chw, dtype=np.float32)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image (PIL, or an RGB HxWx3 uint8 array) to a CxHxW float32 array."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return self.normalize(np.asarray(self.resize_crop(image)))

    def from_bgr(self, frame: np.ndarray) -> np.ndarray:
        """An OpenCV BGR frame (HxWx3 uint8) to a CxHxW float32 array."""
        return self(np.ascontiguousarray(frame[:, :, ::-1]))

    def batch(self, images: list[Image.Image | np.ndarray]) -> np.ndarray:
        """Several images to one NxCxHxW float32 batch."""
        return np.stack([self(img) for img in images]) if images else np.zeros((0, *self.config.input_shape),
                                                                                dtype=np.float32)

    def open(self, path: str | Path) -> np.ndarray:
        """Decode and preprocess an image file."""
        with Image.open(path) as img:
            img.load()
            return self(img)
