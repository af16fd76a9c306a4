"""A1111's "X/Y/Z plot" script over its API: ``script_name: "x/y/z plot"`` with the script's
``script_args`` (x_type, x_values, x_values_dropdown, the same for y and z, draw_legend,
include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode).
Axis types are indexes into A1111 1.10's axis list for the endpoint (or the labels themselves); the
axes lienzo can vary map onto the field table and go through lienzo's own plot (generation.xyz), one
queued job per cell; the others are refused with 422 naming them."""

import csv
import io
import json
from dataclasses import dataclass
from datetime import date
from typing import Any

from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.noise import random_seed
from lienzo.generation.request import GenerationRequest
from lienzo.generation.xyz import SEARCH_REPLACE, Axis, parse_axis, plot_cells
from lienzo.images.grid import labelled_grid
from lienzo.images.io import save_png_numbered
from lienzo.images.metadata import pnginfo
from lienzo.server.codec import JSONResponse, b64encode
from lienzo.server.deps import identity
from lienzo.server.job import Job, JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.a1111.answers import Notes, echoed_parameters, job_info, job_response
from lienzo.server.routes.a1111.schemas import CommonRequest, GenerationResponse
from lienzo.server.routes.a1111.translate import DIALECT
from lienzo.settings import Settings

# A1111 1.10's axis options in its order, each for both endpoints ("") or one ("txt2img", "img2img");
# the script numbers those of its endpoint from 0.
_AXIS_OPTIONS = [
    ("Nothing", ""), ("Seed", ""), ("Var. seed", ""), ("Var. strength", ""), ("Steps", ""), ("Hires steps", "txt2img"),
    ("CFG Scale", ""), ("Image CFG Scale", "img2img"), ("Prompt S/R", ""), ("Prompt order", ""), ("Sampler", "txt2img"),
    ("Hires sampler", "txt2img"), ("Sampler", "img2img"), ("Checkpoint name", ""), ("Negative Guidance minimum sigma", ""),
    ("Sigma Churn", ""), ("Sigma min", ""), ("Sigma max", ""), ("Sigma noise", ""), ("Schedule type", ""),
    ("Schedule min sigma", ""), ("Schedule max sigma", ""), ("Schedule rho", ""), ("Eta", ""), ("Clip skip", ""),
    ("Denoising", ""), ("Initial noise multiplier", ""), ("Extra noise", ""), ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"), ("VAE", ""), ("Styles", ""), ("UniPC Order", ""), ("Face restore", ""),
    ("Token merging ratio", ""), ("Token merging ratio high-res", ""), ("Always discard next-to-last sigma", ""),
    ("SGM noise multiplier", ""), ("Refiner checkpoint", ""), ("Refiner switch at", ""), ("RNG source", ""),
]
# The A1111 axes lienzo varies, as fields of the table.
_FIELDS = {
    "Seed": "seed", "Var. seed": "subseed", "Var. strength": "subseed_strength", "Steps": "steps", "CFG Scale": "cfg_scale",
    "Prompt S/R": SEARCH_REPLACE, "Sampler": "sampler", "Schedule type": "schedule", "Clip skip": "clip_skip",
    "Denoising": "denoising_strength",
}
# Axes whose values A1111 takes from the dropdown (x_values_dropdown) unless csv_mode is on.
_DROPDOWN = {"Sampler", "Schedule type"}
_DEFAULTS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]


def axis_labels(endpoint: str) -> list[str]:
    return [label for label, only in _AXIS_OPTIONS if only in ("", endpoint)]


@dataclass(frozen=True)
class PlotArgs:
    axes: tuple[Axis | None, Axis | None, Axis | None]
    include_lone_images: bool
    no_fixed_seeds: bool


