"""The job queue: every API's requests become jobs that one worker thread runs in order on one device.

The worker is a plain thread because the engine is blocking torch code; the HTTP side is asyncio.
State crosses over in one direction only: the worker changes a job, then wakes the event loop
(``call_soon_threadsafe``), where waiters and progress streams read it.
"""

import asyncio
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from PIL import Image

from lienzo.errors import GenerationCancelled, InvalidRequestError, LienzoError, ModelFileError
from lienzo.gallery.store import Gallery
from lienzo.generation import engine, limits
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.request import GenerationRequest
from lienzo.models.components import Components
from lienzo.models.registry import Registry
from lienzo.outputs import SavedOutput
from lienzo.server.job import Job, JobNotFoundError, JobStatus, QueueFullError, SavedImage, fit_to_native, let_go
from lienzo.settings import Settings
from lienzo.studio import Studio, apply_styles, default_model, load_model

log = logging.getLogger(__name__)

# (model path, cancel check) -> ready Components; the check is asked between the model's parts.
Loader = Callable[[str, Callable[[], bool]], Components]


class JobQueue:
    """Jobs in submission order, one worker thread, one loaded model at a time.

    ``loader(path, cancel)`` returns ready Components, calling ``cancel()`` between its parts to stop
    early; by default ``lienzo.studio.load_model`` on the settings' device. A job naming another model swaps it in (and the old one out) before it runs.
    Saved images are added to ``gallery``, when given, with the job's source.
    """

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        loader: Loader | None = None,
        gallery: Gallery | None = None,
    ):
        self.settings = settings
        self.gallery = gallery
        self.registry = Registry(settings.models_dir, settings.cache_dir)
        self.model = model  # what jobs without a model use; None: the default model
        # The text encoder and VAE files models load with (Forge's forge_additional_modules), as load_model's
        # text_encoders and vae arguments; a change reloads the model before the next job.
        self.modules: dict = {}
        self._loaded_modules: dict = {}
        # What self.model was when it last loaded: where a switch to a model that fails to load goes back to.
        self._working_model = model
        self._loader = loader or (
            lambda name, cancel: load_model(
                name, device=settings.device, dtype=settings.dtype, settings=settings, cancel=cancel, **self.modules
            )
        )
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._loaded: tuple[Path, Components] | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker; call from the event loop that will serve the waiters."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="lienzo-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Cancel everything and let the worker finish its current step."""
        with self._lock:
            self._stopping = True
            for job in list(self._pending):
                self._finish_cancelled(job)
            self._pending.clear()
            if self._running is not None:
                self._running._cancel.set()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- submitting and reading -----------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, *, model: str | None = None, source: str = "native", fit_to_model: bool = False
    ) -> Job:
        """Queue a request after checking the server's limits; raises InvalidRequestError or QueueFullError.
        ``fit_to_model``: a size over twice the model's side is made at the model's size and answered resized.
        The queue owns the request's input images from here: it closes them when the job finishes."""
        self.check_limits(request)
        request = apply_styles(request, self.gallery)  # now: an unknown style is the client's error, not the job's
        if request.safety is None:
            # The server's default policy (blur unless configured), recorded on the job for all to see.
            request = request.model_copy(update={"safety": self.settings.safety_server})
        if model is not None:
            self.resolve_model(model)  # fail now, with the list of models, not when the job runs
        self.check_loras(request)
        job = Job(id=uuid.uuid4().hex, request=request, model=model, source=source, fit_to_model=fit_to_model)
        with self._lock:
            if self._stopping:
                raise QueueFullError("queue: the server is shutting down")
            if len(self._pending) >= self.settings.max_queue:
                raise QueueFullError(f"queue: {len(self._pending)} jobs are waiting, the limit (max_queue); try again later")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        return job

    def check_limits(self, request: GenerationRequest) -> None:
        """The limits every front door applies (lienzo.generation.limits), with the request's field names."""
        limits.check_limits(request, self.settings)

    def resolve_model(self, name: str, field: str = "model") -> Path:
        """A model a client names: one the registry lists or a path into the models dir, never a path
        elsewhere (see ``Registry.resolve``); or the current model by its path, as the A1111 routes list
        it (``lienzo serve --model`` may have named one outside the models dir)."""
        if Path(name).is_absolute():
            current = self.current_model_or_none()
            if current is not None and _same_file(name, current):
                return current
        return self.registry.resolve(name, allow_paths=False, field=field)

    def resolve_checkpoint(self, name: str, field: str = "model") -> Path:
        """As :meth:`resolve_model`, and the model must be readable and able to generate: for switching
        the current model, which every later job without a model would otherwise fail on."""
        path = self.resolve_model(name, field)
        entry = self.registry.entry(path)
        if entry.error:
            raise ModelFileError(f"{field}: {entry.name} cannot be used: {entry.error}")
        if not entry.is_checkpoint:
            raise ModelFileError(f"{field}: {entry.name} is not a model that can generate ({entry.architecture})")
        return path

    def check_loras(self, request: GenerationRequest) -> None:
        """Every LoRA the request names is one the models dir's LoRA folder lists (no path elsewhere);
        the error names the field it came from: ``prompt`` (a <lora:...> tag) or ``loras``."""
        tagged = {name for name, _ in extract_lora_tags(request.prompt)[1]}
        for lora in request.requested_loras():
            self.registry.resolve_lora(lora.name, allow_paths=False, field="prompt" if lora.name in tagged else "loras")

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"job: no job with id {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        """Every remembered job, newest first."""
        return list(reversed(self._jobs.values()))

    def position(self, job: Job) -> int | None:
        """0 for the next job to run, None when it is not waiting."""
        with self._lock:
            for i, waiting in enumerate(self._pending):
                if waiting is job:
                    return i
        return None

    @property
    def running(self) -> Job | None:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def loaded_model(self) -> Path | None:
        return self._loaded[0] if self._loaded else None

    def current_model(self) -> Path:
        """The model a job without one runs on. ``self.model`` is resolved as a local path may be: it was
        set by whoever started the server, or by a switch that checked it with :meth:`resolve_checkpoint`."""
        return self.registry.resolve(self.model) if self.model else default_model(self.registry, self.settings)

    def current_model_or_none(self) -> Path | None:
        """As :meth:`current_model`, resolved, or None when there is no model at all."""
        try:
            return self.current_model().resolve()
        except ModelFileError:
            return None

    # -- control --------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a waiting job at once, or a running one after its current step (finished images are kept)."""
        job = self.get(job_id)
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                self._finish_cancelled(job)
            elif job.status == JobStatus.RUNNING:
                job._cancel.set()
        return job

    def interrupt(self) -> Job | None:
        """Stop the running job, if any, after its current step, keeping what it made (A1111's
        Interrupt): finished images, and the one in progress as its last step predicted it."""
        job = self._running
        if job is not None:
            job._interrupt.set()
        return job

    def skip(self) -> Job | None:
        """Drop the running job's current batch and go on with its next (A1111's Skip)."""
        job = self._running
        if job is not None:
            job.skipped_batch = job.batch
            job._skip.set()
        return job

    # -- waiting (event loop side) --------------------------------------------------------------

    async def wait(self, job: Job, disconnected: Callable[[], "asyncio.Future[bool]"] | None = None) -> Job:
        """Wait until ``job`` finishes. If the client goes away first, a waiting job is cancelled (no
        one will read it) and a running one is left to finish and be saved."""
        async for _ in self.watch(job, poll=1.0):
            if disconnected is not None and not job.is_finished and await disconnected():
                if job.status == JobStatus.QUEUED:
                    self.cancel(job.id)
                break
        return job

    async def watch(self, job: Job, poll: float | None = None) -> AsyncIterator[Job]:
        """Yield ``job`` now and after every change until it finishes (and once more, finished);
        with ``poll``, also every ``poll`` seconds without a change."""
        while True:
            changed = self._event(job)
            yield job
            if job.is_finished:
                return
            try:
                await asyncio.wait_for(changed.wait(), poll)
            except TimeoutError:
                pass

    def _event(self, job: Job) -> asyncio.Event:
        if job._changed is None:
            job._changed = asyncio.Event()
        return job._changed

    def _notify(self, job: Job) -> None:
        """Called by the worker after it changed ``job``."""
        job.version += 1
        if self._loop is None or self._loop.is_closed():
            return

        def wake() -> None:
            event, job._changed = job._changed, None
            if event is not None:
                event.set()

        try:
            self._loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.status, job.started = JobStatus.RUNNING, time.time()
                self._running = job
            self._notify(job)
            try:
                interrupted = self._run(job)
                job.status = JobStatus.INTERRUPTED if interrupted else JobStatus.DONE
            except GenerationCancelled:
                job.status = JobStatus.CANCELLED
            except InvalidRequestError as err:
                job.status, job.error, job.error_field = JobStatus.FAILED, str(err), err.field
            except LienzoError as err:
                job.status, job.error = JobStatus.FAILED, str(err)
            except Exception as err:  # noqa: BLE001 - a failed job must never take the worker down
                log.exception("job %s failed", job.id)
                job.status, job.error = JobStatus.FAILED, f"internal error: {type(err).__name__}: {err}"
            finally:
                let_go(job)
                with self._lock:
                    job.finished = time.time()
                    self._running = None
                self._notify(job)

    def _run(self, job: Job) -> bool:
        """Run ``job`` through the studio, keeping its progress, preview and saved images on the job;
        True when an interrupt ended it early."""
        components = self._components(job.model, job._cancel.is_set)
        job.model_name = components.name
        if job.fit_to_model:
            fit_to_native(job, engine.native_size(components))
        # Remote clients name LoRAs only as the models dir's Lora folder lists them.
        studio = Studio(self.settings, gallery=self.gallery, allow_lora_paths=False)

        def on_step(p: engine.Progress) -> None:
            job.step, job.total_steps, job.batch = p.step, p.total_steps, p.batch
            if p.step % self.settings.preview_every == 0 or p.step == p.total_steps:
                previews = p.preview()
                if previews:
                    job.preview, job.preview_step = _png(previews[0]), p.step
            self._notify(job)

        def on_saved(image: engine.GeneratedImage, saved: SavedOutput) -> None:
            job.images.append(
                SavedImage(
                    saved.path, image.seed, image.infotext, image.parameters, *image.image.size, image.filtered, saved.watermarked,
                    saved.gallery_id,
                )
            )
            self._notify(job)

        def skip() -> bool:
            skipped = job._skip.is_set()
            job._skip.clear()
            return skipped

        result = studio.run(
            components, job.request, source=job.source, progress=on_step, cancel=job._cancel.is_set, on_saved=on_saved,
            skip=skip, interrupt=job._interrupt.is_set,
        )
        job.warnings += result.warnings
        return result.interrupted

    def _components(self, name: str | None, cancel: Callable[[], bool]) -> Components:
        """The job's model, loaded. One model is in memory at a time, so the old one is dropped before the
        new one loads (SDXL alone is ~7 GB). If the current model (a switch) fails to load, jobs without a
        model go back to the one that last loaded: the next such job reloads it."""
        tried = self.model
        path = self.resolve_model(name) if name else self.current_model()
        if self._loaded is None or self._loaded[0] != path or self._loaded_modules != self.modules:
            self._loaded = None
            try:
                self._loaded_modules = dict(self.modules)
                self._loaded = (path, self._loader(str(path), cancel))
            except GenerationCancelled:
                raise
            except Exception:
                if not name and self.model == tried and tried != self._working_model:
                    log.warning("model %s failed to load; jobs without a model go back to %s", path, self._working_model or "the default")
                    self.model = self._working_model
                raise
        if not name:
            self._working_model = tried
        return self._loaded[1]

    def _finish_cancelled(self, job: Job) -> None:
        let_go(job)
        job.status, job.finished = JobStatus.CANCELLED, time.time()
        self._notify(job)

    def _forget_old(self) -> None:
        """Keep at most ``keep_jobs`` finished jobs (their images stay on disk)."""
        finished = [job_id for job_id, job in self._jobs.items() if job.is_finished]
        for job_id in finished[: max(0, len(finished) - self.settings.keep_jobs)]:
            del self._jobs[job_id]



def _same_file(name: str, path: Path) -> bool:
    """Whether the path a client wrote is ``path``, symlinks followed (nothing is opened)."""
    try:
        return Path(name).resolve() == path.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        return False



def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
