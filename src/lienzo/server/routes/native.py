"""lienzo's own API, ``/api/v1``: submit jobs with the engine's request fields, watch, cancel, fetch.

The four submit bodies are derived from GenerationRequest's fields (images as base64), so the API
can never drift from the engine; the values are validated once, by ``build_request``.
"""

import json
from collections.abc import Mapping
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from lienzo.errors import InvalidRequestError
from lienzo.generation.control_unit import MAX_CONTROL_UNITS, ControlUnit
from lienzo.generation.fields import MODES, image_hash
from lienzo.generation.request import GenerationRequest, build_request, table
from lienzo.generation.samplers import SAMPLERS, Sampler, resolve_schedule
from lienzo.images.provenance import describe_training_data
from lienzo.models.families import FAMILIES, SCHNELL_STEPS
from lienzo.models.registry import ModelEntry, native_size
from lienzo.origins import training_data_for
from lienzo.server.codec import JSONResponse, image_from_b64, mask_from_b64
from lienzo.server.deps import AppSettings, Caller, Queue, identity
from lienzo.server.dialect import Dialect, ErrorBody
from lienzo.server.fields import FieldView, body_field, field_views
from lienzo.server.job import Job, JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.settings import Settings

PREFIX = "/api/v1"
router = APIRouter(prefix=PREFIX, tags=["lienzo"])

_IMAGE_HELP = {
    "init_image": "the input image, base64 (a data: URL prefix is fine)",
    "mask": "base64; white (or opaque on a transparent layer) = repaint, black = keep; same size as init_image",
}


# A ControlNet unit as JSON: ControlUnit's fields (their limits and defaults), the picture as base64. Derived
# from ControlUnit, so that a field added to units is taken here too; its own checks run in build_request.
ControlUnitBody = create_model(
    "ControlUnitBody",
    __config__=ConfigDict(extra="forbid"),
    image=(str | None, Field(None, description="the input picture, base64 (a data: URL prefix is fine); null: the img2img input image")),
    **{name: (info.annotation, info) for name, info in ControlUnit.model_fields.items() if name != "image"},
)


def _body_model(mode: str) -> type[BaseModel]:
    """A pydantic body with the table's fields for ``mode`` and their defaults there, images as base64 strings."""
    fields: dict[str, Any] = {
        "model": (str | None, Field(None, description="model name, or a path inside the models dir; default: the current model")),
        # The job's, not the picture's: not a request field.
        "priority": (int, Field(0, ge=-100, le=100, description="higher runs first; a named key may not go above 0")),
    }
    for row in table():
        if mode not in row.spec.modes:
            continue
        if row.name in _IMAGE_HELP:
            fields[row.name] = (str, Field(description=_IMAGE_HELP[row.name]))
        elif row.name == "reference_images":
            fields[row.name] = (list[str], Field([], description=f"{row.spec.help}; each base64 (a data: URL prefix is fine)"))
        elif row.name == "controlnets":
            fields[row.name] = (list[ControlUnitBody], Field([], max_length=MAX_CONTROL_UNITS, description=row.spec.help))
        else:
            fields[row.name] = body_field(row, row.spec.default_for(mode, row.default))
    return create_model(f"{mode.title()}Body", __config__=ConfigDict(extra="forbid"), **fields)


BODIES = {mode: _body_model(mode) for mode in MODES}


def request_from_body(mode: str, body: BaseModel, settings: Settings) -> GenerationRequest:
    """Decode the body's images and validate everything into the engine's request."""
    request = build_request(**fields_from_body(body, settings))
    if mode == "outpaint" and not request.is_outpaint:
        raise InvalidRequestError("outpaint_left", "give at least one of outpaint_left, outpaint_right, outpaint_up, outpaint_down")
    return request


