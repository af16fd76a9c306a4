"""``GET /metrics``: the server's queue, workers and job speeds for Prometheus to scrape.

Two kinds of numbers, both from ``prometheus_client`` (the text format and its escaping are its job):

- the queue's and workers' present state, read at scrape time by :class:`QueueCollector` (a custom
  collector, so nothing has to be kept in step with the queue between scrapes);
- what finished jobs did, counted as they finish: the queue calls :meth:`Metrics.record_job`
  (``queue.on_finished``) from the worker that ran the job.

Each app has its own :class:`Metrics` and ``CollectorRegistry`` (``app.state.metrics``): the global
registry would mix every app a process creates (tests create many) and prometheus_client's own
process metrics. /metrics sits behind the server's authentication like every other route.
"""

from collections.abc import Iterator
from typing import Protocol

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from lienzo.server.job import JobStatus

router = APIRouter()

# Seconds per image from a tiny model on a GPU to a large one on a CPU; a histogram (not a Summary,
# whose Python quantiles are absent) lets Prometheus aggregate quantiles across servers.
SECONDS_PER_IMAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Worker(Protocol):
    """What the collector reads from one of the queue's workers."""

    name: str
    device: str
    busy: bool
    models: list[str]

    def memory(self) -> dict[str, int]: ...


class Pool(Protocol):
    workers: list[Worker]


class Queue(Protocol):
    """What the collector reads from the job queue (lienzo.server.jobs.JobQueue)."""

    waiting: int
    paused: bool
    pool: Pool

    def counts(self) -> dict[str, int]: ...


class QueueCollector(Collector):
    """The queue's and its workers' state, read when Prometheus scrapes."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        queue = self.queue
        yield GaugeMetricFamily("lienzo_queue_depth", "jobs waiting to run", value=queue.waiting)
        yield GaugeMetricFamily("lienzo_queue_paused", "1 while the queue is paused (no new job starts)", value=int(queue.paused))
        jobs = GaugeMetricFamily("lienzo_jobs", "jobs the queue holds, by state (its whole history)", labels=["state"])
        counts = queue.counts()
        for state in JobStatus:  # every state, 0 included, so that a series never vanishes
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        busy = GaugeMetricFamily("lienzo_worker_busy", "1 while the worker runs a job", labels=["worker", "device"])
        memory = GaugeMetricFamily(
            "lienzo_worker_memory_bytes",
            "the worker's memory: rss = its process's resident set, device = accelerator memory allocated",
            labels=["worker", "device", "kind"],
        )
        models = GaugeMetricFamily("lienzo_worker_models", "models the worker holds loaded", labels=["worker"])
        for worker in queue.pool.workers:
            busy.add_metric([worker.name, worker.device], int(worker.busy))
            for kind, size in sorted(worker.memory().items()):  # a kind the worker cannot measure is absent
                memory.add_metric([worker.name, worker.device, kind], size)
            models.add_metric([worker.name], len(worker.models))
        yield from (busy, memory, models)


class Metrics:
    """One app's registry: the queue's state at scrape time and the counts :meth:`record_job` keeps."""

    def __init__(self, queue: Queue):
        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(queue))
        self.finished = Counter(
            "lienzo_jobs_finished", "jobs that finished since the server started, by final state", ["state"], registry=self.registry
        )
        self.seconds_per_image = Histogram(
            "lienzo_seconds_per_image",
            "wall time of each done job divided by its images, by model and device",
            ["model", "device"],
            buckets=SECONDS_PER_IMAGE_BUCKETS,
            registry=self.registry,
        )

    def record_job(self, model: str, device: str, seconds: float, images: int, state: str) -> None:
        """A job finished in ``state`` after ``seconds`` of running, with ``images`` images; called by the
        queue from the worker's thread (prometheus_client's metrics are thread-safe). Only done jobs with
        images count towards the speed: a failed or cancelled one stopped part way."""
        self.finished.labels(state).inc()
        if state == JobStatus.DONE.value and images > 0:
            self.seconds_per_image.labels(model, device).observe(seconds / images)


@router.get("/metrics", include_in_schema=False)
def scrape(request: Request) -> Response:
    """The Prometheus exposition: text format 0.0.4, or OpenMetrics when the scraper's Accept asks for it
    (prometheus_client's negotiation, as its own exporters do). A plain ``def``: counting jobs reads the
    queue's database."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.metrics.registry), media_type=content_type)
