"""``lienzo generate`` with a ``lienzo serve`` running for the same folders: the job goes to the server (no torch in
the CLI), makes the pixels ``--local`` makes, and a server.json that is stale or open to others is ignored."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from servers import lienzo_process

from lienzo.cli import app, remote
from lienzo.errors import LienzoError

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]
ENV = {"LIENZO_DEFAULT_MODEL": "tiny-sd15", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def dirs(home) -> list[str]:
    return ["--models-dir", str(home / "models"), "--data-dir", str(home / "data"), "--outputs-dir", str(home / "outputs")]


def lienzo(home, *args: str, code: int = 0, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a process of its own, on ``home``'s folders (the server's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIENZO_LOCAL", "LIENZO_SERVER")}
    result = subprocess.run(
        [sys.executable, *python, "-m", "lienzo", *dirs(home), *args], capture_output=True, text=True, env={**env, **ENV}, timeout=300,
    )
    assert result.returncode == code, result.stdout + result.stderr
    return result


def paths(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def jobs(url: str, token: str) -> list[dict]:
    return httpx.get(f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).json()


@pytest.fixture(scope="module")
def served(home):
    """``home``'s models under a running ``lienzo serve``: (home, url, server.json's contents)."""
    with lienzo_process(home, env=ENV) as (url, process):
        described = json.loads((home / "data" / "server.json").read_text())
        assert described["url"] == url and described["pid"] == process.pid
        yield home, url, described


def test_generate_goes_to_the_server_without_torch_and_makes_the_local_pixels(served):
    home, url, described = served
    sent = lienzo(home, "generate", "a red apple", *FAST, python=("-X", "importtime"))
    assert f"note: sent to lienzo serve at {url} (pid {described['pid']}); --local runs it here" in sent.stderr
    imported = {line.rpartition("|")[2].strip() for line in sent.stderr.splitlines() if line.startswith("import time:")}
    assert "lienzo.cli.remote" in imported and not imported & {"torch", "diffusers"}
    assert "seed: 5" in sent.stderr
    [made] = paths(sent)
    assert os.path.isfile(made) and made.startswith(str(home / "outputs" / "txt2img-images"))
    job = jobs(url, described["token"])[0]  # newest first
    assert job["status"] == "done" and [image["file"] for image in job["images"]] == [made]
    assert job["parameters"]["prompt"] == "a red apple" and job["parameters"]["seed"] == 5

    count = len(jobs(url, described["token"]))
    here = lienzo(home, "generate", "a red apple", *FAST, "--local")
    assert "note: sent" not in here.stderr
    assert len(jobs(url, described["token"])) == count and jobs(url, described["token"])[0]["id"] == job["id"]  # left alone
    [again] = paths(here)
    assert again != made and np.array_equal(pixels(again), pixels(made))


def test_img2img_sends_its_input_image(served, tmp_path):
    home, url, described = served
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture)
    sent = lienzo(home, "img2img", str(picture), "a red apple", "--steps", "2", "--seed", "7", "--strength", "0.5")
    assert f"note: sent to lienzo serve at {url}" in sent.stderr
    [made] = paths(sent)
    job = jobs(url, described["token"])[0]
    assert job["mode"] == "img2img" and [image["file"] for image in job["images"]] == [made]
    here = lienzo(home, "img2img", str(picture), "a red apple", "--steps", "2", "--seed", "7", "--strength", "0.5", "--local")
    assert np.array_equal(pixels(paths(here)[0]), pixels(made))


def test_a_stale_or_open_server_json_is_ignored_unless_the_server_is_asked_for(served, tmp_path):
    home, url, described = served
    # A copy of the live server's description in another data dir, with its own outputs: the same models dir.
    data = tmp_path / "data"
    data.mkdir()
    mine = ["--models-dir", str(home / "models"), "--data-dir", str(data), "--outputs-dir", str(tmp_path / "outputs")]
    description = {**described, "outputs_dir": str(tmp_path / "outputs")}
    (data / "server.json").write_text(json.dumps(description))
    before = len(jobs(url, described["token"]))
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(app, [*mine, "generate", "a red apple", *FAST, *args], catch_exceptions=False, env=ENV)
        assert result.exit_code == code, result.output + result.stderr
        return result

    (data / "server.json").chmod(0o644)  # readable by others: not trusted, silently
    open_to_others = run()
    assert "note" not in open_to_others.stderr and len(paths(open_to_others)) == 1
    refused = run("--server", url, code=2)
    assert f"--server: {data / 'server.json'} is open to other users (mode 0644, not 0600)" in refused.stderr

    (data / "server.json").chmod(0o600)
    (data / "server.json").write_text(json.dumps({**description, "pid": 2**22 + 12345}))  # above Linux's pid_max: no such process
    stale = run()
    assert "note" not in stale.stderr and len(paths(stale)) == 1
    assert len(jobs(url, described["token"])) == before  # neither went to the server

    (data / "server.json").write_text(json.dumps(description))
    assert "it loaded its models with int8=False, this command asks for True (--int8)" in run("--int8", "--server", url, code=2).stderr
    assert "note: sent" in run().stderr  # the same file, private and live, is used
    assert len(jobs(url, described["token"])) == before + 1
    token = {"Authorization": f"Bearer {described['token']}"}
    httpx.post(f"{url}/api/v1/queue/pause", headers=token).raise_for_status()
    try:  # a paused queue would hold the job
        assert f"--server: the queue of {url} is paused" in run("--server", url, code=2).stderr
    finally:
        httpx.post(f"{url}/api/v1/queue/resume", headers=token).raise_for_status()


def test_the_server_describes_itself_privately_until_sigterm(home, tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "models").symlink_to(home / "models")
    described = mine / "data" / "server.json"
    with lienzo_process(mine, "--api-key", "s3cret", env=ENV) as (url, process):
        assert described.stat().st_mode & 0o777 == 0o600
        info = json.loads(described.read_text())
        assert info["url"] == url and info["pid"] == process.pid and info["model"] == "tiny-sd15"
        assert info["load"]["device"] == "auto" and info["load"]["int8"] is False and info["load"]["devices"] is None
        # The token lets the CLI in as the admin, beside --api-key; nothing else does.
        assert httpx.get(f"{url}/api/v1/queue", headers={"Authorization": f"Bearer {info['token']}"}).status_code == 200
        assert httpx.get(f"{url}/api/v1/queue", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
        assert "note: sent" in lienzo(mine, "generate", "a red apple", *FAST).stderr
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        assert not described.exists()


class _FakeServer(BaseHTTPRequestHandler):
    """A job's event stream that ends on a running job, as lienzo serve's may when the job finishes while its last
    event is sent; GET of the job answers ``self.server.final`` (None: the server is gone, 503)."""

    def do_GET(self):
        if self.path.endswith("/events"):
            event = json.dumps({"id": "j1", "status": "running", "images": [], "progress": {}})
            self._send(200, f"event: job\ndata: {event}\n\n".encode(), "text/event-stream")
        elif self.server.final is None:
            self._send(503, b'{"detail": "shutting down"}', "application/json")
        else:
            self._send(200, json.dumps(self.server.final).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("final", [{"id": "j1", "status": "done", "images": [{"seed": 1}]}, None])
def test_a_stream_that_ends_early_is_settled_by_reading_the_job(final):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    server.final = final
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = remote.Server(url=f"http://127.0.0.1:{server.server_address[1]}", pid=1, token="t", model=None, explicit=False)
    seen = []
    try:
        if final is None:
            with pytest.raises(LienzoError, match="stopped answering while job j1 was running"):
                remote.follow(target, {"id": "j1", "status": "queued"}, on_change=seen.append, stop=threading.Event())
        else:
            assert remote.follow(target, {"id": "j1", "status": "queued"}, on_change=seen.append, stop=threading.Event()) == final
            assert [job["status"] for job in seen] == ["running", "done"]
    finally:
        server.shutdown()
