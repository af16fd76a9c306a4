"""AUTOMATIC1111 "infotext": the generation parameters stored with an image.

The layout, as A1111, Forge and SD.Next write it into the PNG ``parameters`` text chunk
(or the EXIF UserComment of a JPEG/WebP)::

    a prompt, which may span
    several lines
    Negative prompt: a negative prompt, which may also span lines
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768

The last line holds ``Key: value`` pairs; a value containing ``,``, ``:``, ``"`` or a newline
is written as a JSON string (``Lora hashes: "a: 1b2c, b: 3d4e"``).
"""

import json
import re
from dataclasses import dataclass, field
from os import PathLike

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import ImageFileError, LienzoError

PARAMETERS_KEY = "parameters"
_NEGATIVE_PREFIX = "Negative prompt:"

# Key grammar as A1111 reads it: a word character, then words, spaces, hyphens or slashes.
_KEY_NAME = re.compile(r"\w[\w \-/]*")
_KEY = re.compile(rf"\s*({_KEY_NAME.pattern}?)\s*:\s*")
# A1111 treats the last line as parameters only when it holds at least 3 pairs, so that a
# one-line prompt such as "style: anime" stays a prompt.
_MIN_PARAMETER_PAIRS = 3
_JSON = json.JSONDecoder()
# Half of a UTF-16 pair on its own: a JSON "\ud800" escape or a file name that is not UTF-8
# (Python's surrogateescape) puts one in a str, and no UTF-8 writer (PNG iTXt, SQLite, JSON) takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# EXIF: the Exif sub-IFD and its UserComment tag, whose first 8 bytes name the encoding.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_UNDEFINED_PREFIX = b"\0" * 8


@dataclass
class Infotext:
    """A parsed infotext. ``params`` keeps every key, known or not, in the order written; the request
    fields they hold are read through the field table (``generation.infotext.fields_from_infotext``)."""

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def model_hash(self) -> str | None:
        return self.params.get("Model hash")

    @property
    def model(self) -> str | None:
        return self.params.get("Model")


def lone_surrogate(text: str) -> str | None:
    """Why ``text`` cannot be saved (into an image's metadata, the gallery or a JSON answer), or None
    when it can: the first lone surrogate it holds, by code point and position."""
    match = _LONE_SURROGATE.search(text)
    if match is None:
        return None
    code, at = ord(match.group()), match.start()
    return f"contains a lone surrogate (U+{code:04X}) at character {at}: half of a UTF-16 pair, which cannot be saved as text"


