"""What a server worker runs, wherever it lives: a thread of the server, a process of its own, or a Ray actor
on another machine.

A worker holds its device's loaded models (at most ``models_per_worker``, least recently used out first) and
runs one job at a time through the studio, *without saving*: it reports what happens as events (the model
loaded, each step with a preview, each image with its provenance, the end) and the server, which owns the
gallery, the job history and the files, saves the images. So a worker on another machine needs the models
and nothing else, and every event is a small picklable object that crosses a pipe or Ray unchanged.
"""

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from lienzo.errors import GenerationCancelled, InvalidRequestError, LienzoError
from lienzo.generation import engine
from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import GenerationRequest
from lienzo.images.provenance import Provenance
from lienzo.models.components import Components
from lienzo.origins import provenance_for
from lienzo.settings import Settings
from lienzo.studio import Studio, load_model

log = logging.getLogger(__name__)

# (model path, cancel check) -> ready Components; the check is asked between the model's parts.
Loader = Callable[[str, Callable[[], bool]], Components]


@dataclass
class Task:
    """One job as a worker sees it: the request (styles merged, seed fixed), the model file and the
    text encoder/VAE files to load it with."""

    job_id: str
    request: GenerationRequest
    model: str  # a resolved path: the server checked the client's name against its models dir
    modules: dict = field(default_factory=dict)  # load_model's text_encoders / vae
    source: str = "native"
    fit_to_model: bool = False


@dataclass
class Loaded:
    """The model is ready; ``name`` is how infotexts and answers call it."""

    name: str


@dataclass
class Fitted:
    """A size over twice the model's side is made at the model's size and answered resized."""

    request: GenerationRequest
    resize_to: tuple[int, int]
    warning: str


@dataclass
class Step:
    step: int
    total_steps: int
    batch: int
    preview: bytes | None = None  # PNG of the latent preview, every ``preview_every`` steps


@dataclass
class Made:
    """An image, done: the server watermarks, saves and records it. Its float pixels stay behind (12 MB at 1024²)."""

    image: GeneratedImage
    provenance: Provenance


@dataclass
class Finished:
    interrupted: bool
    warnings: list[str]


Event = Loaded | Fitted | Step | Made | Finished


@dataclass
class Signals:
    """What the server asks of the running job; set from another thread (or from the pipe a process
    worker listens on), read between steps."""

    cancel: threading.Event = field(default_factory=threading.Event)
    interrupt: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)

    def set(self, what: str) -> None:
        getattr(self, what).set()

    def clear(self) -> None:
        for event in (self.cancel, self.interrupt, self.skip):
            event.clear()


def fit_request(request: GenerationRequest, native: int) -> Fitted | None:
    """A txt2img request over twice the model's side, made at about the model's area (same aspect, sides
    multiples of 8) and answered resized to the size asked for; None when it fits."""
    width, height = request.width, request.height
    if request.init_image is not None or not width or not height or max(width, height) <= 2 * native:
        return None
    scale = native / (width * height) ** 0.5
    fitted = (max(64, round(width * scale / 8) * 8), max(64, round(height * scale / 8) * 8))
    warning = (
        f"{width}x{height} is more than twice this model's side ({native}); made at {fitted[0]}x{fitted[1]} "
        f"and resized to {width}x{height}"
    )
    return Fitted(request.model_copy(update={"width": fitted[0], "height": fitted[1]}), (width, height), warning)


class WorkerRuntime:
    """One device's models and the job running on them. ``loader`` replaces :func:`lienzo.studio.load_model`
    (tests give a fake one); ``device`` None: the settings' device."""

    def __init__(self, settings: Settings, device: str | None = None, loader: Loader | None = None):
        self.settings = settings
        self.device = device or settings.device
        self._loader = loader
        self._models: OrderedDict[tuple, object] = OrderedDict()  # (path, modules) -> Components, oldest first

    @property
    def models(self) -> list[str]:
        """The model files loaded here, most recently used last."""
        return [key[0] for key in self._models]

    def run(self, task: Task, emit: Callable[[Event], None], signals: Signals) -> None:
        """Run ``task``, reporting through ``emit``; raises what the job failed with (GenerationCancelled,
        InvalidRequestError, LienzoError, anything else as an internal error)."""
        components = self._components(task, signals.cancel.is_set)
        emit(Loaded(components.name))
        request = task.request
        if task.fit_to_model:
            fitted = fit_request(request, engine.native_size(components))
            if fitted is not None:
                emit(fitted)
                request = fitted.request
        # Remote clients name LoRAs only as the models dir's Lora folder lists them.
        studio = Studio(self.settings, allow_lora_paths=False)
        every = self.settings.preview_every

        def on_step(p: engine.Progress) -> None:
            preview = None
            if p.step % every == 0 or p.step == p.total_steps:
                previews = p.preview()
                preview = _png(previews[0]) if previews else None
            emit(Step(p.step, p.total_steps, p.batch, preview))

        def on_image(image: engine.GeneratedImage) -> None:
            emit(Made(replace(image, pixels=np.empty(0, np.float32)), provenance_for(components)))

        def skip() -> bool:
            skipped = signals.skip.is_set()
            signals.skip.clear()
            return skipped

        result = studio.run(
            components, request, save=False, progress=on_step, cancel=signals.cancel.is_set, on_image=on_image,
            skip=skip, interrupt=signals.interrupt.is_set,
        )
        emit(Finished(result.interrupted, result.warnings))

    def _components(self, task: Task, cancel: Callable[[], bool]):
        key = (task.model, tuple(sorted(task.modules.items())))
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.settings.models_per_worker:
            self._models.popitem(last=False)  # the old model's memory first: SDXL alone is ~7 GB
        loaded = self._load(task.model, cancel, task.modules)
        self._models[key] = loaded
        return loaded

    def _load(self, path: str, cancel: Callable[[], bool], modules: dict):
        if self._loader is not None:
            return self._loader(path, cancel)
        settings = self.settings
        return load_model(path, device=self.device, dtype=settings.dtype, settings=settings, cancel=cancel, **modules)


@dataclass
class Failure:
    """A job's error as it crosses a process or machine boundary (exceptions with their own constructors do
    not all pickle), turned back into the same kind of error on the server's side."""

    kind: str  # cancelled, invalid, lienzo, internal
    message: str
    field: str | None = None

    @classmethod
    def of(cls, err: BaseException) -> "Failure":
        if isinstance(err, GenerationCancelled):
            return cls("cancelled", str(err))
        if isinstance(err, InvalidRequestError):
            return cls("invalid", str(err), err.field)
        if isinstance(err, LienzoError):
            return cls("lienzo", str(err))
        return cls("internal", f"{type(err).__name__}: {err}")

    def error(self) -> Exception:
        if self.kind == "cancelled":
            return GenerationCancelled(self.message)
        if self.kind == "invalid":
            err = InvalidRequestError(self.field or "request", "")
            err.args = (self.message,)  # the message as the worker wrote it, field included
            return err
        if self.kind == "lienzo":
            return LienzoError(self.message)
        return RuntimeError(self.message)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