def fields_from_body(body: BaseModel, settings: Settings, exclude: frozenset[str] = frozenset()) -> dict:
    """The body's request fields with its pictures decoded (errors name the field: ``controlnets.0.image``)."""
    fields = body.model_dump(exclude={"model", "priority", *exclude})
    if "init_image" in fields:
        fields["init_image"] = image_from_b64(fields["init_image"], "init_image", settings)
    if "mask" in fields:
        fields["mask"] = mask_from_b64(fields["mask"], fields["init_image"].size, "mask", settings)
    if "reference_images" in fields:
        fields["reference_images"] = [
            image_from_b64(value, f"reference_images.{index}", settings) for index, value in enumerate(fields["reference_images"])
        ]
    if "controlnets" in fields:
        fields["controlnets"] = [
            _unit_from_body(unit, f"controlnets.{index}", "init_image" in fields, settings) for index, unit in enumerate(fields["controlnets"])
        ]
    return fields


def _unit_from_body(unit: dict, field: str, has_input: bool, settings: Settings) -> dict:
    """A unit's fields with its picture decoded (errors name ``controlnets.N.image``); None (the input image) only
    in the modes that have one. The request checks that too, but cannot name the unit."""
    image = unit["image"]
    if image is None and not has_input:
        raise InvalidRequestError(f"{field}.image", "give the unit a picture: only in the modes with an input image does it read that one")
    return unit | {"image": None if image is None else image_from_b64(image, f"{field}.image", settings)}


class ImageView(BaseModel):
    url: str
    seed: int
    infotext: str
    file: str
    filtered: str | None = Field(None, description='"blurred" or "blocked" by the safety filter; null: shown as made')
    watermarked: bool = Field(False, description="the PNG carries lienzo's invisible watermark (images under 256x256 cannot)")
    gallery_id: int | None = Field(None, description="the image's id in the gallery (/api/v1/gallery/{id}); null: not indexed yet")


class ProgressView(BaseModel):
    step: int
    total_steps: int
    batch: int
    batch_count: int
    fraction: float = Field(description="share of all denoising steps done, 0 to 1")
    eta: float | None = Field(description="seconds left at the pace so far")
    preview_url: str | None


