"""lienzo serve: the native API, the job queue (order, progress, cancel, limits, disconnects) and auth."""

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from lienzo.images.metadata import parse_infotext
from lienzo.server.app import Auth, create_app
from lienzo.settings import Settings
from servers import b64_png, bomb_png, home_settings, lienzo_server, two_model_home

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("serve-home"))


def settings_for(home, tmp_path, **limits) -> Settings:
    return home_settings(home, data=home / "data", out=tmp_path / "out", **limits)


@pytest.fixture
def client(home, tmp_path):
    with TestClient(create_app(settings_for(home, tmp_path))) as c:
        yield c


def wait_for(client, job_id: str, condition, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if condition(job):
            return job
        assert time.monotonic() < deadline, f"job never reached the condition: {job}"
        time.sleep(0.02)


def test_txt2img_job_runs_and_serves_pngs_with_infotext(client):
    queued = client.post("/api/v1/txt2img", json={**FAST, "batch_size": 2})
    assert queued.status_code == 202
    job = wait_for(client, queued.json()["id"], lambda j: j["status"] == "done")
    assert [i["seed"] for i in job["images"]] == [7, 8]
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["step"] == job["progress"]["total_steps"] == 2
    assert job["model"] == "tiny-a" and job["source"] == "native" and job["mode"] == "txt2img"
    assert [i["watermarked"] for i in job["images"]] == [False, False]  # 64x64 is too small to hold the mark
    assert job["parameters"]["safety"] == "blur" and job["parameters"]["watermark"] is None
    assert job["parameters"]["prompt"] == "a red apple" and job["parameters"]["steps"] == 2
    png = client.get(job["images"][1]["url"])
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64)
    info = parse_infotext(image.info["parameters"])
    assert info.params["Seed"] == "8" and info.params["Steps"] == "2" and info.model == "tiny-a"
    assert job["progress"]["preview_url"] is None  # a finished job keeps its images, not its live preview


def test_same_request_gives_the_same_pixels_as_the_engine(client, home):
    import lienzo

    job = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
    served = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    direct = lienzo.generate(model=str(home / "models" / "tiny-a.safetensors"), **FAST).images[0].image
    assert served.tobytes() == direct.tobytes()


def test_img2img_inpaint_outpaint(client):
    picture = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for mode, extra, size in [
        ("img2img", {"denoising_strength": 0.5}, (64, 64)),
        ("inpaint", {"mask": b64_png(mask), "inpainting_fill": "latent noise"}, (64, 64)),
        ("outpaint", {"outpaint_right": 32}, (96, 64)),
    ]:
        body = {**FAST, "init_image": "data:image/png;base64," + b64_png(picture), **extra}
        body.pop("width"), body.pop("height")
        job = client.post(f"/api/v1/{mode}?wait=true", json=body).json()
        assert job["status"] == "done", job
        assert job["mode"] == mode
        assert Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).size == size
    outpaint = client.post("/api/v1/outpaint", json={"prompt": "x", "init_image": b64_png(picture)})
    assert outpaint.status_code == 422 and outpaint.json()["field"] == "outpaint_left"


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"steps": 500}, "steps", "between 1 and 150"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"sampler": "Eulr a"}, "sampler", "Euler a"),
        ({"stepz": 5}, "stepz", "Extra inputs"),
        ({"steps": "many"}, "steps", "integer"),
        ({"model": "no-such-model"}, "model", "tiny-a"),
    ],
)
def test_bad_requests_are_422_naming_the_field(client, body, field, words):
    response = client.post("/api/v1/txt2img", json={**FAST, **body})
    assert response.status_code == 422
    assert response.json()["field"] == field and words in response.json()["detail"]


