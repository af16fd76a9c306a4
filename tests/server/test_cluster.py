"""The Ray cluster backend against a real two-node Ray cluster on loopback, CPU processes standing in for GPUs.

Both nodes are ``ray start --block`` processes of this test (ended by their pids, which stops what they
started); the second node is told to copy models from the server (LIENZO_CLUSTER_SHIP_MODELS), since on one
machine it sees the server's files at the same path. Every image is compared, pixel for pixel, with the one
a ThreadWorker makes in this process from the same task.
"""

import os
import signal
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install 'lienzo[cluster]'")

from lienzo.errors import GenerationCancelled, LienzoError, ModelFileError  # noqa: E402
from lienzo.generation.request import build_request  # noqa: E402
from lienzo.server.cluster import SHIP_MODELS_ENV, RayPool  # noqa: E402
from lienzo.server.runtime import Finished, Loaded, Made, Step, Task  # noqa: E402
from lienzo.server.workers import ThreadWorker, WorkerLost  # noqa: E402
from lienzo.settings import Settings  # noqa: E402
from ray_nodes import free_port, ray_nodes  # noqa: E402

# One cluster for the module: under xdist with --dist loadgroup its tests stay on one worker.
pytestmark = pytest.mark.xdist_group("ray-cluster")

@pytest.fixture(scope="module")
def settings(home, tmp_path_factory):
    from tiny_models import build_tiny, save_diffusers_folder

    save_diffusers_folder(build_tiny("sd1"), home / "models" / "tiny-folder")  # shipped file by file
    data = tmp_path_factory.mktemp("cluster-data")
    # fp32 on one thread in every process: the actors' images must equal this process's to the pixel.
    return Settings(data_dir=data, models_dir=home / "models", outputs_dir=data / "out", dtype="fp32", threads=1)


@pytest.fixture(scope="module")
def client_port() -> int:
    """The head's Ray Client port (ray://)."""
    return free_port()


@pytest.fixture(scope="module")
def ray_temp():
    """The cluster's temp dir, with its logs. Short: Ray's socket paths under it must fit 107 characters."""
    temp = tempfile.mkdtemp(prefix="lzray")
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(settings, client_port, ray_temp):
    """A head node (two CPUs: one is left for a Ray Client's worker) and a second node (one CPU) on
    127.0.0.1, a RayPool on them; every Ray process ended afterwards."""
    with ray_nodes(ray_temp, 2, [(1, {SHIP_MODELS_ENV: "1"})], ("--ray-client-server-port", str(client_port))) as port:
        try:
            pool = RayPool(settings, address=f"127.0.0.1:{port}")
            pool.start()
            yield pool
            pool.stop()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def task(home):
    request = build_request(prompt="a lighthouse at dusk", steps=2, width=64, height=64, seed=1)
    return Task("job-1", request, str(home / "models" / "tiny-sd15.safetensors"))


@pytest.fixture(scope="module")
def server_side(settings):
    """The server's own worker, which every cluster worker's images must equal."""
    return ThreadWorker(settings, "cpu")


@pytest.fixture(scope="module")
def expected(server_side, task):
    """The pixels a ThreadWorker makes in this process from ``task``."""
    return _pixels(_run(server_side, task))


def _pixels(events) -> list[np.ndarray]:
    return [np.asarray(e.image.image) for e in events if isinstance(e, Made)]


def _run(worker, task, on_event=None) -> list:
    events = []

    def emit(event):
        events.append(event)
        if on_event is not None:
            on_event(event)

    worker.run(task, emit)
    return events


def _shipping(pool):
    """The worker on the node that copies models from the server."""
    (worker,) = [w for w in pool.workers if w.ships_models]
    return worker


def test_a_worker_on_each_node_makes_the_same_image_as_the_server(pool, task, expected):
    assert len(pool.workers) == 2
    first, second = pool.workers
    assert first.node != second.node and first.name != second.name
    # Named after the node's ip (Ray's choice for the machine, even for a node started on 127.0.0.1), numbered
    # since both nodes share it.
    (ip,) = {node["NodeManagerAddress"] for node in ray.nodes()}
    assert sorted(w.name for w in pool.workers) == [f"ray:{ip}/cpu.0", f"ray:{ip}/cpu.1"]
    assert all(w.device == "cpu" for w in pool.workers)
    for worker in pool.workers:
        events = _run(worker, task)
        kinds = [type(e) for e in events]
        assert kinds[0] is Loaded and kinds[-1] is Finished and kinds.count(Made) == 1
        assert [e.step for e in events if isinstance(e, Step)] == [1, 2]
        assert events[0].name == "tiny-sd15"
        assert len(expected) == 1 and np.array_equal(_pixels(events)[0], expected[0])
        assert worker.models == [task.model]  # by the server's path, wherever the node loaded it from
        assert worker.memory()["rss"] > 50 * 2**20


