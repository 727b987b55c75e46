"""An image model's processor steps, as its `preprocessor_config.json` states them and Hugging
Face's image processors (ViT, CLIP) apply them: resize (to height x width, or the shortest edge
to a length, keeping the aspect ratio) with the configured resampling, center crop, rescale,
normalise, channels first. Written with Pillow and numpy: transformers 5's processors want
torchvision, which does not load beside the CPU torch here; tests hold these steps to the
processors' PIL backend within 1e-5."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CONFIG_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageProcessor:
    """The steps for one model; `__call__` turns an RGB image into pixel_values [3, H, W]."""

    size: dict[str, int]
    """{"height", "width"} or {"shortest_edge"}."""
    resample: Image.Resampling = Image.Resampling.BILINEAR
    crop_size: dict[str, int] | None = None
    """{"height", "width"} of the center crop; None: no crop."""
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def load(cls, folder: Path) -> ImageProcessor:
        """The processor of a model folder; ValueError says what its config lacks."""
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"the model has no {CONFIG_FILE} (save it with its image processor)")
        return cls.from_config(json.loads(path.read_text()))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessor:
        size = config.get("size") or {}
        if isinstance(size, int):  # older configs: one number for a square
            size = {"height": size, "width": size}
        if not ({"height", "width"} <= size.keys() or "shortest_edge" in size):
            raise ValueError(f"{CONFIG_FILE}: size needs height and width, or shortest_edge")
        crop = config.get("crop_size") if config.get("do_center_crop") else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        normalize = config.get("do_normalize", True)
        return cls(
            size=size,
            resample=Image.Resampling(config.get("resample", Image.Resampling.BILINEAR)),
            crop_size=crop,
            rescale_factor=config.get("rescale_factor", 1 / 255)
            if config.get("do_rescale", True)
            else None,
            image_mean=tuple(config.get("image_mean", (0.5,) * 3)) if normalize else None,
            image_std=tuple(config.get("image_std", (0.5,) * 3)),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel_values this processor makes."""
        box = self.crop_size or self.size
        return box["height"], box["width"]

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.resize(self._resized_size(image), resample=self.resample)
        if self.crop_size:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
        pixels = np.asarray(image, dtype=np.float64)  # [H, W, 3]
        if self.rescale_factor is not None:
            pixels = pixels * self.rescale_factor
        if self.image_mean is not None:
            pixels = (pixels - np.asarray(self.image_mean)) / np.asarray(self.image_std)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def _resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) for Pillow. The shortest edge becomes its length and the other edge
        keeps the ratio, truncated, as Hugging Face computes it."""
        if "shortest_edge" not in self.size:
            return self.size["width"], self.size["height"]
        edge = self.size["shortest_edge"]
        width, height = image.size
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """The middle `height` x `width`; an image smaller than that is padded with black around
    it, as Hugging Face pads (its top and left offsets rounded the same way)."""
    top = (image.height - height) // 2
    left = (image.width - width) // 2
    if top >= 0 and left >= 0:
        return image.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (max(width, image.width), max(height, image.height)))
    pad_top = -(-(canvas.height - image.height) // 2)
    pad_left = -(-(canvas.width - image.width) // 2)
    canvas.paste(image, (pad_left, pad_top))
    top, left = top + pad_top, left + pad_left
    return canvas.crop((left, top, left + width, top + height))
