"""A job: one request on its way through the queue (its status, progress, preview and saved images), and
the errors the queue answers with."""

import asyncio
import io
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import LienzoError
from lienzo.gallery.records import NotFoundError
from lienzo.generation.request import GenerationRequest


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # stopped early by A1111's Interrupt, with the images it had


FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INTERRUPTED)


@dataclass(frozen=True)
class Identity:
    """Who sent a request: an owner's jobs and gallery are theirs, and their limits apply. A server without
    named keys has one anonymous admin (``owner`` None); ``--auth``/``--api-key`` credentials are the admin."""

    owner: str | None = None
    admin: bool = True  # may see and control everyone's jobs and the queue itself
    max_queued: int | None = None  # jobs this owner may have waiting; None: only the server's max_queue
    max_pixels: int | None = None  # width x height of one image; None: only the server's max_pixels


ANONYMOUS = Identity()


class QueueFullError(LienzoError):
    """The queue holds ``max_queue`` waiting jobs; the client should retry later."""


class JobNotFoundError(LienzoError):
    """No job with that id (or it finished long enough ago to be forgotten)."""


@dataclass
class SavedImage:
    """What a job keeps of an image once it is saved (not its pixels: the server remembers
    ``keep_jobs`` jobs, and a 1024x1024 image's float pixels alone are 12 MB)."""

    path: Path
    seed: int
    infotext: str
    parameters: dict
    width: int
    height: int
    filtered: str | None = None  # "blurred" or "blocked" by the safety filter
    watermarked: bool = False  # the pixels carry lienzo's invisible watermark
    gallery_id: int | None = None  # None: not in the gallery (yet; reconcile adds it)

    def png(self) -> bytes:
        """The file as saved, infotext included; NotFoundError (404) once it has been deleted."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            # The error's own text names the server's path; clients are told what happened instead.
            raise NotFoundError("index", "the image's file was deleted after the job saved it (from the gallery or by hand)") from None


@dataclass(eq=False)
class Job:
    """One request on its way through the queue. The worker thread writes it; everyone else reads."""

    id: str
    request: GenerationRequest
    model: str | None  # None: the queue's current model
    source: str  # which API submitted it: native, a1111, openai
    owner: str | None = None  # the named API key that submitted it; None: no accounts
    priority: int = 0  # higher runs first; equal priorities take turns between owners
    seq: int = 0  # order among equal priorities and the same owner: moving a job to the front or back changes it
    attempts: int = 0  # times a worker started it; a job that was running when its worker died runs once more
    worker: str | None = None  # the worker running or that ran it
    created: float = field(default_factory=time.time)
    status: JobStatus = JobStatus.QUEUED
    started: float | None = None
    finished: float | None = None
    model_name: str = ""  # the model that ran it
    step: int = 0
    total_steps: int = 0
    batch: int = 0
    images: list[SavedImage] = field(default_factory=list)
    error: str | None = None
    error_field: str | None = None
    warnings: list[str] = field(default_factory=list)  # for the user, e.g. a size far from the model's
    # OpenAI's fixed sizes (1024x1024, ...) on a smaller model: make the model's size, answer resized.
    fit_to_model: bool = False
    resize_to: tuple[int, int] | None = None
    preview: bytes | None = None  # PNG of the latest latent preview
    preview_step: int = 0
    version: int = 0  # bumped on every change; progress streams send each version once
    skipped_batch: int | None = None  # the batch Skip dropped (A1111's progress reports it until the next)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _interrupt: threading.Event = field(default_factory=threading.Event, repr=False)
    _changed: asyncio.Event | None = field(default=None, repr=False)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def fraction(self) -> float:
        """Share of the denoising steps done, across batches (0 to 1)."""
        if self.status == JobStatus.DONE:
            return 1.0
        if not self.total_steps:
            return 0.0
        return (self.batch * self.total_steps + self.step) / (self.request.batch_count * self.total_steps)

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first step."""
        if self.status != JobStatus.RUNNING or not self.started or self.fraction <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.fraction * (1 - self.fraction)

    @property
    def interrupting(self) -> bool:
        """Interrupt was asked for: the job stops after its current step."""
        return self._interrupt.is_set()

    @property
    def skipping(self) -> bool:
        """Skip was asked for on the batch being made."""
        return self.skipped_batch == self.batch

    @property
    def seeds(self) -> list[int]:
        return [saved.seed for saved in self.images]

    def png(self, index: int) -> bytes:
        """Image ``index`` as the client asked for it: the saved file, or resized to ``resize_to`` with
        its text chunks (infotext, provenance) kept; the saved file stays the model's own size."""
        data = self.images[index].png()
        if self.resize_to is None:
            return data
        with Image.open(io.BytesIO(data)) as image:
            info = PngInfo()
            for key, value in image.info.items():
                if isinstance(key, str) and isinstance(value, str):
                    info.add_itxt(key, value)
            buffer = io.BytesIO()
            image.convert("RGB").resize(self.resize_to, Image.Resampling.LANCZOS).save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()


def let_go(job: Job) -> None:
    """Drop what a finished job no longer needs: its input images' pixels (a 4096x4096 upload is 64 MB
    decoded, and the server remembers ``keep_jobs`` jobs) and its live preview. A closed image keeps its
    size and mode, so the job's mode and parameters read as before; only its pixels are gone."""
    for image in (job.request.init_image, job.request.mask):
        if image is not None:
            image.close()
    job.preview = None