def test_a_node_without_the_model_gets_it_from_the_server(pool, settings, server_side, task, expected):
    worker = _shipping(pool)
    cache = settings.cache_dir / "cluster-models"
    for copy in cache.glob("*/tiny-sd15.safetensors"):
        copy.unlink()  # an earlier test's job may have shipped it already
    events = _run(worker, task)
    (copy,) = cache.glob("*/tiny-sd15.safetensors")
    assert copy.read_bytes() == Path(task.model).read_bytes()
    assert not list(cache.glob("**/.*.part"))
    assert np.array_equal(_pixels(events)[0], expected[0])
    assert worker.models == [task.model]

    folder = Task("job-5", task.request, str(settings.models_dir / "tiny-folder"))
    events = _run(worker, folder)
    (copy,) = cache.glob("*/tiny-folder")
    sent = sorted(p.relative_to(folder.model) for p in Path(folder.model).rglob("*") if p.is_file())
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == sent
    assert all((copy / name).read_bytes() == (Path(folder.model) / name).read_bytes() for name in sent)
    assert np.array_equal(_pixels(events)[0], _pixels(_run(server_side, folder))[0])
    assert worker.models == [folder.model]  # models_per_worker 1: the file's model made room
    # The files actor serves the models dir and nothing else.
    with pytest.raises(ModelFileError, match="not in the server's models dir"):
        ray.get(pool.files.read.remote("/etc/hostname", 0, 10))
    with pytest.raises(ModelFileError, match="not in the server's models dir"):
        ray.get(pool.files.manifest.remote(str(settings.models_dir / ".." / "escape")))


def test_cancel_stops_the_job(pool, task):
    worker = pool.workers[0]
    long = Task("job-2", task.request.model_copy(update={"steps": 30}), task.model)
    steps = []

    def on_event(event):
        if isinstance(event, Step):
            steps.append(event.step)
            if event.step == 1:
                worker.signal("cancel")

    with pytest.raises(GenerationCancelled):
        _run(worker, long, on_event)
    assert steps and max(steps) < 30
    assert len(_pixels(_run(worker, task))) == 1  # the next job runs as usual


def test_a_killed_worker_is_lost_and_replaced(pool, task, expected):
    worker = pool.workers[1]
    index = pool.workers.index(worker)
    long = Task("job-3", task.request.model_copy(update={"steps": 30}), task.model)

    def on_event(event):
        if isinstance(event, Step) and event.step == 1:
            os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(WorkerLost, match=f"worker {worker.name} died while running job job-3"):
        _run(worker, long, on_event)
    fresh = pool.replace(worker)
    assert fresh is not None and pool.workers[index] is fresh and fresh.pid != worker.pid
    events = _run(fresh, task)
    assert np.array_equal(_pixels(events)[0], expected[0])


def test_no_replacement_where_no_node_has_room(pool, settings, monkeypatch):
    """A worker whose machine left: nothing can take its place (here: a GPU worker on a cluster without GPUs)."""
    from lienzo.server import cluster

    monkeypatch.setattr(cluster, "REPLACE_TIMEOUT", 3.0)
    monkeypatch.setattr(pool, "resources", {"num_gpus": 1})
    before = list(pool.workers)
    assert pool.replace(ThreadWorker(settings, "cpu", name="ray:10.0.0.9/cuda:0")) is None
    assert pool.workers == before


# A server off the cluster connects through Ray Client, which carries no streaming actor methods: the
# workers' events are pulled. A process of its own, as a process has one Ray connection.
CLIENT = """
import json, sys
import numpy as np
from lienzo.generation.request import build_request
from lienzo.server.cluster import RayPool
from lienzo.server.runtime import Made, Task
from lienzo.settings import Settings

settings, address, model = Settings(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
pool = RayPool(settings, address=address, workers=1)
events = []
pool.workers[0].run(Task("job-c", build_request(**json.loads(sys.argv[4])), model), events.append)
(made,) = [e for e in events if isinstance(e, Made)]
sys.stdout.buffer.write(np.asarray(made.image.image).tobytes())
pool.stop()
"""


def test_a_server_off_the_cluster_connects_with_ray_client(pool, settings, client_port, ray_temp, task, expected):
    request = task.request.model_dump_json(exclude_unset=True)
    command = [sys.executable, "-c", CLIENT, settings.model_dump_json(), f"ray://127.0.0.1:{client_port}", task.model, request]
    for _ in range(3):
        result = subprocess.run(command, capture_output=True, timeout=300)
        # Ray Client's per-client server process now and then dies as it starts on a loaded machine (its logs
        # empty, or the proxy finding it a zombie: "Initialization failure from server"): that, and only that,
        # is tried again.
        if not any(words in result.stderr for words in (b"Starting Ray client server failed", b"Initialization failure from server")):
            break
    client_logs = "".join(f"{p}:\n{p.read_text()[-2000:]}\n" for p in Path(ray_temp).glob("session_*/logs/ray_client_server*"))
    assert result.returncode == 0, result.stderr.decode()[-3000:] + client_logs
    assert result.stdout == expected[0].tobytes()


def test_without_ray_the_pool_says_how_to_install_it(settings, monkeypatch):
    from lienzo.server import cluster

    monkeypatch.setattr(cluster, "ray", None)
    with pytest.raises(LienzoError, match=r"pip install 'lienzo\[cluster\]'"):
        RayPool(settings, address="auto")


@pytest.mark.parametrize(("address", "error"), [
    ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
    ("head-without-port", "is not a Ray address: give HOST:PORT, ray://HOST:PORT or auto"),
])
def test_an_address_without_a_cluster_fails_at_once(settings, address, error):
    with pytest.raises(LienzoError, match=error):
        RayPool(settings, address=address)
