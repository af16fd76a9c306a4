"""Images in and out of HTTP: base64 (with or without a data-URL prefix) and uploads, guarded by the
pixel limit before any pixel is decoded; PNG files out as base64. JSON out, whatever text it echoes."""

import base64
import binascii
import json
import re
from typing import Any

from PIL import Image
from starlette import responses

from lienzo.errors import InvalidRequestError
from lienzo.images.io import decode_image, decode_mask
from lienzo.settings import Settings

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.IGNORECASE)


def b64decode(value: str, field: str) -> bytes:
    """Standard or URL-safe base64, padding optional, an optional ``data:image/png;base64,`` prefix."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = re.sub(r"\s+", "", text).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "is not valid base64 (send the image file's bytes, base64-encoded)") from None


def image_from_b64(value: str, field: str, settings: Settings) -> Image.Image:
    return decode_image(b64decode(value, field), field=field, max_pixels=settings.max_input_pixels)


def mask_from_b64(value: str, size: tuple[int, int], field: str, settings: Settings) -> Image.Image:
    return decode_mask(b64decode(value, field), size, field=field, max_pixels=settings.max_input_pixels)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class JSONResponse(responses.JSONResponse):
    """Starlette's JSON answer, but a lone surrogate (a JSON ``\\ud800`` a client sent, echoed in an error
    message such as "unknown sampler ...") is written as "?": UTF-8 cannot encode it, and Starlette's
    own render would turn the 422 into a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", "replace")