def parse_script_args(args: list[Any] | None, endpoint: str) -> PlotArgs:
    """The script's positional arguments as lienzo's axes; InvalidRequestError naming ``script_args[i]``."""
    args = list(args or [])
    args += _DEFAULTS[len(args) :]
    labels, csv_mode = axis_labels(endpoint), bool(args[17])
    axes = []
    for n, name in enumerate("xyz"):
        kind, values, dropdown = args[3 * n : 3 * n + 3]
        where = f"script_args[{3 * n}]"
        if isinstance(kind, str) and not kind.isdigit():
            if kind not in labels:
                raise InvalidRequestError(where, f"{name.upper()} type {kind!r} is not an A1111 1.10 {endpoint} axis")
            label = kind
        else:
            index = int(kind)
            if not 0 <= index < len(labels):
                raise InvalidRequestError(where, f"{name.upper()} type must be 0 to {len(labels) - 1} ({endpoint} axes), got {index}")
            label = labels[index]
        if label == "Nothing":
            axes.append(None)
            continue
        if label not in _FIELDS:
            supported = ", ".join(_FIELDS)
            raise InvalidRequestError(where, f"lienzo cannot plot {label!r} yet; it plots: {supported}")
        if label in _DROPDOWN and not csv_mode and dropdown:
            out = io.StringIO()
            csv.writer(out).writerow(dropdown)
            values = out.getvalue().strip()
        axes.append(parse_axis(f"{_FIELDS[label]}={values}", f"script_args[{3 * n + 1}]"))
    if axes[0] is None and (axes[1] is not None or axes[2] is not None):
        axes[0], axes[1] = axes[1], None  # a plot of Y alone is drawn as columns, as one of X alone
    return PlotArgs(tuple(axes), bool(args[10]), bool(args[12]))


async def plot_response(
    body: CommonRequest, gen: GenerationRequest, plot: PlotArgs, model: str | None, request, queue: JobQueue, settings: Settings, notes: Notes
) -> GenerationResponse | JSONResponse:
    """Queue every cell, wait for them, answer A1111's way: the grid first, then (include_lone_images) each picture."""
    fields = dict(gen)
    if fields["seed"] == -1 and not plot.no_fixed_seeds:
        fields["seed"] = random_seed()
    with DIALECT.speaking():
        cells = plot_cells(fields, *plot.axes)
        if len(cells) > settings.max_queue:
            raise InvalidRequestError("script_args", f"the plot has {len(cells)} cells; at most max_queue ({settings.max_queue}) are queued")
        jobs = [queue.submit(cell.request, model=model, source="a1111", caller=identity(request)) for cell in cells]
    for job in jobs:
        await queue.wait(job, request.is_disconnected)
    failed = next((job for job in jobs if job.status == JobStatus.FAILED), None)
    if failed is not None:
        return job_response(failed, body, notes)
    made = [job for job in jobs if job.images]
    if not made:  # every cell cancelled or interrupted before its picture
        return job_response(jobs[0], body, notes)
    grids = _grids(cells, jobs, plot.axes, settings)
    lone = [job.png(0) for job in made] if plot.include_lone_images else []
    images = [*grids, *lone] if body.send_images else []
    info = job_info(made[0], body, notes)
    info["infotexts"] = [made[0].images[0].infotext] * len(grids) + [job.images[0].infotext for job in made if lone]
    info["index_of_first_image"] = len(grids)
    answer = GenerationResponse(images=[b64encode(png) for png in images], parameters=echoed_parameters(body), info=json.dumps(info))
    return JSONResponse(answer.model_dump(), headers=notes.headers(jobs[0]))


def _grids(cells, jobs: list[Job], axes, settings: Settings) -> list[bytes]:
    """A1111's first image: with one z value its grid; with several, their grids side by side. Saved too;
    a cell whose job made no picture (cancelled) is left black, as A1111 leaves it."""
    x, y, z = axes
    count = lambda axis: len(axis.values) if axis is not None else 1  # noqa: E731
    label = lambda axis, i: axis.label(i) if axis is not None else ""  # noqa: E731
    pictures = {(c.z, c.y, c.x): Image.open(io.BytesIO(job.png(0))) for c, job in zip(cells, jobs, strict=True) if job.images}
    blank = Image.new("RGB", next(iter(pictures.values())).size) if pictures else Image.new("RGB", (64, 64))
    grids = []
    for zi in range(count(z)):
        rows = [[pictures.get((zi, yi, xi), blank) for xi in range(count(x))] for yi in range(count(y))]
        grids.append(labelled_grid(rows, [label(x, i) for i in range(count(x))], [label(y, i) for i in range(count(y))], label(z, zi)))
    grid = grids[0] if len(grids) == 1 else labelled_grid([grids], [], [])
    first = next(job.images[0] for job in jobs if job.images)
    folder = settings.outputs_dir / "txt2img-grids" / date.today().isoformat()
    path = save_png_numbered(grid, folder, first.seed, pnginfo(first.infotext), prefix="grid-")
    return [path.read_bytes()]
