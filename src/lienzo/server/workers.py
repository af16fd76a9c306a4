"""The server's workers: one per device, behind one small interface, so the queue does not know whether it
drives a thread of its own process, a process per GPU, or Ray actors on other machines (lienzo.server.cluster).

A worker runs one job at a time (:meth:`Worker.run` blocks until it ends), takes signals for it (cancel,
interrupt, skip), says which models it holds (the queue prefers a worker that has the job's model) and how
much memory it uses. A worker that dies mid-job raises :class:`WorkerLost`; the pool starts a new one and the
queue runs the job again.
"""

import logging
import multiprocessing
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from lienzo.errors import LienzoError
from lienzo.server.logs import current_setup, job_context, setup_logging
from lienzo.server.runtime import Event, Failure, Finished, Loader, Signals, Task, WorkerRuntime
from lienzo.settings import Settings

log = logging.getLogger(__name__)


class WorkerLost(LienzoError):
    """The worker running a job died (its process was killed, its machine left the cluster)."""


class Worker(ABC):
    """One device's worker, as the queue sees it."""

    name: str
    device: str
    busy: bool = False
    job: str | None = None  # the id of the job it runs
    idle_since: float = 0.0

    @property
    @abstractmethod
    def models(self) -> list[str]:
        """The model files it holds loaded, most recently used last."""

    @property
    def pid(self) -> int | None:
        """Its process id (on the machine it runs on), where known."""
        return None

    @abstractmethod
    def run(self, task: Task, emit: Callable[[Event], None]) -> None:
        """Run ``task``, calling ``emit`` with each event, until it ends; raises the job's error, or
        WorkerLost when the worker died."""

    @abstractmethod
    def signal(self, what: str) -> None:
        """``cancel``, ``interrupt`` or ``skip`` the running job."""

    def memory(self) -> dict[str, int]:
        """Bytes in use: ``rss`` (its process) and ``device`` (accelerator memory), where known."""
        return {}

    def close(self) -> None:
        """Let go of its models and, for a process, end it."""


class WorkerPool(ABC):
    """The workers the queue hands jobs to."""

    workers: list[Worker]

    def start(self) -> None:
        """Start every worker; called once, before the first job."""

    @abstractmethod
    def replace(self, worker: Worker) -> Worker | None:
        """A fresh worker in place of one that died; None when none can be had (its machine is gone)."""

    def stop(self) -> None:
        for worker in self.workers:
            worker.close()


class ThreadWorker(Worker):
    """The worker in the server's own process: the job runs on the queue's thread. No pipe between the
    server and its model: the default for one device, and what tests with fake loaders use."""

    def __init__(self, settings: Settings, device: str, loader: Loader | None = None, name: str | None = None):
        self.name, self.device = name or device, device
        self.runtime = WorkerRuntime(settings, device if device != "auto" else None, loader)
        self.signals = Signals()

    @property
    def models(self) -> list[str]:
        return self.runtime.models

    @property
    def pid(self) -> int:
        return os.getpid()

    def run(self, task: Task, emit: Callable[[Event], None]) -> None:
        self.signals.clear()
        self.runtime.run(task, emit, self.signals)

    def signal(self, what: str) -> None:
        self.signals.set(what)

    def memory(self) -> dict[str, int]:
        return {"rss": process_memory(os.getpid()), **device_memory(self.device)}

    def close(self) -> None:
        self.runtime._models.clear()


class ProcessWorker(Worker):
    """A worker in a process of its own (spawned: CUDA cannot be forked), for one device. Tasks and signals
    go down two pipes, events come back up; a process that dies mid-job surfaces as WorkerLost."""

    def __init__(self, settings: Settings, device: str, name: str | None = None, threads: int | None = None):
        self.name, self.device = name or device, device
        self.settings, self.threads = settings, threads
        self._models: list[str] = []
        self._process = None
        self._tasks = self._signals = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._tasks, child_tasks = context.Pipe()
        self._signals, child_signals = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(self.settings.model_dump(), self.name, self.device, self.threads, current_setup(), child_tasks, child_signals),
            name=f"lienzo-worker-{self.name}", daemon=True,
        )
        self._process.start()
        child_tasks.close()
        child_signals.close()
        self._models = []

    def run(self, task: Task, emit: Callable[[Event], None]) -> None:
        try:
            self._tasks.send(task)
            while True:
                message = self._tasks.recv()
                if isinstance(message, Failure):
                    raise message.error()
                if isinstance(message, list):  # the models it holds, after loading
                    self._models = message
                    continue
                emit(message)
                if isinstance(message, Finished):
                    return
        except (EOFError, OSError, BrokenPipeError) as err:
            code = self._process.exitcode if self._process is not None else None
            raise WorkerLost(f"worker {self.name} died while running job {task.job_id} (exit code {code})") from err

    def signal(self, what: str) -> None:
        try:
            self._signals.send(what)
        except (OSError, BrokenPipeError):
            pass  # it died: run() reports that

    def memory(self) -> dict[str, int]:
        return {"rss": process_memory(self.pid)} if self.pid else {}

    def close(self) -> None:
        if self._process is None:
            return
        try:
            self._tasks.send(None)
        except (OSError, BrokenPipeError):
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._process = None


