"""What a finished job keeps: ids, paths and metadata, never its decoded inputs or previews (the
server remembers ``keep_jobs``, 500 by default, and one 4096x4096 upload is 64 MB decoded)."""

import time

import httpx
import psutil
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.generation.request import build_request
from lienzo.server.app import create_app
from lienzo.server.job import JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.settings import Settings
from servers import b64_png, home_settings, lienzo_server

SMALL = {"prompt": "a fox", "steps": 2, "seed": 3}


def settings_for(home, tmp_path) -> Settings:
    return home_settings(home, data=tmp_path / "data", out=tmp_path / "out", model="tiny-sd15")


def closed(image: Image.Image) -> bool:
    """True when ``image`` has let go of its pixels (Image.close); its size and mode stay."""
    try:
        image.getpixel((0, 0))
    except ValueError:
        return True
    return False


def wait_for(client, job_id: str, condition) -> dict:
    deadline = time.monotonic() + 60
    while not condition(job := client.get(f"/api/v1/jobs/{job_id}").json()):
        assert time.monotonic() < deadline, f"job never reached the condition: {job}"
        time.sleep(0.02)
    return job


def test_a_finished_job_keeps_no_input_pixels_nor_preview_and_reads_as_before(home, tmp_path):
    picture = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {**SMALL, "init_image": b64_png(picture), "mask": b64_png(mask)}
    with TestClient(create_app(settings_for(home, tmp_path))) as client:
        # The live preview is there while the job runs ...
        slow = client.post("/api/v1/txt2img", json={**SMALL, "width": 64, "height": 64, "steps": 150, "batch_count": 3}).json()
        running = wait_for(client, slow["id"], lambda j: j["status"] == "running" and j["progress"]["preview_url"])
        assert client.get(running["progress"]["preview_url"]).headers["content-type"] == "image/png"
        client.post(f"/api/v1/jobs/{slow['id']}/cancel")
        # ... and gone with the input pixels once it has finished.
        view = client.post("/api/v1/inpaint?wait=true", json=body).json()
        job = client.app.state.queue.get(view["id"])
        assert job.status == JobStatus.DONE and len(job.images) == 1
        assert closed(job.request.init_image) and closed(job.request.mask)
        assert job.preview is None and client.app.state.queue.get(slow["id"]).preview is None
        # Size and mode survive: the job still reads as the inpaint it was.
        assert job.request.mode == "inpaint" and job.request.init_image.size == (64, 64)
        again = client.get(f"/api/v1/jobs/{view['id']}").json()
        assert again["mode"] == "inpaint" and again["progress"]["preview_url"] is None
        assert again["parameters"]["denoising_strength"] == 0.75 and again["images"] == view["images"]
        assert client.get(again["images"][0]["url"]).status_code == 200


def test_a_job_cancelled_while_waiting_lets_go_of_its_input(home, tmp_path):
    queue = JobQueue(settings_for(home, tmp_path))  # never started: the job waits until cancelled
    job = queue.submit(build_request(**SMALL, init_image=Image.new("RGB", (64, 64))))
    assert not closed(job.request.init_image)
    queue.cancel(job.id)
    assert job.status == JobStatus.CANCELLED and closed(job.request.init_image)
    assert job.request.mode == "img2img"


SIDE = 4096  # the largest upload max_input_pixels allows by default
DECODED = SIDE * SIDE * 4  # bytes: Pillow keeps RGB in 4 bytes a pixel
JOBS = 20  # the count: the old code grew ~64 MiB per job


def server_process(url: str) -> psutil.Process:
    port = url.rsplit(":", 1)[1]
    (server,) = [p for p in psutil.Process().children() if port in p.cmdline()]
    return server


def test_server_memory_stays_flat_over_many_big_img2img_jobs(home):
    """Issue 17: 4096x4096 img2img jobs (small PNGs: a flat picture compresses to 57 KB) grew the
    server by 64 MB each, and it keeps 500 finished jobs. Through every front door that takes an
    image, the server's resident memory must not grow by even two decoded inputs over 20 jobs."""
    flat = b64_png(Image.new("RGB", (SIDE, SIDE), (120, 60, 200)))
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (0, 0, SIDE // 2, SIDE))
    native = {**SMALL, "width": 64, "height": 64, "init_image": flat, "denoising_strength": 0.5}
    jobs = [
        ("/api/v1/img2img?wait=true", native),
        ("/api/v1/inpaint?wait=true", {**native, "mask": b64_png(mask)}),
        ("/sdapi/v1/img2img", {**SMALL, "width": 64, "height": 64, "init_images": [flat], "denoising_strength": 0.5}),
    ]
    with lienzo_server(home, "--model", "tiny-sd15") as url, httpx.Client(base_url=url, timeout=120) as client:
        server = server_process(url)

        def run(i: int) -> None:
            path, body = jobs[i % len(jobs)]
            answer = client.post(path, json=body)
            assert answer.status_code == 200, answer.text[:500]

        for i in range(len(jobs)):  # warm up: the model, imports, allocator arenas
            run(i)
        before = server.memory_info().rss
        for i in range(JOBS):
            run(i)
        grown = server.memory_info().rss - before
    assert grown < 2 * DECODED, f"the server grew by {grown / 2**20:.0f} MiB over {JOBS} jobs"
