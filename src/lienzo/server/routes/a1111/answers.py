"""lienzo's jobs, models and infotexts as A1111 answers them: ``info``, progress, model items."""

import json
import re
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from lienzo.images.metadata import parse_infotext
from lienzo.models.registry import ModelEntry
from lienzo.server.codec import JSONResponse, b64encode
from lienzo.server.job import Job, JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.a1111.schemas import (
    CommonRequest,
    GenerationResponse,
    Img2ImgRequest,
    ProgressResponse,
    ProgressState,
    SDModelItem,
)
from lienzo.server.routes.a1111.translate import DIALECT


@dataclass
class Notes:
    """What a request should be told besides its images: fields ignored, and warnings."""

    ignored: list[str] = dataclass_field(default_factory=list)
    warnings: list[str] = dataclass_field(default_factory=list)

    def headers(self, job: Job) -> dict[str, str]:
        """The same as response headers, for clients that read only the images (one line each, ASCII)."""
        headers = {"X-Lienzo-Ignored": self.ignored, "X-Lienzo-Warnings": self.warnings + job.warnings}
        return {k: "; ".join(v).encode("ascii", "replace").decode().replace("\n", " ") for k, v in headers.items() if v}


def _job_timestamp(job: Job) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created))


def job_info(job: Job, body: CommonRequest, notes: Notes | None = None) -> dict[str, Any]:
    """A1111's ``info`` (Processed.js) for a finished job, with lienzo's ``ignored`` and ``warnings``."""
    notes = notes or Notes()
    req = job.request
    first = job.images[0].parameters if job.images else {}
    seeds = job.seeds or [req.seed]
    count = len(seeds)
    # As A1111 answers them: the variation seeds of the images, the first one's counting up.
    subseeds = [int(s.parameters.get("Variation seed", -1)) for s in job.images] or [req.subseed]
    extra = {"Schedule type": first.get("Schedule type", req.schedule)}
    if "Fast" in first:
        extra["Fast"] = first["Fast"]
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * count,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": first.get("Sampler", req.sampler),
        # What the model family filled in where the request left it open (None), as the images say.
        "cfg_scale": float(first["CFG scale"]) if "CFG scale" in first else req.cfg_scale,
        "steps": int(first["Steps"]) if "Steps" in first else req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": first.get("Model", job.model_name or None),
        "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"),
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        # img2img's, or the hires fix's second pass's (A1111's txt2img denoising_strength).
        "denoising_strength": req.denoising_strength if req.init_image is not None else (req.hr_denoising_strength if req.enable_hr else None),
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [saved.infotext for saved in job.images],
        "styles": body.styles or [],
        "job_timestamp": _job_timestamp(job),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False,
        # lienzo's additions. "filtered", one entry per image as in "infotexts": "blurred"/"blocked" by the
        # safety filter, or null. "ignored": fields the request turned on that lienzo does not implement yet.
        "filtered": [saved.filtered for saved in job.images],
        "ignored": notes.ignored,
        "warnings": notes.warnings + job.warnings,
    }


def echoed_parameters(body: CommonRequest) -> dict[str, Any]:
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return parameters


def job_response(job: Job, body: CommonRequest, notes: Notes | None = None) -> GenerationResponse | JSONResponse:
    """Images finished so far (an interrupted job keeps them, as A1111 does), or the job's error."""
    if job.status == JobStatus.FAILED:
        message = job.error or "the job failed"
        if message.startswith("internal error"):
            return DIALECT.error_response(500, message, None)
        if job.error_field is None:
            return DIALECT.error_response(422, message, None)
        return DIALECT.field_error(job.error_field, message)
    images = [b64encode(saved.png()) for saved in job.images] if body.send_images else []
    answer = GenerationResponse(images=images, parameters=echoed_parameters(body), info=json.dumps(job_info(job, body, notes)))
    return JSONResponse(answer.model_dump(), headers=(notes or Notes()).headers(job))


def _next_job(queue: JobQueue) -> Job | None:
    """The running job, else the next one to run."""
    if queue.running is not None:
        return queue.running
    return next((job for job in queue.jobs() if job.status == JobStatus.QUEUED and queue.position(job) == 0), None)


def progress_view(queue: JobQueue, with_image: bool) -> ProgressResponse:
    job = _next_job(queue)
    if job is None:
        idle = ProgressState(
            skipped=False, interrupted=False, job="", job_count=0, job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0
        )
        return ProgressResponse(progress=0, eta_relative=0, state=idle)
    running = job.status == JobStatus.RUNNING
    snapshot = ProgressState(
        skipped=job.skipping,
        interrupted=job.interrupting,
        job=job.request.mode,
        job_count=job.request.batch_count,
        job_timestamp=_job_timestamp(job),
        job_no=job.batch,
        sampling_step=job.step,
        sampling_steps=job.total_steps,
    )
    preview = b64encode(job.preview) if with_image and job.preview else None
    return ProgressResponse(
        progress=min(1.0, max(job.fraction, 0.01)) if running else 0,
        eta_relative=job.eta or 0,
        state=snapshot,
        current_image=preview,
    )


def model_item(entry: ModelEntry) -> SDModelItem:
    return SDModelItem(title=entry.title, model_name=entry.flat_name, hash=entry.short_hash, sha256=entry.sha256, filename=str(entry.path))


def infotext_parameters(text: str) -> dict[str, Any]:
    """A1111's parsed form: Prompt, Negative prompt, then every key; sizes also split into -1 / -2."""
    parsed = parse_infotext(text)
    out: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt}
    for key, value in parsed.params.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = int(size[1]), int(size[2])
        else:
            out[key] = value
    return out
