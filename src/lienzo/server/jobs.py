"""The job queue: every API's requests become jobs, written to the job store (SQLite) before they are
acknowledged, and handed to the workers of a pool (one per device, or Ray actors) in the queue's order.

Order: higher ``priority`` first; among equal priorities, owners take turns (round-robin, the owner served
longest ago first), and each owner's jobs run in their own order (``seq``: "to the front" / "to the back").
A paused queue starts nothing new. After a restart, queued jobs run; a job that was running is run once more
(its seed was fixed when it was queued, so it makes the same pixels) and fails if it is cut short again.

Workers block (torch code), so each job runs on a thread of its own; the HTTP side is asyncio. State crosses
over in one direction only: a thread changes a job, then wakes the event loop (``call_soon_threadsafe``),
where waiters and progress streams read it.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from lienzo.errors import GenerationCancelled, InvalidRequestError, LienzoError, ModelFileError
from lienzo.gallery.store import Gallery
from lienzo.generation import limits
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.noise import random_seed
from lienzo.generation.request import GenerationRequest
from lienzo.images.credentials import Signing
from lienzo.models.registry import Registry
from lienzo.outputs import output_dir, save_generated, signing_for, wants_watermark
from lienzo.server.job import ANONYMOUS, Identity, Job, JobNotFoundError, JobStatus, QueueFullError, SavedImage, let_go
from lienzo.server.jobstore import JobStore
from lienzo.server.logs import job_context
from lienzo.server.runtime import Fitted, Loaded, Loader, Made, Step, Task
from lienzo.server.workers import LocalPool, Worker, WorkerLost, WorkerPool, default_devices
from lienzo.settings import Settings
from lienzo.studio import apply_styles, default_model

log = logging.getLogger(__name__)

# A job cut short by a dying worker or server runs once more; cut short again, it fails.
MAX_ATTEMPTS = 2


class ForbiddenError(LienzoError):
    """A named key touched another owner's job, or the queue itself."""