@pytest.mark.parametrize(
    "image, words",
    [
        ("not base64 !!", "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), "not an image"),
        (base64.b64encode(bomb_png(6000, 6000)).decode(), "6000x6000"),
        (base64.b64encode(bomb_png(20000, 20000)).decode(), "too large"),
        ("", "empty"),
    ],
    ids=["bad-base64", "not-an-image", "over-max-input-pixels", "bomb", "empty"],
)
def test_bad_images_are_4xx_never_500(client, image, words):
    response = client.post("/api/v1/img2img", json={"prompt": "x", "init_image": image})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "init_image" and words in response.json()["detail"]


def test_server_limits(home, tmp_path):
    settings = settings_for(home, tmp_path, max_steps=10, max_images=3, max_pixels=128 * 128, max_body_mb=0.01)
    with TestClient(create_app(settings)) as c:
        assert "max_steps" in c.post("/api/v1/txt2img", json={**FAST, "steps": 11}).json()["detail"]
        assert "max_images" in c.post("/api/v1/txt2img", json={**FAST, "batch_size": 2, "batch_count": 2}).json()["detail"]
        too_big = c.post("/api/v1/txt2img", json={**FAST, "width": 256, "height": 128})
        assert too_big.status_code == 422 and "max_pixels" in too_big.json()["detail"]
        body = c.post("/api/v1/txt2img", json={**FAST, "prompt": "x" * 20000})
        assert body.status_code == 413 and "max_body_mb" in body.json()["detail"]
        assert c.get("/api/v1/queue").status_code == 200  # still serving


def test_queue_order_position_cancel_queued_and_running(client):
    slow = client.post("/api/v1/txt2img", json={**FAST, "steps": 150, "batch_count": 3}).json()
    second = client.post("/api/v1/txt2img", json=FAST).json()
    third = client.post("/api/v1/txt2img", json=FAST).json()
    running = wait_for(client, slow["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    assert running["position"] is None and running["progress"]["eta"] is not None
    assert client.get(f"/api/v1/jobs/{second['id']}").json()["position"] == 0
    assert client.get(f"/api/v1/jobs/{third['id']}").json()["position"] == 1

    cancelled = client.post(f"/api/v1/jobs/{second['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["position"] is None
    assert client.get(f"/api/v1/jobs/{third['id']}").json()["position"] == 0

    assert client.delete(f"/api/v1/jobs/{slow['id']}").status_code == 200
    stopped = wait_for(client, slow["id"], lambda j: j["status"] == "cancelled")
    assert stopped["progress"]["step"] < 150 or stopped["progress"]["batch"] < 2
    done = wait_for(client, third["id"], lambda j: j["status"] == "done")
    assert len(done["images"]) == 1
    ours = (slow["id"], second["id"], third["id"])  # the history also holds the module's earlier tests' jobs
    statuses = {j["id"]: j["status"] for j in client.get("/api/v1/jobs").json() if j["id"] in ours}
    assert statuses == {slow["id"]: "cancelled", second["id"]: "cancelled", third["id"]: "done"}
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404


def test_a_failing_job_does_not_stop_the_worker(client, home):
    broken = home / "models" / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    try:
        failed = client.post("/api/v1/txt2img?wait=true", json={**FAST, "model": "broken"}).json()
    finally:
        broken.unlink()
    assert failed["status"] == "failed" and "broken" in failed["error"]
    assert client.post("/api/v1/txt2img?wait=true", json=FAST).json()["status"] == "done"


def test_progress_events_stream_until_done(client):
    job = client.post("/api/v1/txt2img", json={**FAST, "steps": 6}).json()
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "done"
    steps = [e["progress"]["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 6 and len(events) >= 3


def test_models_switch_samplers(client):
    models = client.get("/api/v1/models").json()
    assert [(m["name"], m["current"]) for m in models] == [("tiny-a", True), ("tiny-b", False)]
    assert [(m["provenance"], m["training_data"]) for m in models] == [("provenance unknown", None)] * 2
    assert len(models[0]["sha256"]) == 64 and models[0]["sha256"].startswith(models[0]["short_hash"])
    assert client.put("/api/v1/models/current", json={"name": "tiny-b"}).json()["current"]
    assert [m["current"] for m in client.get("/api/v1/models").json()] == [False, True]
    job = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
    assert job["model"] == "tiny-b"
    assert client.put("/api/v1/models/current", json={"name": "nope"}).status_code == 422
    samplers = {s["name"]: s for s in client.get("/api/v1/samplers").json()}
    assert "Karras" in samplers["DPM++ 2M"]["schedules"] and "Euler a" in samplers


def test_a_lienzo_trained_model_states_its_training_data(home, tmp_path):
    """A diffusers folder with the trainer's dataset_manifest.json: the models API summarises it."""
    from lienzo.training.data import scan_folder
    from lienzo.training.manifest import write_manifest
    from tiny_models import build_tiny, save_diffusers_folder

    art = tmp_path / "art"
    art.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(art / f"{i}.png")
    models = tmp_path / "models"
    folder = save_diffusers_folder(build_tiny("sd1"), models / "mine")
    digest = write_manifest(scan_folder(art, licence="CC BY 4.0", source="my sketchbook"), folder / "dataset_manifest.json")
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings)) as c:
        (model,) = c.get("/api/v1/models").json()
    assert model["training_data"] == {"images": 3, "licence": "CC BY 4.0", "source": "my sketchbook", "manifest_sha256": digest}
    assert model["provenance"] == f"3 images, licence CC BY 4.0, source my sketchbook, manifest sha256 {digest[:12]}"


def test_auth_guards_every_route(home, tmp_path):
    auth = Auth(user="ana", password="s3cret", api_key="key-1")
    with TestClient(create_app(settings_for(home, tmp_path), auth=auth)) as c:
        for path in ("/api/v1/queue", "/docs", "/openapi.json", "/sdapi/v1/samplers", "/v1/images/generations"):
            response = c.get(path)
            assert response.status_code == 401, path
        assert c.get("/api/v1/queue").headers["www-authenticate"].startswith("Basic")
        assert c.get("/api/v1/queue", auth=("ana", "s3cret")).status_code == 200
        assert c.get("/api/v1/queue", auth=("ana", "wrong")).status_code == 401
        assert c.get("/api/v1/queue", headers={"Authorization": "Bearer key-1"}).status_code == 200
        assert c.get("/api/v1/queue", headers={"Authorization": "Bearer key-2"}).status_code == 401
        assert c.get("/api/v1/queue", headers={"Authorization": "Basic !!!"}).status_code == 401
        with pytest.raises(WebSocketDisconnect):
            with c.websocket_connect("/api/v1/queue"):
                pass


def test_serve_refuses_to_listen_without_auth(home):
    from click.testing import CliRunner

    from lienzo.cli import app

    result = CliRunner().invoke(app, ["--models-dir", str(home / "models"), "serve", "--listen"])
    assert result.exit_code == 2 and "--auth" in result.output and "--insecure" in result.output
    result = CliRunner().invoke(app, ["serve", "--host", "192.168.1.5", "--auth", "nocolon"])
    assert result.exit_code == 2 and "USER:PASS" in result.output


def test_real_server_concurrent_clients_and_disconnects(home):
    """20 clients at once against a real server with room for 8 waiting jobs: every job completes
    or is refused with 429; none lost or duplicated. A client that leaves frees its queued job."""
    with lienzo_server(home, env={"LIENZO_MAX_QUEUE": "8", "LIENZO_DEFAULT_MODEL": "tiny-a"}) as url:
        before = {j["id"] for j in httpx.get(f"{url}/api/v1/jobs", params={"limit": 200}).json()}

        async def one(client: httpx.AsyncClient, i: int):
            return await client.post(f"{url}/api/v1/txt2img?wait=true", json={**FAST, "seed": i})

        async def all_clients():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(20)))

        responses = asyncio.run(all_clients())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 9, codes
        done = [r.json() for r in responses if r.status_code == 200]
        assert all(j["status"] == "done" and len(j["images"]) == 1 for j in done)
        assert len({j["id"] for j in done}) == len(done)
        assert sorted(j["images"][0]["seed"] for j in done) == sorted(i for i, c in enumerate(codes) if c == 200)
        assert all("max_queue" in r.json()["detail"] for r in responses if r.status_code == 429)
        # The history holds the module's earlier jobs too: the burst added exactly the accepted ones.
        listed = {j["id"] for j in httpx.get(f"{url}/api/v1/jobs", params={"limit": 200}).json()} - before
        assert sorted(listed) == sorted(j["id"] for j in done)

        blocker = httpx.post(f"{url}/api/v1/txt2img", json={**FAST, "steps": 150, "batch_count": 16}).json()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/api/v1/txt2img?wait=true", json=FAST, timeout=1.5)
        known = {j["id"] for j in done} | {blocker["id"]}
        deadline = time.monotonic() + 30
        while True:
            left = [j for j in httpx.get(f"{url}/api/v1/jobs").json() if j["id"] not in known | before]
            if left and left[0]["status"] == "cancelled":
                break
            assert time.monotonic() < deadline, left
            time.sleep(0.2)
        assert httpx.get(f"{url}/api/v1/jobs/{blocker['id']}").json()["status"] == "running"
        httpx.post(f"{url}/api/v1/jobs/{blocker['id']}/cancel")
        deadline = time.monotonic() + 30
        idle = {"running": None, "waiting": 0, "max_queue": 8, "paused": False, "jobs": []}
        while {k: v for k, v in httpx.get(f"{url}/api/v1/queue").json().items() if k != "workers"} != idle:
            assert time.monotonic() < deadline
            time.sleep(0.2)
