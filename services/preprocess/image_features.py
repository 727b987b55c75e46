"""The featurizer of image models (ViT classifiers, CLIP): each image decoded (images.py) and
put through the model's processor steps (image_processor.py), stacked as pixel_values FP32
[items, 3, H, W]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmserve.core.repository import ModelConfig
from services.preprocess.image_processor import ImageProcessor
from services.preprocess.images import ImageLimits, decode_image
from services.preprocess.media import MediaItem, in_request
from services.preprocess.settings import PreprocessSettings


class ImageFeaturizer:
    def __init__(self, processor: ImageProcessor, limits: ImageLimits) -> None:
        self.processor = processor
        self.limits = limits

    @classmethod
    def load(
        cls, config: ModelConfig, folder: Path, settings: PreprocessSettings
    ) -> ImageFeaturizer:
        limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        return cls(ImageProcessor.load(folder), limits)

    def __call__(self, items: Sequence[MediaItem]) -> dict[str, np.ndarray]:
        pixels = [self._pixels(item, in_request(i)) for i, item in enumerate(items)]
        return {"pixel_values": np.stack(pixels)}

    def _pixels(self, item: MediaItem, name: str) -> np.ndarray:
        return self.processor(decode_image(item.data, item.mime_type, self.limits, name))
