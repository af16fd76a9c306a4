"""Workers on other machines: a Ray cluster's GPUs, one Ray actor each (``lienzo serve --cluster ADDRESS``).

Why Ray: it does what a cluster needs and lienzo should not write by hand: placing one actor per GPU across
machines, noticing when a process or a whole machine dies, and moving bytes between nodes. Each actor wraps
the same :class:`~lienzo.server.runtime.WorkerRuntime` a local worker runs; the server keeps the queue, the
gallery and the files, and the actors hand back the runtime's small events.

Models: a task names its model by the server's path. A node that sees the same file at that path (a shared
models folder) loads it from there; any other node first copies it from the server, through a small "files"
actor on the server's own node, into its own cache, once per version of the file. (Through Ray Client the
server's side of the cluster is the head node: the files actor runs there, reading the head's disk.)

Ray is an optional extra (``pip install 'lienzo[cluster]'``): only this module imports it.
"""

import hashlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

from lienzo.errors import GenerationCancelled, LienzoError, ModelFileError
from lienzo.server.logs import current_setup, job_context, setup_logging
from lienzo.server.runtime import Event, Failure, Finished, Loaded, Signals, Task, WorkerRuntime
from lienzo.server.workers import Worker, WorkerLost, WorkerPool, device_memory, process_memory, worker_names
from lienzo.settings import Settings

try:
    import ray
    from ray.exceptions import GetTimeoutError, NodeDiedError, ObjectLostError, RayActorError, RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # the extra is not installed: RayPool says how to install it
    ray = None

log = logging.getLogger(__name__)

CHUNK = 64 * 2**20  # bytes of a model file per call to the files actor
START_TIMEOUT = 300.0  # seconds for every worker to start (a node may be slow to import torch)
REPLACE_TIMEOUT = 30.0  # seconds to place a replacement; longer means its node is gone
SIGNAL_TIMEOUT = 10.0
POLL = 1.0  # seconds an events call waits for one before the server asks again (a death ends the call at once)
# Events a worker may run ahead of the server reading them: bounds the memory of a slow reader, and a
# cancel sent on an event lands within a few steps.
EVENTS_AHEAD = 4
# Set on a node (before `ray start`): copy models from the server even where the same path exists there,
# for a node whose folder at that path is not the server's.
SHIP_MODELS_ENV = "LIENZO_CLUSTER_SHIP_MODELS"


