"""Decoding encoded images one way everywhere (filter scoring, trainer data preparation, collators).

Every image is turned into an upright 8-bit RGB picture: 16-bit and other modes are mapped to 8 bits
by value (not clipped, which turns a 16-bit PNG white), transparency is composited onto white, the
EXIF orientation is applied, and a decompression bomb is refused before its pixels are read. With
``min_size`` the image is shrunk towards the size its consumer needs as soon as it is decoded (JPEG:
the decoder's own 1/2-1/8 scaling; other formats: ``Image.reduce`` right after decoding), so a batch
holds small pictures rather than full-resolution ones and memory does not grow with batch x source pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Why an image cannot be used; these names are the drop reasons counted in reports.
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold (about 89M pixels)
DECODER_VERSION = 2  # bump when decoding changes pixels: stored margins are then rescored

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``reason`` is ``undecodable_image`` or ``image_too_large``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}"[:200])
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by value: 16-bit grey scaled by 255/65535, transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(data: bytes, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image whose header ``data`` starts with, not yet decoded; ``ImageDecodeError`` with the reason when
    the header does not parse or the image has more than ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a reason
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(IMAGE_TOO_LARGE, str(error)) from error
    except Exception as error:
        raise ImageDecodeError(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from error
    if max_pixels and image.width * image.height > max_pixels:
        raise ImageDecodeError(
            IMAGE_TOO_LARGE, f"{image.width}x{image.height} pixels is above the limit of {max_pixels} pixels"
        )
    return image


def decode_image(data: bytes, min_size: int | None = None, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> upright 8-bit RGB, reduced towards ``min_size`` if given.

    With ``min_size``, both sides stay at least ``min_size`` (JPEG: decoded in draft mode at 1/2, 1/4 or
    1/8 scale; others: ``Image.reduce`` by the largest integer factor that keeps them there). Raises
    ``ImageDecodeError`` (a ValueError) with the reason when the bytes do not decode or the image has
    more than ``max_pixels`` pixels.
    """
    image = open_image(data, max_pixels)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if min_size and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        image.load()  # decodes every pixel: truncated data fails here, not in a later step
        image = to_rgb(image)
        if min_size and min(image.size) >= 2 * min_size:
            image = image.reduce(min(image.size) // min_size)
        if orientation != 1:
            image.getexif()[_EXIF_ORIENTATION] = orientation
            image = ImageOps.exif_transpose(image)
    except Exception as error:  # truncated or corrupt data
        raise ImageDecodeError(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from error
    return image