class JobQueue:
    """The server's jobs: durable in ``store``, run by ``pool``'s workers.

    ``loader(path, cancel)`` replaces ``lienzo.studio.load_model`` in a one-device pool of the server's
    own process (tests give fake models). Saved images go into ``gallery``, when given, with the job's
    source and owner.
    """

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        loader: Loader | None = None,
        gallery: Gallery | None = None,
        *,
        store: JobStore | None = None,
        pool: WorkerPool | None = None,
        devices: list[str] | None = None,
    ):
        self.settings = settings
        self.gallery = gallery
        self.registry = Registry(settings.models_dir, settings.cache_dir)
        self.model = model  # what jobs without a model use; None: the default model
        # The text encoder and VAE files models load with (Forge's forge_additional_modules), as load_model's
        # text_encoders and vae arguments; a change reloads the model before the next job.
        self.modules: dict = {}
        # What self.model was when it last loaded: where a switch to a model that fails to load goes back to.
        self._working_model = model
        self.store = store or JobStore.for_settings(settings)
        self.pool = pool or LocalPool(settings, devices or default_devices(settings), loader)
        self.on_finished: Callable[..., None] | None = None  # (model, device, seconds, images, state): metrics
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # in memory: unfinished and the latest keep_jobs
        self._pending: list[Job] = []
        self._running: dict[str, Job] = {}  # worker name -> job
        self._turns: dict[str | None, int] = {}  # owner -> when it was last served (round-robin)
        self._served = 0
        self._lock = threading.Condition()
        self._stopping = False
        self._dispatcher: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.paused = self.store.flag("paused") == "1"

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Take up what the store holds from before, start the workers and the dispatcher; call from the
        event loop that will serve the waiters."""
        self._loop = asyncio.get_running_loop()
        with self._lock:  # an app started again (tests do): what the store holds is the truth
            self._stopping = False
            self._pending.clear()
            self._running.clear()
        self._recover()
        self.pool.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="lienzo-dispatcher", daemon=True)
        self._dispatcher.start()

    def stop(self, timeout: float = 30) -> None:
        """Let the running jobs stop after their current step, and the workers go. Waiting jobs stay queued
        in the store: the next start runs them. A job stopped this way is queued again, as if never started."""
        with self._lock:
            self._stopping = True
            running = list(self._running.items())
            self._lock.notify_all()
        for name, job in running:
            self._worker(name).signal("cancel")
        for thread in [self._dispatcher, *self._threads]:
            if thread is not None:
                thread.join(timeout)
        self.pool.stop()
        self.store.close()

    def _recover(self) -> None:
        for job in self.store.unfinished():
            if job.status == JobStatus.RUNNING:
                if job.attempts >= MAX_ATTEMPTS:
                    job.status, job.finished = JobStatus.FAILED, time.time()
                    job.error = f"the server stopped twice while this job ran (attempts: {job.attempts}); it was not run again"
                    self.store.update(job)
                    continue
                log.warning("job %s was running when the server stopped; it runs again with seed %s", job.id, job.request.seed)
                job.status, job.images, job.worker = JobStatus.QUEUED, [], None
                self.store.update(job)
            self._jobs[job.id] = job
            self._pending.append(job)
        if self._pending:
            log.info("%d jobs from before the restart are queued", len(self._pending))

    # -- submitting and reading -----------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        model: str | None = None,
        source: str = "native",
        fit_to_model: bool = False,
        caller: Identity = ANONYMOUS,
        priority: int = 0,
    ) -> Job:
        """Queue a request after checking the server's and the caller's limits; raises InvalidRequestError or
        QueueFullError. The job is in the store when this returns. ``fit_to_model``: a size over twice the
        model's side is made at the model's size and answered resized. The queue owns the request's input
        images from here: it closes them when the job finishes."""
        self.check_limits(request, caller)
        if not caller.admin and priority > 0:
            raise ForbiddenError(f"priority: only the admin may queue jobs above priority 0 (asked: {priority})")
        request = apply_styles(request, self.gallery)  # now: an unknown style is the client's error, not the job's
        if request.safety is None:
            # The server's default policy (blur unless configured), recorded on the job for all to see.
            request = request.model_copy(update={"safety": self.settings.safety_server})
        if model is not None:
            self.resolve_model(model)  # fail now, with the list of models, not when the job runs
        self.check_loras(request)
        request = _fixed_seeds(request)
        job = Job(id=uuid.uuid4().hex, request=request, model=model, source=source, fit_to_model=fit_to_model)
        job.owner, job.priority = caller.owner, priority
        with self._lock:
            if self._stopping:
                raise QueueFullError("queue: the server is shutting down")
            if len(self._pending) >= self.settings.max_queue:
                raise QueueFullError(f"queue: {len(self._pending)} jobs are waiting, the limit (max_queue); try again later")
            mine = sum(1 for waiting in self._pending if waiting.owner == caller.owner)
            if caller.max_queued is not None and mine >= caller.max_queued:
                raise QueueFullError(f"queue: {caller.owner} has {mine} jobs waiting, the key's limit (max_queued {caller.max_queued})")
            job.seq = max((waiting.seq for waiting in self._pending), default=self.store.max_seq()) + 1
            self.store.add(job)  # before the client hears of it: a crash from here on loses nothing
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        log.info("job %s queued by %s (%s, priority %d)", job.id, job.owner or "anonymous", source, priority)
        return job

    def check_limits(self, request: GenerationRequest, caller: Identity = ANONYMOUS) -> None:
        """The limits every front door applies (lienzo.generation.limits), with the request's field names,
        and the caller's key's own pixel limit."""
        limits.check_limits(request, self.settings)
        if caller.max_pixels is not None and request.width and request.height and request.width * request.height > caller.max_pixels:
            raise InvalidRequestError(
                "width", f"{request.width}x{request.height} is {request.width * request.height} pixels, over the limit of "
                f"{caller.owner}'s key ({caller.max_pixels} pixels per image)"
            )

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
        """A job by id: in memory, else from the store (finished long ago, or before a restart)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self.store.load(job_id)
        if job is None:
            raise JobNotFoundError(f"job: no job with id {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        """The jobs in memory, newest first."""
        return list(reversed(self._jobs.values()))

    def history(self, *, state: str | None = None, owner: str | None = None, cursor: str | None = None, limit: int = 50):
        """A page of every job ever queued, newest first, as (jobs, next cursor or None); jobs in memory
        are returned as they are now."""
        jobs, after = self.store.history(state=state, owner=owner, cursor=cursor, limit=limit)
        return [self._jobs.get(job.id, job) for job in jobs], after

    def counts(self) -> dict[str, int]:
        """Jobs per state, over the whole history."""
        return self.store.counts()

    def waiting_jobs(self) -> list[Job]:
        """The waiting jobs in the order they will run (while the workers stay as they are)."""
        with self._lock:
            return self._ordered()

    def position(self, job: Job) -> int | None:
        """0 for the next job to run, None when it is not waiting."""
        with self._lock:
            if job not in self._pending:
                return None
            return self._ordered().index(job)

    @property
    def running(self) -> Job | None:
        """The job started last of those running (A1111's progress shows one)."""
        jobs = self.running_jobs()
        return jobs[-1] if jobs else None

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._running.values(), key=lambda job: job.started or 0)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

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

    def cancel(self, job_id: str, caller: Identity = ANONYMOUS) -> Job:
        """Cancel a waiting job at once, or a running one after its current step (finished images are kept)."""
        job = self.get(job_id)
        self._check_owner(job, caller)
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                self._finish_cancelled(job)
            elif job.status == JobStatus.RUNNING:
                job._cancel.set()
                self._signal(job, "cancel")
        return job

    def cancel_owner(self, owner: str | None, caller: Identity = ANONYMOUS) -> int:
        """Cancel every job of ``owner`` (waiting: at once; running: after the current step); how many."""
        if not caller.admin and owner != caller.owner:
            raise ForbiddenError(f"owner: {caller.owner} may cancel only their own jobs, not {owner}'s")
        with self._lock:
            jobs = [job for job in [*self._pending, *self._running.values()] if job.owner == owner]
        for job in jobs:
            self.cancel(job.id, caller)
        return len(jobs)

    def move(self, job_id: str, to: str, caller: Identity = ANONYMOUS) -> Job:
        """Move a waiting job to the ``front`` (it runs next; among several owners, it is its owner's turn)
        or the ``back`` (after every other of its owner's jobs)."""
        job = self.get(job_id)
        self._check_owner(job, caller)
        with self._lock:
            self._check_waiting(job)
            seqs = [waiting.seq for waiting in self._pending]
            if to == "front":
                job.seq = min(seqs) - 1
                self._turns[job.owner] = min(self._turns.values(), default=0) - 1
            else:
                job.seq = max(seqs) + 1
            self.store.update(job)
            self._lock.notify_all()
        self._notify(job)
        return job

    def set_priority(self, job_id: str, priority: int, caller: Identity = ANONYMOUS) -> Job:
        """Higher runs first. A named key may lower its own jobs' priority, not raise it above 0 (that
        would jump the other owners' turns)."""
        job = self.get(job_id)
        self._check_owner(job, caller)
        if not caller.admin and priority > 0:
            raise ForbiddenError(f"priority: only the admin may raise a job's priority above 0 (asked: {priority})")
        with self._lock:
            self._check_waiting(job)
            job.priority = priority
            self.store.update(job)
            self._lock.notify_all()
        self._notify(job)
        return job

    def pause(self, paused: bool, caller: Identity = ANONYMOUS) -> None:
        """Start no new job (running ones go on) until resumed; it stays paused across restarts."""
        if not caller.admin:
            raise ForbiddenError("queue: only the admin may pause or resume the queue")
        with self._lock:
            self.paused = paused
            self.store.set_flag("paused", "1" if paused else None)
            self._lock.notify_all()
        log.info("queue %s", "paused" if paused else "resumed")

    def interrupt(self, caller: Identity = ANONYMOUS) -> Job | None:
        """Stop the running job, if any, after its current step, keeping what it made (A1111's
        Interrupt): finished images, and the one in progress as its last step predicted it."""
        job = self._callers_running(caller)
        if job is not None:
            job._interrupt.set()
            self._signal(job, "interrupt")
        return job

    def skip(self, caller: Identity = ANONYMOUS) -> Job | None:
        """Drop the running job's current batch and go on with its next (A1111's Skip)."""
        job = self._callers_running(caller)
        if job is not None:
            job.skipped_batch = job.batch
            self._signal(job, "skip")
        return job

    def _callers_running(self, caller: Identity) -> Job | None:
        """The running job A1111's buttons act on: the latest started, of the caller's own when a named key asks."""
        jobs = [job for job in self.running_jobs() if caller.admin or job.owner == caller.owner]
        return jobs[-1] if jobs else None

    def _check_owner(self, job: Job, caller: Identity) -> None:
        if not caller.admin and job.owner != caller.owner:
            raise ForbiddenError(f"job: {job.id} is {job.owner or 'no one'}'s; {caller.owner} may change only their own jobs")

    def _check_waiting(self, job: Job) -> None:
        if job not in self._pending:
            raise InvalidRequestError("job", f"{job.id} is {job.status.value}; only a waiting job can be moved or reprioritised")

    def _signal(self, job: Job, what: str) -> None:
        if job.worker is not None and self._running.get(job.worker) is job:
            self._worker(job.worker).signal(what)

    def _worker(self, name: str) -> Worker:
        return next(worker for worker in self.pool.workers if worker.name == name)

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
            # Read before the yield: a job that finishes while the caller sends this state sets ``changed``,
            # and the loop comes round once more to yield it finished.
            finished = job.is_finished
            yield job
            if finished:
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
        """Called after ``job`` changed, from any thread."""
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

    # -- order and dispatch ---------------------------------------------------------------------

    def _ordered(self) -> list[Job]:
        """The waiting jobs in the order they run: by priority, then owners in turn (the one served longest
        ago first), each owner's jobs by ``seq``. Called under the lock."""
        ordered: list[Job] = []
        turns = dict(self._turns)
        served = self._served
        pending = sorted(self._pending, key=lambda job: (-job.priority, job.seq))
        while pending:
            top = pending[0].priority
            owners = {job.owner for job in pending if job.priority == top}
            owner = min(owners, key=lambda o: (turns.get(o, -1), min(j.seq for j in pending if j.owner == o and j.priority == top)))
            job = next(job for job in pending if job.owner == owner and job.priority == top)
            pending.remove(job)
            ordered.append(job)
            served += 1
            turns[owner] = served
        return ordered

    def _dispatch(self) -> None:
        """Hand the next job to a free worker, until stopped."""
        while True:
            with self._lock:
                while not self._stopping and not self._ready():
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._ordered()[0]
                worker = self._pick_worker(job)
                self._pending.remove(job)
                self._served += 1
                self._turns[job.owner] = self._served
                worker.busy, worker.job = True, job.id
                self._running[worker.name] = job
                job.status, job.started, job.worker = JobStatus.RUNNING, time.time(), worker.name
                job.attempts += 1
                job.step = job.total_steps = job.batch = 0
                self.store.update(job)
                thread = threading.Thread(target=self._run_on, args=(worker, job), name=f"lienzo-job-{worker.name}", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            self._notify(job)
            thread.start()

    def _ready(self) -> bool:
        return bool(self._pending) and not self.paused and any(not worker.busy for worker in self.pool.workers)

    def _pick_worker(self, job: Job) -> Worker:
        """A free worker holding the job's model, else the one idle longest."""
        free = [worker for worker in self.pool.workers if not worker.busy]
        try:
            path = str(self._model_path(job))
        except LienzoError:
            path = None
        holding = [worker for worker in free if path in worker.models]
        return (holding or sorted(free, key=lambda worker: worker.idle_since))[0]

    def _model_path(self, job: Job) -> Path:
        return self.resolve_model(job.model) if job.model else self.current_model()

    def _run_on(self, worker: Worker, job: Job) -> None:
        """Run ``job`` on ``worker``, saving its images as they come, and record how it ended."""
        began, requeued = time.monotonic(), False
        with job_context(job.id, worker.name):
            try:
                interrupted = self._run(worker, job)
                job.status = JobStatus.INTERRUPTED if interrupted else JobStatus.DONE
            except WorkerLost as err:
                requeued = self._lost(worker, job, err)
            except GenerationCancelled:
                # Stopped by the server's shutdown, not by anyone's cancel: it runs after the restart, as if never started.
                requeued = self._stopping and not job._cancel.is_set()
                job.status = JobStatus.QUEUED if requeued else JobStatus.CANCELLED
                job.attempts -= requeued
            except InvalidRequestError as err:
                job.status, job.error, job.error_field = JobStatus.FAILED, str(err), err.field
            except LienzoError as err:
                job.status, job.error = JobStatus.FAILED, str(err)
            except Exception as err:  # noqa: BLE001 - a failed job must never take the queue down
                log.exception("job %s failed", job.id)
                job.status, job.error = JobStatus.FAILED, f"internal error: {err}"
            finally:
                self._finish(worker, job, requeued, time.monotonic() - began)

    def _run(self, worker: Worker, job: Job) -> bool:
        """Run ``job`` on ``worker``; True when an interrupt ended it early."""
        tried = self.model
        path = self._model_path(job)
        task = Task(job.id, job.request, str(path), dict(self.modules), job.source, job.fit_to_model)
        loaded = interrupted = False
        watermark = wants_watermark(job.request, self.settings)
        signing = signing_for(job.request, self.settings)
        folder = output_dir(self.settings, job.request.mode)

        def emit(event) -> None:
            nonlocal loaded, interrupted
            if isinstance(event, Loaded):
                loaded, job.model_name = True, event.name
            elif isinstance(event, Fitted):
                job.request, job.resize_to = event.request, event.resize_to
                job.warnings.append(event.warning)
            elif isinstance(event, Step):
                job.step, job.total_steps, job.batch = event.step, event.total_steps, event.batch
                if event.preview is not None:
                    job.preview, job.preview_step = event.preview, event.step
            elif isinstance(event, Made):
                self._save(job, event, folder, watermark, signing)
            else:
                job.warnings += event.warnings
                interrupted = event.interrupted
            self._notify(job)

        try:
            worker.run(task, emit)
        except (GenerationCancelled, WorkerLost):
            raise
        except Exception:
            if not loaded and not job.model and self.model == tried and tried != self._working_model:
                log.warning("model %s failed to load; jobs without a model go back to %s", path, self._working_model or "the default")
                self.model = self._working_model
            raise
        if not job.model:
            self._working_model = tried
        return interrupted

    def _save(self, job: Job, made: Made, folder: Path, watermark: bool, signing: Signing | None) -> None:
        """Watermark, sign, save and record one image of ``job``: the server's side of every worker."""
        image = made.image
        saved = save_generated(
            image, folder, made.provenance, watermark=watermark, gallery=self.gallery, source=job.source,
            mode=job.request.mode, owner=job.owner, signing=signing, parent=job.request.init_image,
        )
        job.images.append(
            SavedImage(saved.path, image.seed, image.infotext, image.parameters, *image.image.size, image.filtered, saved.watermarked, saved.gallery_id)
        )
        self.store.update(job)

    def _lost(self, worker: Worker, job: Job, err: WorkerLost) -> bool:
        """The worker died under ``job``: a new worker in its place, and the job queued again once (True)."""
        log.warning("%s", err)
        replacement = self.pool.replace(worker)  # in the dead one's place in pool.workers
        if replacement is None:  # its machine is gone: the others take its jobs
            with self._lock:
                if worker in self.pool.workers:
                    self.pool.workers.remove(worker)
        if job.attempts >= MAX_ATTEMPTS:
            job.status, job.error = JobStatus.FAILED, f"{err}; it was the job's {job.attempts}th try, it is not run again"
            return False
        job.status = JobStatus.QUEUED
        return True

    def _finish(self, worker: Worker, job: Job, requeued: bool, seconds: float) -> None:
        with self._lock:
            if self._running.get(worker.name) is job:  # a replacement of the same name may have started another
                del self._running[worker.name]
            worker.busy, worker.job, worker.idle_since = False, None, time.monotonic()
            if requeued:
                job.images, job.worker, job.preview = [], None, None
                job.step = job.total_steps = job.batch = 0
                if not self._stopping:
                    self._pending.append(job)
            else:
                job.finished = time.time()
                let_go(job)
            self.store.update(job)
            self._lock.notify_all()
        if not requeued and self.on_finished is not None:
            self.on_finished(job.model_name or str(job.model), worker.device, seconds, len(job.images), job.status.value)
        log.info("job %s %s on %s in %.1f s", job.id, "queued again" if requeued else job.status.value, worker.name, seconds)
        self._notify(job)

    def _finish_cancelled(self, job: Job) -> None:
        let_go(job)
        job.status, job.finished = JobStatus.CANCELLED, time.time()
        self.store.update(job)
        self._notify(job)

    def _forget_old(self) -> None:
        """Keep at most ``keep_jobs`` finished jobs in memory (the store keeps them all)."""
        finished = [job_id for job_id, job in self._jobs.items() if job.is_finished]
        for job_id in finished[: max(0, len(finished) - self.settings.keep_jobs)]:
            del self._jobs[job_id]


def _fixed_seeds(request: GenerationRequest) -> GenerationRequest:
    """Draw the random seeds now, so that a job run again after a crash makes the same pictures."""
    update = {}
    if request.seed == -1:
        update["seed"] = random_seed()
    if request.subseed == -1 and request.subseed_strength > 0:
        update["subseed"] = random_seed()
    return request.model_copy(update=update) if update else request


def _same_file(name: str, path: Path) -> bool:
    """Whether the path a client wrote is ``path``, symlinks followed (nothing is opened)."""
    try:
        return Path(name).resolve() == path.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        return False