class ModelFiles:
    """The server's model files for nodes that do not have them: what a model is made of, and each file's
    bytes in chunks. Only paths inside the server's models dir: a worker can ask for nothing else."""

    def __init__(self, models_dir: str):
        # Both spellings of the folder: the server may hand out the path through a symlink or resolved.
        self.roots = {Path(os.path.abspath(models_dir)), Path(models_dir).resolve()}

    def manifest(self, path: str) -> list[tuple[str, int, int]]:
        """The model's files as (path inside the model, size, mtime in ns); one file: a single ('', ...)."""
        target = self._allowed(path)
        if target.is_file():
            stat = target.stat()
            return [("", stat.st_size, stat.st_mtime_ns)]
        if not target.is_dir():
            raise ModelFileError(f"{path} is not on the server")
        files = sorted(f for f in target.rglob("*") if f.is_file())
        return [(f.relative_to(target).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    def read(self, path: str, offset: int, length: int) -> bytes:
        with open(self._allowed(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _allowed(self, path: str) -> Path:
        target = Path(os.path.abspath(path))  # ".." folded away before the check
        if not any(target.is_relative_to(root) for root in self.roots):
            raise ModelFileError(f"{path} is not in the server's models dir: the server ships only models")
        return target


class WorkerActor:
    """A worker's life inside its Ray actor: one :class:`WorkerRuntime` on the actor's device, the model files
    it needs brought to its node, and the running job's events, which the server pulls in batches. Threaded
    (two calls at a time), so that ``signal`` lands while a ``next_events`` call waits.

    Pulled rather than streamed (a generator method): Ray Client, how a server off the cluster connects
    (``ray://``), does not carry streaming actor methods (Ray 2.60)."""

    def __init__(self, settings: dict, device: str, files, logging_setup: tuple):
        from lienzo.devices import configure_threads

        setup_logging(*logging_setup)  # as the server logs; Ray forwards the lines to it
        self.settings = Settings(**settings)
        configure_threads(self.settings.threads)
        self.device, self.files = device, files
        self.runtime = WorkerRuntime(self.settings, device)
        self.signals = Signals()
        # The running job's events. Bounded: a job runs at most EVENTS_AHEAD events ahead of the server
        # (its memory stays small when the server is slow, and a cancel sent on an event lands in time).
        self.events: queue.Queue = queue.Queue(maxsize=EVENTS_AHEAD)
        self.origins: dict[str, str] = {}  # the node's copy of a model -> the server's path

    def describe(self) -> dict:
        """Where it runs: node id, process id, the node's GPU ids Ray gave it, and whether the node copies
        every model from the server."""
        return {
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "gpus": [str(gpu) for gpu in ray.get_gpu_ids()], "ships_models": bool(os.environ.get(SHIP_MODELS_ENV)),
        }

    def start(self, task: Task, name: str) -> None:
        """Start ``task`` in a thread of its own and return; :meth:`next_events` hands out what it reports.
        ``name``: the worker's, for its log lines."""
        self.signals.clear()

        def emit(event: Event) -> None:
            self.events.put(event)
            if isinstance(event, Loaded):
                self.events.put(self.models())

        def work() -> None:
            try:
                with job_context(task.job_id, name):
                    self.runtime.run(self._local_task(task), emit, self.signals)
            except BaseException as err:  # noqa: BLE001 - the job's error goes back to the server; the actor lives on
                log.debug("job %s failed in worker", task.job_id, exc_info=True)
                self.events.put(Failure.of(err))

        threading.Thread(target=work, name=f"lienzo-job-{task.job_id}", daemon=True).start()

    def next_events(self, wait: float) -> list:
        """The job's events since the last call, at least one unless ``wait`` seconds pass without any: its
        models (a list) after Loaded, and last Finished, or its error as a Failure (not raised: Ray would wrap it)."""
        try:
            batch = [self.events.get(timeout=wait)]
        except queue.Empty:
            return []
        while not self.events.empty():
            batch.append(self.events.get_nowait())
        return batch

    def signal(self, what: str) -> None:
        self.signals.set(what)

    def memory(self) -> dict[str, int]:
        return {"rss": process_memory(os.getpid()), **device_memory(self.device)}

    def models(self) -> list[str]:
        """The models it holds, by the server's paths (the queue matches jobs to workers by them)."""
        return [self.origins.get(path, path) for path in self.runtime.models]

    def _local_task(self, task: Task) -> Task:
        """The task with every model file at a path of this node."""
        def local(value):  # a module is a path, a list of them (text encoders) or None
            if isinstance(value, list | tuple):
                return [self._local(path) for path in value]
            return self._local(value) if value else value

        return replace(task, model=self._local(task.model), modules={key: local(v) for key, v in task.modules.items()})

    def _local(self, path) -> str:
        """``path`` itself where this node has the same files there, else this node's copy of them."""
        path = str(path)
        manifest = self._call(self.files.manifest.remote(path))
        if not os.environ.get(SHIP_MODELS_ENV) and _present(Path(path), manifest):
            return path
        key = hashlib.sha256(f"{path}\0{sum(m[1] for m in manifest)}\0{max(m[2] for m in manifest)}".encode()).hexdigest()
        target = self.settings.cache_dir / "cluster-models" / key / Path(path).name
        for name, size, _ in manifest:
            destination = target / name if name else target
            if not (destination.is_file() and destination.stat().st_size == size):
                self._copy(f"{path}/{name}" if name else path, size, destination)
        self.origins[str(target)] = path
        return str(target)

    def _copy(self, source: str, size: int, destination: Path) -> None:
        """One file from the server, chunk by chunk (the next asked for while this one is written), into a
        temporary file renamed into place: a copy cut short is never taken for the model."""
        log.info("copying %s from the server (%.1f MB)", source, size / 2**20)
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                pending = self.files.read.remote(source, 0, CHUNK) if size else None
                for offset in range(0, size, CHUNK):
                    data = self._call(pending)
                    pending = self.files.read.remote(source, offset + CHUNK, CHUNK) if offset + CHUNK < size else None
                    if self.signals.cancel.is_set():
                        raise GenerationCancelled("cancelled while copying the model")
                    out.write(data)
            if os.path.getsize(temporary) != size:
                raise ModelFileError(f"{source} changed on the server while it was copied; run the job again")
            os.replace(temporary, destination)
        except BaseException:
            os.unlink(temporary)
            raise

    @staticmethod
    def _call(ref):
        """A files actor answer, its own error (a path it refuses) raised as itself rather than Ray's wrapper."""
        try:
            return ray.get(ref)
        except RayTaskError as err:
            raise (err.cause if isinstance(err.cause, Exception) else err) from None


class RayWorker(Worker):
    """A worker as the server sees it: one actor on a node of the cluster."""

    def __init__(self, actor, info: dict, device: str, name: str, resources: dict):
        self.actor, self.device, self.name, self.resources = actor, device, name, resources
        self.node, self._pid, self.ships_models = info["node"], info["pid"], info["ships_models"]
        self._models: list[str] = []

    @property
    def models(self) -> list[str]:
        return list(self._models)

    @property
    def pid(self) -> int:
        """The actor's process id on its node."""
        return self._pid

    def run(self, task: Task, emit: Callable[[Event], None]) -> None:
        try:
            ray.get(self.actor.start.remote(task, self.name))
            for event in self._events():
                try:
                    emit(event)
                except BaseException:
                    self._abandon()
                    raise
        except (RayActorError, NodeDiedError, ObjectLostError) as err:
            raise WorkerLost(f"worker {self.name} died while running job {task.job_id}: {type(err).__name__}") from err

    def _events(self):
        """The running job's events until Finished; its error raised."""
        while True:
            for event in ray.get(self.actor.next_events.remote(POLL)):
                if isinstance(event, Failure):
                    raise event.error()
                if isinstance(event, list):  # the models it holds, after loading
                    self._models = event
                    continue
                yield event
                if isinstance(event, Finished):
                    return

    def _abandon(self) -> None:
        """The server stopped reading a job (its own error): the job is cancelled and its last events read,
        or it would wait for room for them forever, and the next job's events would follow them."""
        self.signal("cancel")
        try:
            for _ in self._events():
                pass
        except Exception:  # noqa: BLE001 - the job's end, whatever it is, was already given up on
            log.debug("abandoned job on %s ended", self.name, exc_info=True)

    def signal(self, what: str) -> None:
        """Waits until the actor has it, so a cancel sent on an event lands before the events that follow."""
        try:
            ray.get(self.actor.signal.remote(what), timeout=SIGNAL_TIMEOUT)
        except RayError:
            pass  # it died or hangs: run() reports that

    def memory(self) -> dict[str, int]:
        try:
            return ray.get(self.actor.memory.remote(), timeout=SIGNAL_TIMEOUT)
        except RayError:
            return {}

    def close(self) -> None:
        self._models = []
        try:
            ray.kill(self.actor)
        except RayError:
            pass  # already gone


class RayPool(WorkerPool):
    """One worker per GPU of the Ray cluster at ``address`` (``auto``: the cluster this process runs in;
    ``host:port``: a cluster this machine is a node of; ``ray://host:10001``: Ray Client from anywhere). On a
    cluster without GPUs, ``workers`` CPU workers (default: one per node) stand in for them, as in tests.

    Connecting and starting the actors happens here, so a cluster that cannot hold them fails before the
    server listens; :meth:`start` only marks them idle. A Ray connection this process already has is used
    as it is (and left open by :meth:`stop`)."""

    def __init__(self, settings: Settings, address: str, workers: int | None = None):
        if ray is None:
            raise LienzoError("lienzo serve --cluster needs Ray: pip install 'lienzo[cluster]'")
        if not address:
            raise LienzoError("cluster: give the Ray cluster's address, e.g. ray://HEAD:10001, or auto")
        if workers is not None and workers < 1:
            raise LienzoError(f"workers: give 1 or more; got {workers}")
        self.settings, self.address = settings, address
        _reachable(address)
        self._connected = not ray.is_initialized()
        if self._connected:
            try:
                # An address is always given: ray.init starts a cluster of its own only without one.
                ray.init(address=address, namespace="lienzo", logging_level=logging.WARNING)
            except ConnectionError as err:
                raise LienzoError(f"cluster: cannot reach a Ray cluster at {address}: {err}") from None
        here = ray.get_runtime_context().get_node_id()
        self.files = ray.remote(ModelFiles).options(
            num_cpus=0, max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(str(settings.models_dir))
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            self.resources, self.device = {"num_gpus": 1}, "cuda"
            count = workers or gpus
        else:
            nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
            self.resources, self.device = {"num_cpus": 1}, "cpu"
            count = workers or len(nodes)
        actors = [self._spawn() for _ in range(count)]
        try:
            infos = ray.get([actor.describe.remote() for actor in actors], timeout=START_TIMEOUT)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor)
            raise LienzoError(
                f"the cluster at {address} did not start {count} workers in {START_TIMEOUT:.0f} s: "
                f"each needs {'a GPU' if gpus else 'a CPU'}; see `ray status`"
            ) from None
        names = worker_names([self._base(info) for info in infos])
        self.workers = [RayWorker(a, info, self._device(info), n, self.resources) for a, info, n in zip(actors, infos, names)]
        log.info("cluster workers: %s", ", ".join(w.name for w in self.workers))

    def start(self) -> None:
        for worker in self.workers:
            worker.idle_since = time.monotonic()

    def replace(self, worker: Worker) -> Worker | None:
        """A new actor wherever Ray can place one within REPLACE_TIMEOUT, in the old one's place in
        :attr:`workers`; None (and the old one left in place, closed) when none can be placed."""
        log.warning("worker %s died; starting a new one", worker.name)
        worker.close()
        actor = self._spawn()
        try:
            info = ray.get(actor.describe.remote(), timeout=REPLACE_TIMEOUT)
        except (GetTimeoutError, RayActorError):
            ray.kill(actor)
            log.warning("no room in the cluster for a worker in place of %s", worker.name)
            return None
        base = self._base(info)
        taken = {w.name for w in self.workers if w is not worker}
        same_place = worker.name == base or worker.name.startswith(f"{base}.")
        name = worker.name if same_place and worker.name not in taken else _free_name(base, taken)
        fresh = RayWorker(actor, info, self._device(info), name, self.resources)
        fresh.idle_since = time.monotonic()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def stop(self) -> None:
        super().stop()
        try:
            ray.kill(self.files)
        except RayError:
            pass
        if self._connected:
            ray.shutdown()

    def _spawn(self):
        return _actor_class().options(
            **self.resources, max_concurrency=2, scheduling_strategy="SPREAD", max_restarts=0,
        ).remote(self.settings.model_dump(), self.device, self.files, current_setup())

    def _device(self, info: dict) -> str:
        """The device as the node knows it (its GPU's number there); inside the actor it is always "cuda"."""
        return f"cuda:{info['gpus'][0]}" if self.device == "cuda" and info["gpus"] else self.device

    def _base(self, info: dict) -> str:
        """``ray:<node ip>/<device>``, the ip the node joined the cluster with (a machine may have several)."""
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        return f"ray:{ips.get(info['node'], info['node'][:12])}/{self._device(info)}"


@cache
def _actor_class():
    return ray.remote(WorkerActor)


def _present(path: Path, manifest: list[tuple[str, int, int]]) -> bool:
    """Whether this node has the model's files at the server's path, each of the server's size and
    modification time (to the second: file systems keep it to different precisions). Another version of a
    file, even of the same size (a model trained further), is copied from the server instead."""
    for name, size, mtime in manifest:
        local = path / name if name else path
        if not local.is_file():
            return False
        stat = local.stat()
        if stat.st_size != size or int(stat.st_mtime) != mtime // 10**9:
            return False
    return True


def _reachable(address: str) -> None:
    """A ``host:port`` address answers, else a LienzoError now: Ray itself retries a silent one for minutes.
    (``auto`` and ``ray://`` fail fast on their own.)"""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LienzoError(f"cluster: {address!r} is not a Ray address: give HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise LienzoError(f"cluster: cannot reach a Ray cluster at {address}: {err}") from None


def _free_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    return next(f"{base}.{i}" for i in range(len(taken) + 1) if f"{base}.{i}" not in taken)
