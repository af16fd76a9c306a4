"""X/Y/Z plots, as AUTOMATIC1111's script makes them: up to three axes, each one request field (any of
the field table, by its name, CLI flag, label or A1111 key) over a list of values, or ``Prompt S/R``
(search and replace in the prompts). The plot is a list of requests; the doors run each through the
one Studio and draw the grids. Pure: no torch, so a bad axis is refused before anything loads.

Values are comma-separated (CSV: quote a value that holds a comma); numbers also take A1111's ranges:
``1-5`` (every whole number), ``10-30 (+10)`` (a step), ``0.5-1.5 [3]`` (a count, ends included).
"""

import csv
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from lienzo.errors import InvalidRequestError
from lienzo.generation.fields import Row
from lienzo.generation.request import GenerationRequest, build_request, table

SEARCH_REPLACE = "Prompt S/R"
_NUMBER = r"\s*([+-]?\d+(?:\.\d*)?)\s*"
_RANGE = re.compile(rf"^{_NUMBER}-{_NUMBER}(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*$")
# Fields that are not a picture's parameter: images, and what happens after (where, how many).
_NOT_AXES = {"init_image", "mask", "reference_images", "batch_count", "watermark", "credentials", "safety"}
MAX_CELLS = 1000  # a typo in a range (1-10000) should not queue a day of work


@dataclass(frozen=True)
class Axis:
    """One axis: the field it varies (``SEARCH_REPLACE`` for prompt search and replace), its values, how
    each is labelled on the grid, and the option that gave it (errors name it)."""

    field: str
    values: tuple
    labels: tuple[str, ...]
    option: str = "axis"
    title: str = ""  # the field's label in the table ("CFG scale"); none for Prompt S/R, whose values say it

    def label(self, index: int) -> str:
        return f"{self.title}: {self.labels[index]}" if self.title else self.labels[index]


def _rows_by_name() -> dict[str, Row]:
    names: dict[str, Row] = {}
    for row in table():
        if row.name in _NOT_AXES:
            continue
        spec = row.spec
        for name in (row.name, spec.cli, spec.label, spec.a1111):
            if name:
                names.setdefault(_key(name), row)
    return names


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.strip().lower())


def _expand(text: str, whole: bool, option: str) -> list[float]:
    """A1111's ranges: ``a-b``, ``a-b (+step)``, ``a-b [count]``; a plain number is itself."""
    match = _RANGE.match(text)
    if match is None:
        return [float(text)]
    low, high, step, count = match.groups()
    low, high = float(low), float(high)
    if count is not None:
        n = int(count)
        if n < 1:
            raise InvalidRequestError(option, f"a range's [count] must be 1 or more, got {text!r}")
        values = [low] if n == 1 else [low + (high - low) * i / (n - 1) for i in range(n)]
        return [round(v) if whole else round(v, 6) for v in values]
    step_value = float(step.replace(" ", "")) if step is not None else 1.0
    if step_value == 0 or (high - low) * step_value < 0:
        raise InvalidRequestError(option, f"the step in {text!r} never reaches the end of the range")
    count = math.floor((high - low) / step_value + 1e-9) + 1
    if count > MAX_CELLS:
        raise InvalidRequestError(option, f"{text!r} has {count:,} values; at most {MAX_CELLS:,} cells are made")
    return [round(low + i * step_value, 6) for i in range(count)]


def _convert(row: Row, texts: list[str], option: str) -> list:
    kind = row.kind
    values: list = []
    for text in texts:
        try:
            if kind is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                    raise ValueError
                values.append(lowered in ("true", "yes", "on", "1"))
            elif kind in (int, float):
                expanded = _expand(text, kind is int, option)
                if kind is int and any(v != int(v) for v in expanded):
                    raise ValueError
                values += [kind(v) for v in expanded]
            elif kind is str or typing.get_origin(kind) is typing.Literal:
                values.append(text.strip())
            else:
                raise InvalidRequestError(option, f"{row.name} cannot be an axis of a plot")
        except InvalidRequestError:
            raise
        except ValueError:
            raise InvalidRequestError(option, f"{text.strip()!r} is not a value of {row.name} ({kind.__name__ if isinstance(kind, type) else 'a choice'})") from None
    return values


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_axis(text: str, option: str = "axis") -> Axis:
    """``"steps=10,20,30"``, ``"CFG scale=4-10 (+3)"``, ``"Prompt S/R=apple,pear"`` as an Axis; ``option``
    names the axis in errors (``--x``)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise InvalidRequestError(option, f"give FIELD=VALUE,VALUE,... such as steps=10,20,30, got {text!r}")
    texts = [value for value in next(csv.reader([raw], skipinitialspace=True), []) if value.strip()]
    if not texts:
        raise InvalidRequestError(option, f"{name.strip()} has no values")
    if _key(name) in (_key(SEARCH_REPLACE), "sr", "prompt sr", "search replace"):
        if len(texts) < 2:
            raise InvalidRequestError(option, "Prompt S/R needs the text to search for, then what replaces it: apple,pear,plum")
        return Axis(SEARCH_REPLACE, tuple(t.strip() for t in texts), tuple(t.strip() for t in texts), option)
    row = _rows_by_name().get(_key(name))
    if row is None:
        raise InvalidRequestError(option, f"no request field {name.strip()!r}; use a field of GET /api/v1/fields, or {SEARCH_REPLACE}")
    values = _convert(row, texts, option)
    return Axis(row.name, tuple(values), tuple(_label(v) for v in values), option, row.spec.label)


def _apply(fields: dict, axis: Axis, index: int) -> dict:
    if axis.field == SEARCH_REPLACE:
        search, replace = axis.values[0], axis.values[index]
        if search not in fields.get("prompt", "") and search not in fields.get("negative_prompt", ""):
            raise InvalidRequestError(axis.option, f"Prompt S/R: {search!r} is in neither the prompt nor the negative prompt")
        return {**fields, **{k: fields.get(k, "").replace(search, replace) for k in ("prompt", "negative_prompt")}}
    return {**fields, axis.field: axis.values[index]}


@dataclass(frozen=True)
class Cell:
    """One picture of the plot: its place (z, y, x) and its request."""

    z: int
    y: int
    x: int
    request: GenerationRequest


def plot_cells(fields: dict, x: Axis | None, y: Axis | None = None, z: Axis | None = None) -> list[Cell]:
    """Every cell's request, z then y then x, each validated now (a value out of range is an error naming
    its axis, before any picture is made). Each cell makes one image."""
    sizes = [len(a.values) if a is not None else 1 for a in (z, y, x)]
    if math.prod(sizes) > MAX_CELLS:
        raise InvalidRequestError("x", f"{' x '.join(map(str, sizes))} is {math.prod(sizes):,} cells; at most {MAX_CELLS:,} are made")
    cells = []
    for zi in range(sizes[0]):
        for yi in range(sizes[1]):
            for xi in range(sizes[2]):
                cell = {**fields, "batch_size": 1, "batch_count": 1}
                for axis, index in ((z, zi), (y, yi), (x, xi)):
                    if axis is None:
                        continue
                    cell = _apply(cell, axis, index)
                    try:
                        build_request(**cell)
                    except InvalidRequestError as err:
                        message = str(err).removeprefix(f"{err.field}: ")
                        raise InvalidRequestError(axis.option, f"{axis.field} = {axis.labels[index]}: {message}") from None
                cells.append(Cell(zi, yi, xi, build_request(**cell)))
    return cells
