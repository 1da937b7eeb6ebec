"""Untrusted uploaded bytes -> the uint8 pixels a model takes.

Only a few common formats are opened; decompression bombs, truncated files and
tiny images are refused with :class:`~fedobj.inference.errors.ImageInputError`
(the message is for a person), and any colour mode becomes the 1 or 3 channels
the model was trained on.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedobj.inference.errors import ImageInputError

MIN_IMAGE_SIDE = 8  # below this an upload is an icon or a mistake, not a photo
# Formats devices and browsers produce ("JPEG" also opens phones' MPO files).
# Everything else (EPS would start Ghostscript, for one) is refused unopened.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def decode_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """Untrusted image bytes -> uint8 ``(channels, size, size)``.

    Raises
    ------
    ImageInputError
        Not an image in :data:`IMAGE_FORMATS`, truncated or corrupt, more pixels
        than ``PIL.Image.MAX_IMAGE_PIXELS``, or smaller than 8x8.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        # The filter only stops Pillow printing its bomb warning; the explicit size
        # check below is what refuses, because catch_warnings changes process-wide
        # state and is not thread-safe, so another thread may undo the filter.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                _check_size(img.width, img.height)
                img.load()  # decodes now, so a truncated file fails in this try
                return _to_array(ImageOps.exif_transpose(img), channels, size)
    except ImageInputError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageInputError(
            "not an image in a supported format "
            f"({', '.join(f.lower() for f in IMAGE_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"image refused as a decompression bomb: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageInputError(f"image is truncated or corrupt ({exc})") from exc


def _check_size(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageInputError(
            f"image refused as a decompression bomb: {width}x{height} pixels "
            f"exceeds the limit of {limit}"
        )
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ImageInputError(
            f"image is {width}x{height} pixels; at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed"
        )


def _to_array(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """Any Pillow mode -> "L" or "RGB", resized with antialiased bilinear."""
    img = _to_eight_bit(img)
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette and colour-key transparency as alpha
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Onto black: Fashion-MNIST objects sit on black, and training on image
        # folders converts without alpha, which shows transparent black as black.
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, 1, ... too
    # Pillow widens BILINEAR's support when shrinking, i.e. it antialiases.
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if channels == 1 else arr.transpose(2, 0, 1).copy()


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float grey -> 8-bit by scaling (Pillow's convert would clip)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # a [0, 1] float image
    else:
        return img
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # "L"
