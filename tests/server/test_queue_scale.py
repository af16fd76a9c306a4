"""The durable queue: jobs survive a SIGKILL of the server, a job cut short runs again with the same pixels,
queue control (pause, move, priority, cancel an owner's jobs), turns between owners, and several worker
processes of which one dies mid-job. Real servers on tiny models; no sleeps decide an order."""

import io
import os
import signal
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servers import home_settings, lienzo_process, two_model_home

from lienzo.generation.request import build_request
from lienzo.server.app import Auth, create_app
from lienzo.server.job import Job, JobStatus
from lienzo.server.jobstore import JobStore
from lienzo.server.keys import KeyStore
from lienzo.server.workers import LocalPool

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("queue-home"))


def wait_for(get, condition, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"never reached the condition: {value}"
        time.sleep(0.05)


def job_of(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/v1/jobs/{job_id}").json()


def pixels(url: str, job: dict, index: int = 0) -> np.ndarray:
    data = httpx.get(url + job["images"][index]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def own_home(home, tmp_path):
    """``home``'s models with data and outputs of this test's own."""
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "models").symlink_to(home / "models")
    return mine


def test_a_queued_job_survives_sigkill_and_runs_exactly_once(home, tmp_path):
    mine = own_home(home, tmp_path)
    env = {"LIENZO_DEFAULT_MODEL": "tiny-a"}
    with lienzo_process(mine, env=env) as (url, process):
        assert httpx.post(f"{url}/api/v1/queue/pause").json()["paused"] is True
        queued = httpx.post(f"{url}/api/v1/txt2img", json={**FAST, "seed": -1}).json()
        assert queued["status"] == "queued" and queued["parameters"]["seed"] != -1  # drawn now, kept for a rerun
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with lienzo_process(mine, env=env) as (url, _process):
        again = job_of(url, queued["id"])
        assert again["status"] == "queued" and again["position"] == 0
        assert httpx.get(f"{url}/api/v1/queue").json()["paused"] is True  # paused stays paused
        httpx.post(f"{url}/api/v1/queue/resume")
        done = wait_for(lambda: job_of(url, queued["id"]), lambda j: j["status"] == "done")
        assert done["attempts"] == 1 and len(done["images"]) == 1
        assert done["images"][0]["seed"] == queued["parameters"]["seed"]
        history = httpx.get(f"{url}/api/v1/jobs").json()
        assert [j["id"] for j in history] == [queued["id"]]
    saved = list((mine / "data" / "outputs").rglob("*.png")) + list((mine / "outputs").rglob("*.png"))
    assert len(saved) == 1, saved
    # After a clean restart the finished job and its image are still there.
    with lienzo_process(mine, env=env) as (url, _process):
        kept = job_of(url, queued["id"])
        assert kept["status"] == "done" and httpx.get(url + kept["images"][0]["url"]).status_code == 200


def test_a_job_killed_mid_step_runs_again_with_the_same_pixels(home, tmp_path):
    mine = own_home(home, tmp_path)
    env = {"LIENZO_DEFAULT_MODEL": "tiny-a"}
    slow = {**FAST, "steps": 150, "width": 128, "height": 128, "seed": -1}
    with lienzo_process(mine, env=env) as (url, process):
        job = httpx.post(f"{url}/api/v1/txt2img", json=slow).json()
        wait_for(lambda: job_of(url, job["id"]), lambda j: j["status"] == "running" and j["progress"]["step"] > 2)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with lienzo_process(mine, env=env) as (url, _process):
        done = wait_for(lambda: job_of(url, job["id"]), lambda j: j["status"] == "done", timeout=300)
        assert done["attempts"] == 2 and len(done["images"]) == 1
        # The same request with the seed the job drew, run from scratch: the same picture.
        twin = httpx.post(f"{url}/api/v1/txt2img?wait=true", json={**slow, "seed": job["parameters"]["seed"]}, timeout=300).json()
        assert twin["status"] == "done"
        assert np.array_equal(pixels(url, done), pixels(url, twin))


def test_a_job_cut_short_twice_fails_and_is_not_run_again(home, tmp_path):
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    settings.data_dir.mkdir(parents=True)
    with JobStore.for_settings(settings) as store:
        twice = Job(id="twice", request=build_request(**FAST, seed=3), model=None, source="native")
        twice.status, twice.attempts = JobStatus.RUNNING, 2
        once = Job(id="once", request=build_request(**FAST, seed=4), model=None, source="native", seq=1)
        once.status, once.attempts = JobStatus.RUNNING, 1
        store.add(twice)
        store.add(once)
    with TestClient(create_app(settings)) as client:
        failed = client.get("/api/v1/jobs/twice").json()
        assert failed["status"] == "failed" and "stopped twice" in failed["error"] and not failed["images"]
        done = wait_for(lambda: client.get("/api/v1/jobs/once").json(), lambda j: j["status"] == "done")
        assert done["attempts"] == 2 and done["images"][0]["seed"] == 4


@pytest.fixture
def studio(home, tmp_path):
    """An in-process server with two named keys (ana, ben) and the admin (--api-key), its queue paused."""
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    settings.data_dir.mkdir(parents=True)
    keys = KeyStore(settings.keys_db)
    secrets = {name: keys.add(name) for name in ("ana", "ben")}
    app = create_app(settings, auth=Auth(api_key="admin-secret"), keys=keys)
    with TestClient(app) as client:
        headers = {name: {"Authorization": f"Bearer {secret}"} for name, secret in secrets.items()}
        headers["admin"] = {"Authorization": "Bearer admin-secret"}
        assert client.post("/api/v1/queue/pause", headers=headers["admin"]).status_code == 200
        yield client, headers


def submit(client, headers, seed: int, **extra) -> str:
    response = client.post("/api/v1/txt2img", json={**FAST, "seed": seed, **extra}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def order(client, headers) -> list[str]:
    return [j["id"] for j in client.get("/api/v1/queue", headers=headers).json()["jobs"]]


def run_all(client, headers, ids: list[str]) -> list[str]:
    """Resume, wait for every job, and give the order they started in (one worker: one at a time)."""
    client.post("/api/v1/queue/resume", headers=headers)
    jobs = [wait_for(lambda i=i: client.get(f"/api/v1/jobs/{i}", headers=headers).json(), lambda j: j["status"] == "done") for i in ids]
    return [j["id"] for j in sorted(jobs, key=lambda j: j["started"])]


def test_owners_take_turns_so_one_batch_does_not_starve_the_others(studio):
    client, headers = studio
    ana = [submit(client, headers["ana"], seed) for seed in range(4)]
    ben = [submit(client, headers["ben"], seed) for seed in range(10, 12)]
    expected = [ana[0], ben[0], ana[1], ben[1], ana[2], ana[3]]
    assert order(client, headers["admin"]) == expected
    positions = [client.get(f"/api/v1/jobs/{i}", headers=headers["admin"]).json()["position"] for i in expected]
    assert positions == list(range(6))
    assert run_all(client, headers["admin"], expected) == expected


def test_move_priority_and_pause(studio):
    client, headers = studio
    admin = headers["admin"]
    first, second, third = (submit(client, admin, seed) for seed in range(3))
    # Paused: nothing starts.
    assert all(client.get(f"/api/v1/jobs/{i}", headers=admin).json()["status"] == "queued" for i in (first, second, third))
    assert client.post(f"/api/v1/jobs/{third}/move", json={"to": "front"}, headers=admin).json()["position"] == 0
    assert order(client, admin) == [third, first, second]
    client.post(f"/api/v1/jobs/{third}/move", json={"to": "back"}, headers=admin)
    assert order(client, admin) == [first, second, third]
    raised = client.post(f"/api/v1/jobs/{second}/priority", json={"priority": 5}, headers=admin).json()
    assert raised["priority"] == 5 and raised["position"] == 0
    assert order(client, admin) == [second, first, third]
    bad = client.post(f"/api/v1/jobs/{second}/priority", json={"priority": 101}, headers=admin)
    assert bad.status_code == 422 and bad.json()["field"] == "priority"
    assert run_all(client, admin, [first, second, third]) == [second, first, third]
    refused = client.post(f"/api/v1/jobs/{first}/move", json={"to": "front"}, headers=admin)
    assert refused.status_code == 422 and "only a waiting job" in refused.json()["detail"]


def test_a_named_key_controls_only_its_own_jobs(studio):
    client, headers = studio
    anas = [submit(client, headers["ana"], seed) for seed in range(3)]
    bens = submit(client, headers["ben"], 9)
    assert client.post(f"/api/v1/jobs/{bens}/cancel", headers=headers["ana"]).status_code == 403
    assert client.post(f"/api/v1/jobs/{bens}/move", json={"to": "front"}, headers=headers["ana"]).status_code == 403
    assert client.post(f"/api/v1/jobs/{anas[0]}/priority", json={"priority": 1}, headers=headers["ana"]).status_code == 403
    assert client.post("/api/v1/queue/resume", headers=headers["ana"]).status_code == 403
    assert client.post("/api/v1/queue/cancel", json={"owner": "ben"}, headers=headers["ana"]).status_code == 403
    # Their own: fine; "cancel all mine" takes exactly theirs.
    assert client.post("/api/v1/queue/cancel", json={}, headers=headers["ana"]).json() == {"cancelled": 3}
    assert {client.get(f"/api/v1/jobs/{i}", headers=headers["ana"]).json()["status"] for i in anas} == {"cancelled"}
    assert client.get(f"/api/v1/jobs/{bens}", headers=headers["ben"]).json()["status"] == "queued"
    # Each sees their own history by default, everyone's when asked.
    mine = {j["id"] for j in client.get("/api/v1/jobs", headers=headers["ana"]).json()}
    assert mine == set(anas)
    everyone = {j["id"] for j in client.get("/api/v1/jobs", params={"owner": "*"}, headers=headers["ana"]).json()}
    assert everyone == {*anas, bens}
    assert {j["owner"] for j in client.get("/api/v1/jobs", headers=headers["admin"]).json()} == {"ana", "ben"}


def test_history_pages_with_a_cursor(studio):
    client, headers = studio
    admin = headers["admin"]
    ids = [submit(client, admin, seed) for seed in range(5)]
    seen, cursor = [], None
    while True:
        response = client.get("/api/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=admin)
        seen += [j["id"] for j in response.json()]
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert client.get("/api/v1/jobs", params={"cursor": "nonsense"}, headers=admin).json()["field"] == "cursor"


def test_per_key_limits(home, tmp_path):
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    settings.data_dir.mkdir(parents=True)
    keys = KeyStore(settings.keys_db)
    secret = keys.add("cleo", max_queued=2, max_pixels=64 * 64)
    with TestClient(create_app(settings, keys=keys)) as client:
        cleo = {"Authorization": f"Bearer {secret}"}
        big = client.post("/api/v1/txt2img", json={**FAST, "width": 128}, headers=cleo)
        assert big.status_code == 422 and big.json()["field"] == "width" and "4096" in big.json()["detail"]
        client.post("/api/v1/queue/pause", headers=cleo)  # not hers to pause
        assert client.get("/api/v1/queue", headers=cleo).json()["paused"] is False
        statuses = [client.post("/api/v1/txt2img", json={**FAST, "steps": 40, "seed": i}, headers=cleo).status_code for i in range(4)]
        # One may start at once; at most two wait: the rest are refused.
        assert statuses.count(202) in (2, 3) and statuses[-1] == 429, statuses


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU worker processes need two cores")
def test_two_worker_processes_share_the_jobs_and_one_that_dies_loses_nothing(home, tmp_path):
    mine = own_home(home, tmp_path)
    env = {"LIENZO_DEFAULT_MODEL": "tiny-a"}
    with lienzo_process(mine, "--devices", "cpu,cpu", env=env) as (url, _process):
        workers = httpx.get(f"{url}/api/v1/queue").json()["workers"]
        assert [w["name"] for w in workers] == ["cpu.0", "cpu.1"] and len({w["pid"] for w in workers}) == 2
        slow = {**FAST, "steps": 150, "width": 128, "height": 128}
        jobs = [httpx.post(f"{url}/api/v1/txt2img", json={**slow, "seed": seed}).json()["id"] for seed in range(4)]
        running = wait_for(
            lambda: httpx.get(f"{url}/api/v1/queue").json(),
            lambda q: sum(w["busy"] for w in q["workers"]) == 2 and all(j["progress"]["step"] > 1 for j in q["jobs"] if j["status"] == "running"),
        )
        victim = running["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        done = [wait_for(lambda i=i: job_of(url, i), lambda j: j["status"] in ("done", "failed"), timeout=600) for i in jobs]
        assert [j["status"] for j in done] == ["done"] * 4
        assert {j["worker"] for j in done} == {"cpu.0", "cpu.1"}  # both worked
        rerun = next(j for j in done if j["id"] == victim["job"])
        assert rerun["attempts"] == 2
        twin = httpx.post(f"{url}/api/v1/txt2img?wait=true", json={**slow, "seed": rerun["parameters"]["seed"]}, timeout=600).json()
        assert np.array_equal(pixels(url, rerun), pixels(url, twin))
        after = httpx.get(f"{url}/api/v1/queue").json()["workers"]
        assert victim["pid"] not in {w["pid"] for w in after} and all(w["pid"] for w in after)


def test_a_job_goes_to_the_free_worker_that_holds_its_model(home, tmp_path):
    """Two workers in the server's process: a second job for the same model goes where that model is loaded,
    though the other worker has been idle longer; a job for another model goes to the idle one."""
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out")
    pool = LocalPool(settings, ["cpu", "cpu"], processes=False)
    with TestClient(create_app(settings, pool=pool)) as client:

        def run(model: str) -> dict:
            job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "seed": 1, "model": model}).json()
            assert job["status"] == "done", job
            return job

        first = run("tiny-a")
        assert run("tiny-a")["worker"] == first["worker"]
        other = run("tiny-b")["worker"]
        assert other != first["worker"]
        workers = {w["name"]: w["models"] for w in client.get("/api/v1/queue").json()["workers"]}
        assert workers == {first["worker"]: ["tiny-a.safetensors"], other: ["tiny-b.safetensors"]}
