"""The issue's "done when": three people share one ``lienzo serve`` whose workers are Ray actors on a two-machine
cluster (a head with two CPUs standing in for a two-GPU box, a second node with one). Their jobs spread over all
three workers, survive a SIGKILL of the server, and each person sees their own jobs and gallery."""

import shutil
import signal
import tempfile
import time

import httpx
import pytest
from servers import lienzo_process

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install 'lienzo[cluster]'")

from lienzo.server.keys import KeyStore  # noqa: E402
from ray_nodes import ray_env, ray_nodes  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray-cluster")  # one Ray cluster on the machine at a time

ADMIN = {"Authorization": "Bearer admin-secret"}
PEOPLE = ("ana", "ben", "cleo")
# Slow enough for the three workers to be busy at once on tiny models.
JOB = {"prompt": "a harbour at dawn", "steps": 40, "width": 128, "height": 128}


def wait_for(get, condition, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"never reached the condition: {value}"
        time.sleep(0.2)


def test_three_people_share_a_server_on_a_two_machine_cluster(home, tmp_path):
    studio = tmp_path / "studio"
    (studio / "data").mkdir(parents=True)
    (studio / "models").symlink_to(home / "models")
    keys = KeyStore(studio / "data" / "keys.db")
    people = {name: {"Authorization": f"Bearer {keys.add(name)}"} for name in PEOPLE}
    keys.close()
    temp = tempfile.mkdtemp(prefix="lzteam")
    try:
        with ray_nodes(temp, 2, [(1, {})]) as port:
            ray.shutdown()  # the server is the cluster's driver, not this test
            env = {**ray_env(temp), "LIENZO_DEFAULT_MODEL": "tiny-sd15"}
            serve = (studio, "--cluster", f"127.0.0.1:{port}", "--workers", "3", "--api-key", "admin-secret")

            with lienzo_process(*serve, env=env, timeout=300) as (url, server):
                workers = httpx.get(f"{url}/api/v1/queue", headers=ADMIN).json()["workers"]
                assert len(workers) == 3 and all(w["name"].startswith("ray:") for w in workers)
                jobs = {
                    name: [httpx.post(f"{url}/api/v1/txt2img", json={**JOB, "seed": seed}, headers=people[name]).json()["id"] for seed in range(3)]
                    for name in PEOPLE
                }
                done = [
                    wait_for(lambda i=i, h=people[name]: httpx.get(f"{url}/api/v1/jobs/{i}", headers=h).json(), lambda j: j["status"] == "done")
                    for name in PEOPLE for i in jobs[name]
                ]
                assert {j["worker"] for j in done} == {w["name"] for w in workers}  # every worker, on both machines, worked
                for name in PEOPLE:
                    mine = {j["id"] for j in httpx.get(f"{url}/api/v1/jobs", headers=people[name]).json()}
                    assert mine == set(jobs[name])
                    gallery = httpx.get(f"{url}/api/v1/gallery", headers=people[name]).json()["items"]
                    assert len(gallery) == 3 and {item["owner"] for item in gallery} == {name}
                # Queued while paused, then the server is killed.
                httpx.post(f"{url}/api/v1/queue/pause", headers=ADMIN).raise_for_status()
                waiting = {name: httpx.post(f"{url}/api/v1/txt2img", json={**JOB, "seed": 9}, headers=people[name]).json()["id"] for name in PEOPLE}
                server.send_signal(signal.SIGKILL)
                server.wait(30)

            with lienzo_process(*serve, env=env, timeout=300) as (url, _server):
                assert httpx.get(f"{url}/api/v1/queue", headers=ADMIN).json()["paused"] is True
                httpx.post(f"{url}/api/v1/queue/resume", headers=ADMIN).raise_for_status()
                for name, job_id in waiting.items():
                    job = wait_for(lambda: httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=people[name]).json(), lambda j: j["status"] == "done")
                    assert job["owner"] == name and job["attempts"] == 1 and len(job["images"]) == 1
                    mine = {j["id"] for j in httpx.get(f"{url}/api/v1/jobs", headers=people[name]).json()}
                    assert mine == {*jobs[name], job_id}
                    others = [j for j in httpx.get(f"{url}/api/v1/jobs", headers=people[name]).json() if j["owner"] != name]
                    assert others == []
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
