"""Styles, as AUTOMATIC1111 keeps them in ``styles.csv``: a named prompt and negative prompt merged
into a request's own. lienzo keeps them as the gallery's presets; every door merges them the one way
written here, before the engine sees the prompt (so the infotext records the merged prompt, as A1111's
does, and ``--from`` remakes the picture without the style having to exist)."""

import csv
import io
from collections.abc import Iterable
from typing import Protocol

from lienzo.errors import InvalidRequestError

# styles.csv's columns, as A1111 writes them (it reads a file without the negative column too).
CSV_COLUMNS = ("name", "prompt", "negative_prompt")


class Style(Protocol):
    name: str
    prompt: str
    negative_prompt: str


def merge_style(prompt: str, style: str) -> str:
    """A1111's rule: a style with ``{prompt}`` wraps the prompt; any other is appended after a comma."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def merge_styles(prompt: str, negative: str, names: Iterable[str], styles: Iterable[Style]) -> tuple[str, str, list[str]]:
    """The prompts with the named styles (found ignoring case) merged in, in order, and the names no style has."""
    by_name = {style.name.lower(): style for style in styles}
    unknown = []
    for name in names:
        style = by_name.get(name.lower())
        if style is None:
            unknown.append(name)
            continue
        prompt, negative = merge_style(prompt, style.prompt), merge_style(negative, style.negative_prompt)
    return prompt, negative, unknown


def read_styles_csv(text: str) -> list[tuple[str, str, str]]:
    """(name, prompt, negative prompt) of each row of an A1111 ``styles.csv``; rows without a name are skipped."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"name", "prompt"} <= {f.strip() for f in reader.fieldnames}:
        raise InvalidRequestError("styles", f"a styles.csv starts with the header {','.join(CSV_COLUMNS)}; got {reader.fieldnames}")
    rows = []
    for row in reader:
        row = {(k or "").strip(): v or "" for k, v in row.items()}
        if row.get("name", "").strip():
            rows.append((row["name"].strip(), row.get("prompt", ""), row.get("negative_prompt", "")))
    return rows


def write_styles_csv(styles: Iterable[Style]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for style in styles:
        writer.writerow((style.name, style.prompt, style.negative_prompt))
    return out.getvalue()
