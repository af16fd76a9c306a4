"""The field table as the server's doors use it: body fields for pydantic, each family's names for
its errors, and the table itself as JSON (``GET /api/v1/fields``, from which the studio builds its
controls). Nothing here lists a field: every door asks the table."""

import typing
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from lienzo.generation.fields import MODES, Row
from lienzo.generation.request import LoraRef, json_limits, schema_limits, table

Door = Literal["cli", "a1111", "openai"]


def body_field(row: Row, default: Any, description: str | None = None, *, optional: bool = False) -> tuple[Any, Any]:
    """``row`` as a ``create_model`` field: its type (or None too), ``default``, help and limits."""
    annotation = row.annotation | None if optional else row.annotation
    return annotation, Field(default, description=row.spec.help if description is None else description, json_schema_extra=schema_limits(row.name))


def door_names(door: Door) -> dict[str, str]:
    """GenerationRequest's field -> the name ``door``'s clients use, where it differs."""
    names = {row.name: getattr(row.spec, door) for row in table()}
    return {field: name for field, name in names.items() if name and name != field}


class FieldView(BaseModel):
    name: str
    label: str
    help: str
    type: Literal["integer", "number", "boolean", "string", "choice", "image", "images", "loras", "list"]
    nullable: bool
    choices: list[str] | None
    default: Any
    mode_defaults: dict[str, Any]
    modes: list[str]
    limits: dict[str, int | float] = Field(description="JSON Schema keywords: minimum, maximum, multipleOf, maxLength")
    widget: dict[str, Any] | None = Field(description="the studio's control: kind (text, number, range, check, select), low, high, step")
    names: dict[str, str | None] = Field(description="the field's name at each door: cli flag, a1111 and openai keys, infotext key")


def _kind(row: Row) -> tuple[str, list[str] | None]:
    """JSON kind, and the choices of a Literal."""
    inner = row.kind
    if typing.get_origin(inner) is Literal:
        return "choice", [str(c) for c in typing.get_args(inner)]
    if typing.get_origin(inner) is list:
        return {(LoraRef,): "loras", (Image.Image,): "images"}.get(typing.get_args(inner), "list"), None
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    return kinds.get(inner, "image"), None


def field_views() -> list[FieldView]:
    views = []
    for row in table():
        kind, choices = _kind(row)
        spec = row.spec
        views.append(
            FieldView(
                name=row.name, label=spec.label, help=spec.help, type=kind, nullable=row.nullable, choices=choices,
                default=None if kind == "image" else row.default, mode_defaults=dict(spec.mode_defaults),
                modes=[m for m in MODES if m in spec.modes], limits=json_limits(row.name),
                widget=None if spec.widget is None else {k: v for k, v in vars(spec.widget).items() if v is not None},
                names={
                    "cli": f"--{spec.cli}" if spec.cli else None, "a1111": spec.a1111, "openai": spec.openai,
                    "infotext": spec.infotext.key if spec.infotext else None,
                },
            )
        )
    return views
