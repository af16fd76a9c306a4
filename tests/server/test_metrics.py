"""/metrics: the queue's and workers' state read at scrape time, finished jobs counted by record_job, one
registry per app, behind authentication, parsed back with prometheus_client's own parsers."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import prometheus_client
import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from lienzo.server.app import Auth, create_app
from lienzo.server.metrics import Metrics
from servers import home_settings, two_model_home
from tiny_models import build_tiny


@dataclass
class FakeWorker:
    name: str
    device: str
    busy: bool = False
    models: list[str] = field(default_factory=list)
    measured: dict[str, int] = field(default_factory=dict)

    def memory(self) -> dict[str, int]:
        return dict(self.measured)


@dataclass
class FakeQueue:
    waiting: int = 0
    paused: bool = False
    history: dict[str, int] = field(default_factory=dict)
    pool: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(workers=[]))

    def counts(self) -> dict[str, int]:
        return dict(self.history)


def samples(text: str, parse=text_string_to_metric_families) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items: value}."""
    found: dict[str, dict[tuple, float]] = {}
    for family in parse(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def scrape(metrics: Metrics) -> dict[str, dict[tuple, float]]:
    return samples(prometheus_client.generate_latest(metrics.registry).decode())


def test_queue_and_workers_are_read_at_scrape_time():
    cpu = FakeWorker("cpu", "cpu", measured={"rss": 3_000_000})
    gpu = FakeWorker("cuda:0", "cuda:0", busy=True, models=["sd15", "sdxl"], measured={"rss": 5_000_000, "device": 7_000_000_000})
    queue = FakeQueue(waiting=3, paused=True, history={"queued": 3, "running": 1, "done": 5, "cancelled": 2})
    queue.pool.workers = [cpu, gpu]
    metrics = Metrics(queue)

    found = scrape(metrics)
    assert found["lienzo_queue_depth"] == {(): 3}
    assert found["lienzo_queue_paused"] == {(): 1}
    assert found["lienzo_jobs"] == {
        (("state", "queued"),): 3, (("state", "running"),): 1, (("state", "done"),): 5,
        (("state", "failed"),): 0, (("state", "cancelled"),): 2, (("state", "interrupted"),): 0,
    }
    assert found["lienzo_worker_busy"] == {(("device", "cpu"), ("worker", "cpu")): 0, (("device", "cuda:0"), ("worker", "cuda:0")): 1}
    assert found["lienzo_worker_memory_bytes"] == {  # the CPU worker measures no device memory: no sample, not 0
        (("device", "cpu"), ("kind", "rss"), ("worker", "cpu")): 3_000_000,
        (("device", "cuda:0"), ("kind", "rss"), ("worker", "cuda:0")): 5_000_000,
        (("device", "cuda:0"), ("kind", "device"), ("worker", "cuda:0")): 7_000_000_000,
    }
    assert found["lienzo_worker_models"] == {(("worker", "cpu"),): 0, (("worker", "cuda:0"),): 2}

    # Nothing is cached between scrapes.
    queue.waiting, queue.paused, gpu.busy, cpu.models = 0, False, False, ["sd15"]
    queue.pool.workers.append(FakeWorker("ray:10.0.0.2/cuda:0", "cuda:0"))
    found = scrape(metrics)
    assert found["lienzo_queue_depth"] == {(): 0} and found["lienzo_queue_paused"] == {(): 0}
    assert found["lienzo_worker_busy"][(("device", "cuda:0"), ("worker", "cuda:0"))] == 0
    assert found["lienzo_worker_busy"][(("device", "cuda:0"), ("worker", "ray:10.0.0.2/cuda:0"))] == 0
    assert found["lienzo_worker_models"][(("worker", "cpu"),)] == 1


def test_record_job_counts_states_and_seconds_per_image():
    metrics = Metrics(FakeQueue())
    assert "lienzo_jobs_finished_total" not in scrape(metrics)  # no state has finished yet
    metrics.record_job("sd15", "cuda:0", 6.0, 3, "done")  # 2 s per image
    metrics.record_job("sd15", "cuda:0", 0.3, 1, "done")
    metrics.record_job("sd15", "cpu", 40.0, 0, "failed")
    metrics.record_job("sdxl", "cpu", 9.0, 1, "cancelled")
    found = scrape(metrics)
    assert found["lienzo_jobs_finished_total"] == {(("state", "done"),): 2, (("state", "failed"),): 1, (("state", "cancelled"),): 1}
    labels = (("device", "cuda:0"), ("model", "sd15"))
    assert found["lienzo_seconds_per_image_count"] == {labels: 2}  # only done jobs tell a speed
    assert found["lienzo_seconds_per_image_sum"][labels] == pytest.approx(2.3)
    buckets = {dict(k)["le"]: v for k, v in found["lienzo_seconds_per_image_bucket"].items()}
    assert buckets["0.25"] == 0 and buckets["0.5"] == 1 and buckets["1.0"] == 1 and buckets["2.0"] == 2 and buckets["+Inf"] == 2


def test_each_app_has_its_own_registry():
    queue = FakeQueue()
    first, second = Metrics(queue), Metrics(queue)
    first.record_job("sd15", "cpu", 1.0, 1, "done")
    assert scrape(first)["lienzo_jobs_finished_total"] == {(("state", "done"),): 1}
    assert "lienzo_jobs_finished_total" not in scrape(second)
    assert "lienzo_queue_depth" not in samples(prometheus_client.generate_latest().decode())  # not the global registry


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("metrics-home"))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("sd1")


def test_metrics_route_on_the_real_app(home, tiny, tmp_path):
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    with TestClient(create_app(settings, loader=lambda _path, _cancel: tiny)) as client:
        answer = client.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        found = samples(answer.text)
        assert found["lienzo_queue_depth"] == {(): 0} and found["lienzo_queue_paused"] == {(): 0}
        assert found["lienzo_jobs"][(("state", "done"),)] == 0
        assert list(found["lienzo_worker_busy"].values()) == [0]  # one device: one worker, idle

        job = client.post("/api/v1/txt2img?wait=true", json={"prompt": "a pear", "steps": 2, "width": 64, "height": 64, "batch_size": 2})
        assert job.json()["status"] == "done"
        found = samples(client.get("/metrics").text)
        assert found["lienzo_jobs"][(("state", "done"),)] == 1
        assert found["lienzo_jobs_finished_total"] == {(("state", "done"),): 1}  # the queue called record_job
        assert sum(found["lienzo_seconds_per_image_count"].values()) == 1

        # A scraper that asks for OpenMetrics gets it (prometheus_client's negotiation).
        answer = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert answer.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert samples(answer.text, parse_openmetrics)["lienzo_queue_depth"] == {(): 0}


def test_metrics_needs_the_servers_credentials(home, tiny, tmp_path):
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    with TestClient(create_app(settings, auth=Auth(api_key="s3cret"), loader=lambda _path, _cancel: tiny)) as client:
        assert client.get("/metrics").status_code == 401
        answer = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and "lienzo_queue_depth 0.0" in answer.text