class JobView(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobStatus
    mode: str
    source: str
    owner: str | None = Field(description="the named API key that queued it; null on a server without named keys")
    priority: int = Field(description="higher runs first; equal priorities take turns between owners")
    attempts: int = Field(description="times a worker started it (a job cut short by a dying worker runs once more)")
    worker: str | None = Field(description="the worker (device) running it or that ran it")
    model: str | None
    position: int | None = Field(description="0 = next to run; null when not waiting")
    created: float
    started: float | None
    finished: float | None
    progress: ProgressView
    images: list[ImageView]
    error: str | None
    error_field: str | None
    warnings: list[str] = Field(description="what the user should know, e.g. a size far from the model's")
    parameters: dict


def parameters(request: GenerationRequest) -> dict:
    """The request's fields without its images (the reference images and the ControlNet units' pictures by
    their hashes), as JSON-able values."""
    return request.model_dump(mode="json", exclude={"init_image", "mask", "reference_images", "controlnets"}) | {
        "reference_images": [image_hash(image) for image in request.reference_images],
        "controlnets": [unit_view(unit) for unit in request.controlnets],
    }


def unit_view(unit: ControlUnit) -> dict:
    """A unit's fields as JSON, its picture by its hash (null: it reads the img2img input image)."""
    return unit.model_dump(mode="json", exclude={"image"}) | {"image": None if unit.image is None else image_hash(unit.image)}


def job_view(job: Job, queue: JobQueue) -> JobView:
    base = f"{PREFIX}/jobs/{job.id}"
    return JobView(
        id=job.id,
        status=job.status,
        mode=job.request.mode,
        source=job.source,
        owner=job.owner,
        priority=job.priority,
        attempts=job.attempts,
        worker=job.worker,
        model=job.model_name or job.model,
        position=queue.position(job),
        created=job.created,
        started=job.started,
        finished=job.finished,
        progress=ProgressView(
            step=job.step,
            total_steps=job.total_steps,
            batch=job.batch,
            batch_count=job.request.batch_count,
            fraction=job.fraction,
            eta=job.eta,
            preview_url=f"{base}/preview?step={job.preview_step}" if job.preview else None,
        ),
        images=[
            ImageView(
                url=f"{base}/images/{i}", seed=s.seed, infotext=s.infotext, file=str(s.path), filtered=s.filtered,
                watermarked=s.watermarked, gallery_id=s.gallery_id,
            )
            for i, s in enumerate(job.images)
        ],
        error=job.error,
        error_field=job.error_field,
        warnings=job.warnings,
        parameters=parameters(job.request),
    )


class NativeError(ErrorBody):
    """Every error of lienzo's own API and of the gallery."""

    detail: str = Field(description="what is wrong and what is allowed, in one line")
    field: str | None = Field(description="the request field at fault; null: none in particular")

    @classmethod
    def of(cls, status: int, message: str, field: str | None) -> Self:
        return cls(detail=message, field=field)


# lienzo's own names: nothing to rename. It also answers every path no other family claims.
DIALECT = Dialect(prefix=PREFIX, error_model=NativeError)


async def _submit(mode: str, body: BaseModel, request: Request, queue: JobQueue, settings: Settings, wait: bool) -> JSONResponse:
    caller = identity(request)
    job = queue.submit(request_from_body(mode, body, settings), model=body.model, source="native", caller=caller, priority=body.priority)
    if wait:
        await queue.wait(job, request.is_disconnected)
    return JSONResponse(job_view(job, queue).model_dump(mode="json"), status_code=200 if wait else 202)


Wait = Annotated[bool, Query(description="answer when the job has finished, not when it is queued")]


def _route(mode: str):
    body_model = BODIES[mode]

    async def submit(body: body_model, request: Request, queue: Queue, settings: AppSettings, wait: Wait = False) -> JSONResponse:  # type: ignore[valid-type]
        return await _submit(mode, body, request, queue, settings, wait)

    submit.__name__ = mode
    submit.__doc__ = f"Queue a {mode} job; 202 with the job (or 200 when finished, with ``?wait=true``)."
    router.post(f"/{mode}", response_model=JobView, status_code=202)(submit)


for _mode in MODES:
    _route(_mode)


@router.get("/jobs", response_model=list[JobView])
def list_jobs(
    queue: Queue,
    caller: Caller,
    response: Response,
    state: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    status: Annotated[JobStatus | None, Query(include_in_schema=False)] = None,  # its name before the history
    owner: Annotated[str | None, Query(description="only this owner's jobs ('*': everyone's); a named key sees its own by default")] = None,
    cursor: Annotated[str | None, Query(description="the X-Next-Cursor header of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[JobView]:
    """The job history, newest first, from the job store (it survives restarts); the next page's cursor is
    in the ``X-Next-Cursor`` header, absent on the last page."""
    state = state or status
    owner = _owner_filter(owner, caller)
    jobs, after = queue.history(state=state.value if state else None, owner=owner, cursor=cursor, limit=limit)
    if after is not None:
        response.headers["X-Next-Cursor"] = after
    return [job_view(job, queue) for job in jobs]


def _owner_filter(owner: str | None, caller) -> str | None:
    """Whose jobs a list shows: everyone's for the admin unless asked, the caller's own for a named key
    unless it asks for another owner's or everyone's ('*')."""
    if owner == "*":
        return None
    if owner is None and not caller.admin:
        return caller.owner
    return owner


@router.get("/jobs/{job_id}", response_model=JobView)
async def get_job(job_id: str, queue: Queue) -> JobView:
    return job_view(queue.get(job_id), queue)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(job_id: str, queue: Queue) -> StreamingResponse:
    """Server-Sent Events: the job (as GET /jobs/{id}) after every change, until it finishes."""
    job = queue.get(job_id)

    async def stream():
        async for current in queue.watch(job, poll=15):
            view = job_view(current, queue).model_dump(mode="json")
            yield f"event: job\nid: {current.version}\ndata: {json.dumps(view, separators=(',', ':'))}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.post("/jobs/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, queue: Queue, caller: Caller) -> JobView:
    """Cancel a waiting job, or stop a running one after its current step (finished images are kept)."""
    return job_view(queue.cancel(job_id, caller), queue)


@router.delete("/jobs/{job_id}", response_model=JobView)
async def delete_job(job_id: str, queue: Queue, caller: Caller) -> JobView:
    """The same as cancel."""
    return job_view(queue.cancel(job_id, caller), queue)


class Move(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Literal["front", "back"] = Field(description="front: it runs next (among several owners: its owner's turn comes next); back: after its owner's other jobs")


@router.post("/jobs/{job_id}/move", response_model=JobView)
async def move_job(job_id: str, move: Move, queue: Queue, caller: Caller) -> JobView:
    """Move a waiting job to the front or the back of the queue."""
    return job_view(queue.move(job_id, move.to, caller), queue)


class Priority(BaseModel):
    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=-100, le=100, description="higher runs first; a named key may not go above 0")


@router.post("/jobs/{job_id}/priority", response_model=JobView)
async def set_job_priority(job_id: str, body: Priority, queue: Queue, caller: Caller) -> JobView:
    """Change a waiting job's priority."""
    return job_view(queue.set_priority(job_id, body.priority, caller), queue)


# Plain ``def`` (run in the thread pool): it reads the file, and may resize it.
@router.get("/jobs/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}})
def job_image(job_id: str, index: int, queue: Queue) -> Response:
    """An image as saved: PNG with its infotext (resized to the size asked for where the job says so);
    404 once its file has been deleted (from the gallery, say)."""
    job = queue.get(job_id)
    if not 0 <= index < len(job.images):
        raise InvalidRequestError("index", f"job {job_id} has {len(job.images)} images; index must be 0 to {len(job.images) - 1}")
    # Read whole, not streamed: a file deleted meanwhile is a 404 here, not a failure mid-response.
    return Response(job.png(index), media_type="image/png")


@router.get("/jobs/{job_id}/preview", responses={200: {"content": {"image/png": {}}}})
async def job_preview(job_id: str, queue: Queue) -> Response:
    """The latest live preview (a cheap latent-to-RGB projection at latent resolution)."""
    job = queue.get(job_id)
    if job.preview is None:
        return DIALECT.error_response(404, f"job {job_id} has no preview yet", None)
    return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})


class TrainingDataView(BaseModel):
    images: int
    licence: str | None
    source: str | None
    manifest_sha256: str


class SamplerView(BaseModel):
    name: str
    schedules: list[str] = Field(description="the schedule types it runs as asked; any other runs as the nearest it can")
    automatic: str = Field(description="the schedule type Automatic runs")
    flow: bool = Field(description="it runs on flow-matching models (SD 3.x, Flux.1) too")


def sampler_view(sampler: Sampler, config: Mapping | None = None) -> SamplerView:
    """``sampler`` on a model with this scheduler config (None: a U-Net model's)."""
    return SamplerView(
        name=sampler.name, schedules=sampler.schedules_on(config), automatic=resolve_schedule(sampler, "Automatic", config),
        flow=sampler.flow is not None,
    )


class FamilyView(BaseModel):
    """What a model's family decides for a request that leaves it open (steps, cfg_scale, sampler and
    distilled_cfg_scale null or absent): a client shows these as the model's defaults."""

    name: str = Field(description="the family's id: sd1, sd2, sdxl, sd3 or flux")
    label: str = Field(description="what people call it: SD 1.x, SDXL, SD 3.x, Flux.1, ...")
    flow: bool = Field(description="a flow-matching model (SD 3.x, Flux.1): it runs only the samplers GET /samplers marks flow")
    steps: int
    cfg_scale: float
    sampler: str
    schedule: str = Field(description="the schedule type Automatic runs with its sampler")
    distilled_cfg_scale: float | None = Field(
        description="the default of the network's own guidance input (Flux.1 dev); null: it has none, and distilled_cfg_scale is ignored"
    )
    negative_prompt: bool = Field(
        description="whether the negative prompt has an effect at the default CFG scale (at CFG scale 1 no negative pass runs)"
    )
    samplers: list[SamplerView] = Field(description="the samplers that run on its models, with the schedule types they run there")
    reference_images: bool = Field(description="whether its models read reference images (reference_images; Flux.2 Klein)")


# The registry's architecture column names the family by its label, with what it adds: " inpainting",
# " schnell" (Flux.1 without the guidance input) and " (diffusers)". "SD (diffusers)" is a U-Net folder
# of SD 1.x or 2.x, whose defaults are the same.
_FAMILY_LABELS = {f.label: f.name for f in FAMILIES.values()} | {"SD": "sd1"}


@cache
def family_view(architecture: str) -> FamilyView | None:
    """The family of a model by the registry's architecture column; None for one it does not name."""
    label = architecture.removesuffix(" (diffusers)").removesuffix(" inpainting")
    schnell, base = label.endswith(" schnell"), label.endswith(" base")
    name = _FAMILY_LABELS.get(label.removesuffix(" schnell").removesuffix(" base"))
    if name is None:
        return None
    spec = FAMILIES[name]
    steps, cfg_scale = spec.base_defaults if base else (SCHNELL_STEPS if schnell else spec.default_steps, spec.default_cfg)
    distilled = spec.default_distilled_cfg if spec.distilled_guidance and not schnell else None
    # The family's training schedule: its models' own configs differ in numbers, not in kind.
    config = spec.scheduler or None
    return FamilyView(
        name=name, label=spec.label, flow=spec.flow, steps=steps, cfg_scale=cfg_scale,
        sampler=spec.default_sampler, schedule=resolve_schedule(SAMPLERS[spec.default_sampler], "Automatic", config),
        distilled_cfg_scale=distilled, negative_prompt=cfg_scale != 1,
        samplers=[sampler_view(s, config) for s in SAMPLERS.values() if not spec.flow or s.flow is not None],
        reference_images=spec.reference_images,
    )


class ModelView(BaseModel):
    name: str
    architecture: str
    size_bytes: int
    short_hash: str
    sha256: str
    current: bool
    native_size: int | None = Field(description="the side in pixels the model draws best at (null: unknown)")
    family: FamilyView | None = Field(
        description="the model's family and the defaults it gives a request; null: not a model that generates"
    )
    training_data: TrainingDataView | None = Field(description="what a lienzo-trained model states about its data")
    provenance: str = Field(description="the training data in one line, or 'provenance unknown'")
    error: str | None = Field(None, description="why the file cannot be read (it cannot be chosen); null: readable")


def model_view(entry: ModelEntry, current: bool) -> ModelView:
    data = training_data_for(entry.path)
    family = None if entry.error else family_view(entry.architecture)
    # Transformer models state no size in a form the registry reads: their family's is theirs.
    side = native_size(entry) or (FAMILIES[family.name].default_size if family else None)
    return ModelView(
        name=entry.name, architecture=entry.architecture, size_bytes=entry.size_bytes, short_hash=entry.short_hash,
        sha256=entry.sha256, current=current, native_size=side, family=family,
        training_data=TrainingDataView(**asdict(data)) if data else None, provenance=describe_training_data(data), error=entry.error,
    )


class ModelChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a model name from GET /models, a short hash, or a path inside the models dir")


# Plain ``def`` (run in the thread pool): listing and resolving may hash a new multi-GB checkpoint.
@router.get("/models", response_model=list[ModelView])
def list_models(queue: Queue) -> list[ModelView]:
    """The models that can generate, and the files in the models dir that cannot be read, with ``error``
    saying why (so a damaged download shows up instead of silently missing)."""
    current = queue.current_model_or_none()
    return [model_view(e, e.path == current) for e in queue.registry.checkpoints(unreadable=True)]


@router.put("/models/current", response_model=ModelView)
def switch_model(choice: ModelChoice, queue: Queue) -> ModelView:
    """The model for jobs that name none, from the next job on. It is checked now (a listed, readable
    checkpoint); should it still fail to load, jobs go back to the previous model."""
    path = queue.resolve_checkpoint(choice.name, "name")
    queue.model = str(path)
    return model_view(queue.registry.entry(path), True)


@router.get("/fields", response_model=list[FieldView])
async def list_fields() -> list[FieldView]:
    """Every request field: label, help, type, default (and per-mode defaults), modes, limits, the studio's
    control, and its name at each door (CLI flag, A1111 and OpenAI keys, infotext key). The studio builds
    its controls and labels from this."""
    return field_views()


@router.get("/samplers", response_model=list[SamplerView])
async def list_samplers() -> list[SamplerView]:
    """Every sampler with the schedule types it runs as asked on U-Net models (a model's family lists
    its own: GET /models); ``flow`` says whether it runs on flow-matching models too."""
    return [sampler_view(s) for s in SAMPLERS.values()]


class LoraView(BaseModel):
    name: str
    size_bytes: int
    short_hash: str


@router.get("/loras", response_model=list[LoraView])
def list_loras(queue: Queue) -> list[LoraView]:
    return [LoraView(name=e.name, size_bytes=e.size_bytes, short_hash=e.short_hash) for e in queue.registry.loras()]


class WorkerView(BaseModel):
    name: str
    device: str
    busy: bool
    job: str | None
    models: list[str]
    pid: int | None = Field(description="its process, on the machine it runs on")


class QueueView(BaseModel):
    running: str | None = Field(description="the job started last of those running")
    waiting: int
    max_queue: int
    paused: bool
    jobs: list[JobView] = Field(description="running jobs, then the waiting ones in the order they will run")
    workers: list[WorkerView]


def queue_view(queue: JobQueue, settings: Settings, caller) -> QueueView:
    running = queue.running
    jobs = [*queue.running_jobs(), *queue.waiting_jobs()]
    return QueueView(
        running=running.id if running else None,
        waiting=queue.waiting,
        max_queue=settings.max_queue,
        paused=queue.paused,
        jobs=[job_view(job, queue) for job in jobs],
        workers=[
            WorkerView(name=w.name, device=w.device, busy=w.busy, job=w.job, models=[Path(m).name for m in w.models], pid=w.pid)
            for w in queue.workers
        ],
    )


@router.get("/queue", response_model=QueueView)
async def queue_state(queue: Queue, settings: AppSettings, caller: Caller) -> QueueView:
    """The queue: whether it is paused, its jobs in order, its workers."""
    return queue_view(queue, settings, caller)


@router.post("/queue/pause", response_model=QueueView)
async def pause_queue(queue: Queue, settings: AppSettings, caller: Caller) -> QueueView:
    """Start no new job until resumed (running ones go on); it stays paused across restarts. Admin only."""
    queue.pause(True, caller)
    return queue_view(queue, settings, caller)


@router.post("/queue/resume", response_model=QueueView)
async def resume_queue(queue: Queue, settings: AppSettings, caller: Caller) -> QueueView:
    queue.pause(False, caller)
    return queue_view(queue, settings, caller)


class CancelOwner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str | None = Field(None, description="whose jobs; null: the caller's own")


class Cancelled(BaseModel):
    cancelled: int


@router.post("/queue/cancel", response_model=Cancelled)
async def cancel_owner(body: CancelOwner, queue: Queue, caller: Caller) -> Cancelled:
    """Cancel every waiting and running job of one owner (a named key: only its own)."""
    return Cancelled(cancelled=queue.cancel_owner(body.owner if body.owner is not None else caller.owner, caller))