def _serve(settings: dict, name: str, device: str, threads: int | None, logging_setup: tuple, tasks, signals) -> None:
    """A process worker's life: take tasks until told to stop (None) or the server goes away. It logs as the
    server does (format and level), each line with its job and worker."""
    from lienzo.devices import configure_threads

    setup_logging(*logging_setup)
    configure_threads(threads)
    runtime = WorkerRuntime(Settings(**settings), device if device != "auto" else None)
    current = Signals()

    def listen() -> None:  # signals arrive while the main thread is busy denoising
        try:
            while True:
                current.set(signals.recv())
        except (EOFError, OSError):
            current.cancel.set()

    threading.Thread(target=listen, daemon=True).start()
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        current.clear()

        def emit(event) -> None:
            if event.__class__.__name__ == "Loaded":
                tasks.send(runtime.models)
            tasks.send(event)

        try:
            with job_context(task.job_id, name):
                runtime.run(task, emit, current)
        except BaseException as err:  # noqa: BLE001 - the job's error goes back to the server; the worker lives on
            log.debug("job %s failed in worker", task.job_id, exc_info=True)
            tasks.send(Failure.of(err))


class LocalPool(WorkerPool):
    """One worker per device on this machine. With one device the worker is a thread of the server (no pipe);
    with several, or ``processes`` True, each is a process: a GPU's CUDA context is its own, a crash takes
    one worker and not the server, and CPU processes stand in for GPUs in tests and benchmarks (each gets
    its share of the cores)."""

    def __init__(self, settings: Settings, devices: list[str], loader: Loader | None = None, processes: bool | None = None):
        self.settings, self.devices, self.loader = settings, devices, loader
        self.processes = len(devices) > 1 if processes is None else processes
        if self.processes and loader is not None:
            raise ValueError("a custom loader runs only in the server's process: give one device")
        names = worker_names(devices)
        cpus = sum(d == "cpu" for d in devices)
        threads = settings.threads or (max(1, (os.cpu_count() or 1) // cpus) if cpus > 1 else None)
        if self.processes:
            self.workers = [ProcessWorker(settings, d, n, threads if d == "cpu" else settings.threads) for d, n in zip(devices, names)]
        else:
            self.workers = [ThreadWorker(settings, d, loader, n) for d, n in zip(devices, names)]

    def start(self) -> None:
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.start()
            worker.idle_since = time.monotonic()

    def replace(self, worker: Worker) -> Worker:
        if isinstance(worker, ProcessWorker):
            log.warning("worker %s died; starting a new one", worker.name)
            worker.close()
            worker.start()
        return worker


def default_devices(settings: Settings) -> list[str]:
    """Every GPU, else the settings' device (the CPU): one worker each, named after its device."""
    if settings.device not in ("auto", "cuda"):
        return [settings.device]
    import torch

    from lienzo.devices import pick_device

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(pick_device(settings.device))]


def parse_devices(text: str) -> list[str]:
    """``cuda:0,cuda:1`` or ``cpu,cpu`` (two CPU workers) as a list; ValueError naming what is wrong."""
    devices = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not devices:
        raise ValueError("give one or more devices, e.g. cuda:0,cuda:1 or cpu")
    for device in devices:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda", "mps", "xpu", "auto") or (index and not index.isdigit()):
            raise ValueError(f"{device!r} is not a device: use cpu, cuda, cuda:N, mps or xpu")
    return devices


def worker_names(devices: list[str]) -> list[str]:
    """Worker names: the device, numbered where it repeats (two CPU workers: cpu.0, cpu.1)."""
    return [f"{d}.{devices[:i].count(d)}" if devices.count(d) > 1 else d for i, d in enumerate(devices)]


def process_memory(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def device_memory(device: str) -> dict[str, int]:
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"device": torch.cuda.memory_allocated(device)} if torch.cuda.is_available() else {}
