"""Decoding an uploaded image safely: the pixel count is checked from the header, before decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.preprocess import image_size_problem, to_rgb
from edge_tl.device.serve.protocol import ProtocolError

FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB PIL image, or ProtocolError: 400 for what is not a readable image, 413 for too many pixels."""
    if not data:
        raise ProtocolError(400, "the request body is empty; send the encoded image (JPEG or PNG) as the body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProtocolError(413, f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ProtocolError(400, f"the body is not an image in a known format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # Pillow raises many types on a malformed header
        raise ProtocolError(400, f"cannot read the image header: {type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ProtocolError(413, f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                                 f"{max_pixels} (--max-image-pixels)")
    if width == 0 or height == 0:
        img.close()
        raise ProtocolError(400, f"image has no pixels ({width}x{height})")
    problem = image_size_problem(width, height)  # from the header: a thin image is refused before decoding
    if problem:
        img.close()
        raise ProtocolError(413, problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            rgb = to_rgb(img)
            return rgb.copy() if rgb is img else rgb
    except EdgeTLError as exc:  # a mode with no defined conversion to RGB (32-bit, float)
        raise ProtocolError(415, exc.one_line()) from None
    except Exception as exc:  # truncated or corrupt data
        raise ProtocolError(400, f"cannot decode the image: {type(exc).__name__}: {exc}") from None
    finally:
        img.close()