def replace_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, as a UTF-8 decoder shows a broken byte."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Write the A1111 layout: prompt, ``Negative prompt:`` line (if any), then the pairs.

    ``None`` values are left out; the outer whitespace is stripped, as A1111 does. Keys must
    match the grammar readers use (word characters, spaces, ``-``, ``/``), or they would not
    read back: A1111 itself writes "Masked area padding", not the UI's "Only masked padding, pixels".
    """
    for key in params:
        if not _KEY_NAME.fullmatch(key):
            raise ValueError(f"infotext key {key!r} would not read back; use letters, digits, spaces, '-' or '/'")
    pairs = ", ".join(f"{key}: {_quote(str(value))}" for key, value in params.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE_PREFIX} {negative_prompt}")
    if pairs:
        lines.append(pairs)
    return "\n".join(lines).strip()


def _quote(value: str) -> str:
    """JSON-quote a value that would otherwise break the one-line ``Key: value, ...`` grammar."""
    if any(char in value for char in ',:"\n'):
        return json.dumps(value, ensure_ascii=False)
    return value


def parse_infotext(text: str) -> Infotext:
    """Read an infotext written by lienzo, A1111, Forge, SD.Next or a tool that copies them.

    Windows newlines and surrounding whitespace are tolerated. Every line before the last is
    prompt until a line starts with ``Negative prompt:``; from there on it is negative prompt.
    The last line is the parameter line only if it holds at least three pairs (A1111's rule);
    otherwise it belongs to the prompt and ``params`` is empty.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")]
    params = _parse_pairs(lines[-1])
    if len(params) >= _MIN_PARAMETER_PAIRS:
        lines = lines[:-1]
    else:
        params = {}

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.startswith(_NEGATIVE_PREFIX):
            negative_lines.append(line[len(_NEGATIVE_PREFIX) :].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return Infotext("\n".join(prompt_lines), "\n".join(negative_lines), params)


def _parse_pairs(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value", Key: [json], ...`` → ordered dict of strings.

    Text that is not a pair is skipped up to the next comma, as A1111's regular expression does.
    Values that open with ``[`` or ``{`` are read as a whole JSON document when they parse as
    one, because Civitai appends unquoted JSON (``Civitai resources: [{...}, {...}]``).
    """
    pairs: dict[str, str] = {}
    position = 0
    while position < len(line):
        key = _KEY.match(line, position)
        if key is None:
            position = _after_next_comma(line, position)
            continue
        value, position = _read_value(line, key.end())
        pairs[key.group(1)] = value
        position = _after_next_comma(line, position)
    return pairs


def _read_value(line: str, start: int) -> tuple[str, int]:
    """One value starting at ``start``; returns it and the position just after it."""
    if line.startswith(('"', "[", "{"), start):
        try:
            decoded, end = _JSON.raw_decode(line, start)
        except json.JSONDecodeError:
            pass
        else:
            return (decoded if isinstance(decoded, str) else line[start:end]), end
    end = line.find(",", start)
    end = len(line) if end == -1 else end
    return line[start:end].strip(), end


def _after_next_comma(line: str, position: int) -> int:
    comma = line.find(",", position)
    return len(line) if comma == -1 else comma + 1


def read_parameters(path: str | PathLike) -> str | None:
    """The infotext stored in an image, or ``None`` when it has none.

    PNG: the ``parameters`` tEXt/iTXt chunk. JPEG/WebP: the EXIF UserComment, where A1111 puts
    it. Images from NovelAI or ComfyUI keep their settings under other keys and give ``None``.
    """
    try:
        with Image.open(path) as image:
            return parameters_from(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ImageFileError(f"cannot read image metadata from {path}: {err}") from None


def parameters_from(image: Image.Image) -> str | None:
    """As :func:`read_parameters`, from an image already open."""
    text = image.info.get(PARAMETERS_KEY)
    if text is None:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        text = None if comment is None else _decode_user_comment(comment)
    return str(text) if text else None


def _decode_user_comment(comment: bytes | str) -> str:
    """Decode an EXIF UserComment: an 8-byte encoding name, then the text.

    A1111 (through piexif) writes ``UNICODE\\0`` and UTF-16 big-endian; some Windows tools
    write little-endian under the same name, told apart by where ASCII's zero bytes fall.
    """
    if isinstance(comment, str):
        return comment
    prefix, body = comment[:8], comment[8:]
    if prefix == _UNICODE_PREFIX:
        little_endian = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little_endian else "utf-16-be", errors="replace")
    # "ASCII", an all-zero "undefined" code, or no code at all: tools write UTF-8 there.
    text = body if prefix in (_ASCII_PREFIX, _UNDEFINED_PREFIX) else comment
    return text.decode("utf-8", errors="replace").rstrip("\0")


def pnginfo(infotext: str, extra: dict[str, str] | None = None) -> PngInfo:
    """PNG text chunks: ``parameters`` plus ``extra`` keys; non-Latin-1 text goes into iTXt."""
    extra = extra or {}
    if PARAMETERS_KEY in extra:
        raise LienzoError(f"extra PNG text must not use the key {PARAMETERS_KEY!r}; pass it as infotext")
    info = PngInfo()
    for key, value in {PARAMETERS_KEY: infotext, **extra}.items():
        info.add_text(key, value)
    return info
