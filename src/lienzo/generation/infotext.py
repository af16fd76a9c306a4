"""The infotext's generation keys, written and read through the field table: what an image says about
how it was made, and the request fields that remake it (``lienzo generate --from``, the gallery, the
A1111 API's png-info). The layout itself (lines, quoting) is ``images.metadata``'s."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lienzo.errors import LienzoError
from lienzo.generation.fields import InfotextKey, Row
from lienzo.generation.request import GenerationRequest, table
from lienzo.generation.samplers import split_folded_schedule
from lienzo.images.metadata import Infotext, parse_infotext, read_parameters


def _keys() -> Iterator[tuple[InfotextKey, list[Row]]]:
    """Each infotext key of the table with the rows that carry it, in the order of their first field."""
    keys: dict[int, tuple[InfotextKey, list[Row]]] = {}
    for row in table():
        if row.spec.infotext is not None:
            keys.setdefault(id(row.spec.infotext), (row.spec.infotext, []))[1].append(row)
    yield from keys.values()


def request_params(request: GenerationRequest, resolved: dict[str, Any]) -> dict[str, object]:
    """The infotext pairs of ``request``'s fields, in the table's order, with ``resolved`` (what the run
    decided: seed, size, sampler, schedule) over the request's values. A key is written in its fields'
    modes: always when it says so, else when its value is not the default."""
    mode = request.mode
    values = {**dict(request), **resolved}
    params: dict[str, object] = {}
    for key, rows in _keys():
        if mode not in rows[0].spec.modes or (key.when is not None and not key.when(request)):
            continue
        given = [values[row.name] for row in rows]
        if not key.always and given == [row.spec.default_for(mode, row.default) for row in rows]:
            continue
        text = key.write(*given)
        if text is not None:
            params[key.key] = text
    return params


def fields_from_infotext(info: Infotext, mode: str = "txt2img") -> dict:
    """Request fields for ``mode`` (plus ``model``: hash or name) from a parsed infotext; absent keys are
    left out. Raises LienzoError for a value that cannot be what its key promises."""
    fields: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, rows in _keys():
        text = info.params.get(key.key)
        if text is None or mode not in rows[0].spec.modes:
            continue
        value = key.read(text)
        fields.update(zip((row.name for row in rows), value if len(rows) > 1 else (value,), strict=True))
    fields["model"] = info.model_hash or info.model
    if fields.get("sampler") and "schedule" not in fields:
        fields["sampler"], fields["schedule"] = split_folded_schedule(fields["sampler"])
    return {k: v for k, v in fields.items() if v is not None}


def fields_from_image(path: Path, mode: str = "txt2img") -> dict:
    """Request fields (plus ``model``: hash or name) from an image's A1111 infotext."""
    text = read_parameters(path)
    if text is None:
        raise LienzoError(f"from: {path} carries no generation parameters to remake it from")
    return fields_from_infotext(parse_infotext(text), mode)
