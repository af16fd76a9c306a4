"""The field table's vocabulary: what GenerationRequest's fields carry besides a type and a default.

Each field of :class:`~lienzo.generation.request.GenerationRequest` is annotated with one :class:`Spec`:
its label and help, the modes it belongs to, its limits, and its name at every door (CLI flag, A1111 key,
OpenAI key, infotext key, studio control). The doors read the table through :func:`specs`; none of them
lists fields, defaults or limits of its own. This module imports no torch and no pydantic model, so the
CLI and the page can read it before anything heavy.
"""

import hashlib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lienzo.errors import InvalidRequestError, LienzoError

Mode = Literal["txt2img", "img2img", "inpaint", "outpaint"]
MODES: tuple[Mode, ...] = ("txt2img", "img2img", "inpaint", "outpaint")
EVERY_MODE = frozenset(MODES)
WITH_IMAGE = frozenset(("img2img", "inpaint", "outpaint"))
MASKED = frozenset(("inpaint", "outpaint"))
# "the request's default": a door that keeps it says nothing of its own.
SAME: Any = object()


@dataclass(frozen=True)
class Limits:
    """A numeric range (and step) a field's value must keep; ``words`` says it where the plain range would mislead."""

    low: float
    high: float
    multiple: int | None = None
    unit: str = ""
    words: str | None = None

    def check(self, name: str, value: float | None) -> None:
        if value is None:
            return
        finite = value == value and abs(value) != float("inf")
        if finite and self.low <= value <= self.high and not (self.multiple and value % self.multiple):
            return
        if self.words:
            allowed = self.words
        elif self.multiple:
            allowed = f"a multiple of {self.multiple} between {self.low:g} and {self.high:g}{self.unit}"
        else:
            allowed = f"between {self.low:g} and {self.high:g}{self.unit}"
        raise ValueError(f"{name} must be {allowed}, got {value}")

    def json(self) -> dict[str, float]:
        keywords: dict[str, float] = {"minimum": self.low, "maximum": self.high}
        if self.multiple:
            keywords["multipleOf"] = self.multiple
        return keywords


@dataclass(frozen=True, eq=False)
class InfotextKey:
    """A key of A1111's infotext and how it writes and reads the field(s) that carry it.

    Fields that share one key (``Size`` holds width and height) share the object: ``write`` takes their
    values in the table's order and ``read`` gives them back as a tuple. ``write`` returning None leaves
    the key out. ``when`` writes it only for requests it holds for; otherwise a key is written in its
    fields' modes when its value is not the default, or always when ``always``.

    A key that stands for several (``ControlNet 0``, ``ControlNet 1``, ...) has ``matches``, which tells its
    keys: ``write`` returns them as a dict and ``read`` is given every present one. ``implies`` are request
    fields a key's presence sets (``Hires upscaler`` turns the hires fix on).
    """

    key: str
    write: Callable[..., object | None] = str
    read: Callable[[str], Any] = str
    always: bool = False
    when: Callable[[Any], bool] | None = None
    matches: Callable[[str], bool] | None = None
    implies: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Widget:
    """How the studio shows a field: a kind of control and the range its slider or box offers (a
    comfortable part of the limits, which the server still checks)."""

    kind: Literal["text", "number", "range", "check", "select"]
    low: float | None = None
    high: float | None = None
    step: float | None = None


@dataclass(frozen=True)
class Spec:
    """Everything about one request field besides its type and default."""

    label: str
    help: str = ""
    modes: frozenset[str] = EVERY_MODE
    limits: Limits | None = None
    max_chars: int | None = None
    # Defaults that differ by mode (outpainting repaints harder than img2img); every door uses them.
    mode_defaults: Mapping[str, Any] = field(default_factory=dict)
    # The CLI: flag name without dashes (None: an argument, or not on the command line), and a short form.
    cli: str | None = None
    cli_short: str | None = None
    # The A1111 API: the key a client sends (None: A1111 has none). ``a1111_body`` False: not a plain
    # body field (it needs translating, or lives in override_settings); ``a1111_default`` is A1111's own.
    a1111: str | None = None
    a1111_body: bool = True
    a1111_default: Any = SAME
    # The OpenAI API's key (None: not there). lienzo's extensions to it are documented as such.
    openai: str | None = None
    infotext: InfotextKey | None = None
    widget: Widget | None = None

    def default_for(self, mode: str, default: Any) -> Any:
        return self.mode_defaults.get(mode, default)


@dataclass(frozen=True)
class Row:
    """One field of the table: its name, type annotation, request default and spec."""

    name: str
    annotation: Any
    default: Any
    spec: Spec

    @property
    def nullable(self) -> bool:
        return type(None) in self._union

    @property
    def kind(self) -> Any:
        """The value's type: ``int`` for ``int | None``, the Literal itself for a Literal."""
        return next((a for a in self._union if a is not type(None)), self.annotation)

    @property
    def _union(self) -> tuple:
        union = isinstance(self.annotation, types.UnionType) or typing.get_origin(self.annotation) is typing.Union
        return typing.get_args(self.annotation) if union else ()


