"""Test images drawn with Pillow (shapes and gradients, so that resizing and cropping show), and
their encodings."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def drawn(width: int = 70, height: int = 50, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """An image with a gradient, an ellipse and a line, different for each seed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = (x * rng.random(3) + y * rng.random(3)) % 256
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.ellipse((width // 10, height // 10, width * 3 // 4, height * 2 // 3), fill=color)
    draw.line((0, height, width, 0), fill=(255, 255, 255), width=3)
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        return rgba
    return image.convert(mode) if mode != "RGB" else image


def encoded(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()
