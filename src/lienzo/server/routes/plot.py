"""X/Y/Z plots over lienzo's API, ``POST /api/v1/plot``: the axes are checked, every cell becomes one
queued txt2img job (the same queue, worker and Studio as any job), and the answer says which job is
which cell, so a client (the studio's Explore panel) draws the grid as the jobs finish."""

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, create_model

from lienzo.generation.noise import random_seed
from lienzo.generation.xyz import Axis, parse_axis, plot_cells
from lienzo.server.deps import AppSettings, Caller, Queue
from lienzo.server.jobs import QueueFullError
from lienzo.server.routes.native import BODIES, PREFIX, fields_from_body

router = APIRouter(prefix=PREFIX, tags=["lienzo"])

_AXIS_HELP = "FIELD=VALUE,VALUE,... over any field of GET /fields (by name, CLI flag, label or A1111 key); ranges 1-5, 10-30 (+10), 0-1 [5]; or 'Prompt S/R=a,b'"

PlotBody = create_model(
    "PlotBody",
    __base__=BODIES["txt2img"],
    x=(str, Field(description=f"the columns: {_AXIS_HELP}")),
    y=(str | None, Field(None, description="the rows, as x")),
    z=(str | None, Field(None, description="one grid per value, as x")),
)


class AxisView(BaseModel):
    field: str
    title: str
    labels: list[str] = Field(description="one per value, as the grid shows them")


class CellView(BaseModel):
    z: int
    y: int
    x: int
    job: str = Field(description="the cell's job: GET /jobs/{id}; its one image is the cell's picture")


class PlotView(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    x: AxisView
    y: AxisView | None
    z: AxisView | None
    seed: int = Field(description="the seed every cell keeps (drawn once for the plot when -1 was asked)")
    cells: list[CellView]


def _view(axis: Axis | None) -> AxisView | None:
    return None if axis is None else AxisView(field=axis.field, title=axis.title, labels=list(axis.labels))


@router.post("/plot", response_model=PlotView, status_code=202)
def plot(body: PlotBody, queue: Queue, settings: AppSettings, caller: Caller) -> PlotView:  # type: ignore[valid-type]
    """Queue an X/Y/Z plot: every cell a txt2img job with one image, all checked before any is queued."""
    axes = [parse_axis(text, name) if text else None for text, name in ((body.x, "x"), (body.y, "y"), (body.z, "z"))]
    fields: dict[str, Any] = fields_from_body(body, settings, frozenset({"x", "y", "z"}))
    if fields["seed"] == -1:
        fields["seed"] = random_seed()
    cells = plot_cells(fields, *axes)
    for cell in cells:
        queue.check_limits(cell.request, caller)
    if queue.waiting + len(cells) > settings.max_queue:
        raise QueueFullError(f"queue: the plot's {len(cells)} jobs do not fit beside the {queue.waiting} waiting (max_queue {settings.max_queue})")
    if body.model is not None:
        queue.resolve_model(body.model)
    jobs = [queue.submit(cell.request, model=body.model, source="native", caller=caller, priority=body.priority) for cell in cells]
    return PlotView(
        x=_view(axes[0]), y=_view(axes[1]), z=_view(axes[2]), seed=fields["seed"],
        cells=[CellView(z=c.z, y=c.y, x=c.x, job=job.id) for c, job in zip(cells, jobs, strict=True)],
    )