def spec_of(field_info) -> Spec | None:
    """The Spec in a pydantic FieldInfo's metadata, or None."""
    return next((m for m in field_info.metadata if isinstance(m, Spec)), None)


def rows(model) -> Iterator[Row]:
    """The table of a pydantic model whose fields carry Specs, in declaration order."""
    for name, info in model.model_fields.items():
        spec = spec_of(info)
        if spec is not None:
            yield Row(name, info.annotation, info.default, spec)


# -- infotext values ------------------------------------------------------------------------------


def _reader(key: str, kind: type, words: str) -> Callable[[str], Any]:
    def read(text: str):
        try:
            return kind(text)
        except ValueError:
            raise LienzoError(f"infotext {key!r} must be {words}, got {text!r}") from None

    return read


def number(key: str, **options) -> InfotextKey:
    """A decimal key written as A1111 writes it (7, not 7.0; 0.75)."""
    return InfotextKey(key, write=lambda v: f"{v:g}", read=_reader(key, float, "a number"), **options)


def whole(key: str, **options) -> InfotextKey:
    return InfotextKey(key, read=_reader(key, int, "a whole number"), **options)


def sizes_reader(key: str) -> Callable[[str], tuple[int, int]]:
    def read(text: str) -> tuple[int, int]:
        width, sep, height = text.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise LienzoError(f"infotext {key!r} must be WIDTHxHEIGHT such as 512x768, got {text!r}")
        return int(width), int(height)

    return read


SIZE = InfotextKey("Size", write=lambda w, h: f"{w}x{h}", read=sizes_reader("Size"), always=True)
# A1111 writes it only when both sides are set (above 0).
SEED_RESIZE = InfotextKey("Seed resize from", write=lambda w, h: f"{w}x{h}" if w > 0 and h > 0 else None, read=sizes_reader("Seed resize from"))
_SIDES = ("left", "right", "up", "down")


def _read_outpaint(text: str) -> tuple[int, ...]:
    amounts = dict(part.strip().partition(" ")[::2] for part in text.split(","))
    try:
        return tuple(int(amounts.get(side, 0)) for side in _SIDES)
    except ValueError:
        raise LienzoError(f"infotext 'Outpaint' must be 'left N, right N, up N, down N', got {text!r}") from None


OUTPAINT = InfotextKey(
    "Outpaint", write=lambda *amounts: ", ".join(f"{s} {a}" for s, a in zip(_SIDES, amounts)), read=_read_outpaint, always=True
)


def yes(key: str, text: str = "True") -> InfotextKey:
    """A switch written only when on, as ``text`` (A1111 writes ``Tiling: True``)."""
    return InfotextKey(key, write=lambda on: text if on else None, read=lambda value: value.strip() == text)


def _write_fast(on: bool) -> str | None:
    # Imported for fast images only: deepcache imports torch, and the CLI validates before torch.
    from lienzo.generation.deepcache import fast_label

    return fast_label() if on else None


def _read_fast(value: str) -> bool:
    """``DeepCache 3`` → True. Another interval would remake a different image, so it is refused
    rather than remade with this version's."""
    from lienzo.generation.deepcache import INTERVAL, fast_label, interval_from_label

    if interval_from_label(value) != INTERVAL:
        raise LienzoError(f"infotext 'Fast' must be {fast_label()!r}, the fast mode this lienzo remakes, got {value!r}")
    return True


FAST = InfotextKey("Fast", write=_write_fast, read=_read_fast)


def image_hash(image) -> str:
    """A short hash of a picture's content (its RGB pixels and size, whatever file held them), as A1111's
    short hashes are: the first 10 hex digits of a SHA-256."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:10]


def _write_references(images: list) -> str | None:
    return f"{len(images)}: {', '.join(image_hash(image) for image in images)}" if images else None


def _read_references(text: str) -> tuple[str, ...]:
    """``2: 1a2b3c4d5e, 6f7a8b9c0d`` → the hashes of the reference images a picture was made with. The
    pictures themselves are not in the infotext: a remake must be given them again (see check_references)."""
    count, _, hashes = text.partition(":")
    found = tuple(h.strip() for h in hashes.split(",") if h.strip())
    if not count.strip().isdigit() or int(count) != len(found) or not all(len(h) == 10 for h in found):
        raise LienzoError(f"infotext 'Reference images' must be 'COUNT: HASH, HASH, ...' with 10-digit hashes, got {text!r}")
    return found


REFERENCES = InfotextKey("Reference images", write=_write_references, read=_read_references)


def check_references(recorded: tuple[str, ...], images: list, flag: str = "reference_images") -> None:
    """A remake's reference images must be the ones the picture recorded, in order: the infotext keeps only
    their hashes. ``flag`` is what the door calls the field."""
    given = tuple(image_hash(image) for image in images)
    if given == tuple(recorded):
        return
    if not images:
        raise InvalidRequestError(flag, f"the picture was made with {len(recorded)} reference image(s); give them again to remake it")
    raise InvalidRequestError(
        flag, f"the reference images given ({', '.join(given)}) are not the {len(recorded)} the picture was made with "
        f"({', '.join(recorded)}); give the same images, in the same order",
    )
