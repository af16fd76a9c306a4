"""Which model and LoRA names each door takes: over HTTP only what the models dir holds, never a path
elsewhere; no device, FIFO or arbitrary folder is ever opened or hashed; damaged files are listed as
unreadable (with the reason) beside the models that work; a failed switch and a cancel during loading
leave the server working."""

import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from lienzo.api import load_model
from lienzo.errors import GenerationCancelled, ModelFileError
from lienzo.models import formats
from lienzo.models.registry import Registry
from lienzo.models.single_file_save import save_single_file
from lienzo.server.app import create_app
from lienzo.settings import Settings
from servers import two_model_home
from test_lora import SD1_LAYERS, _write_kohya
from tiny_models import build_tiny, save_diffusers_folder

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 3}
OUTSIDE = ["/etc", "/etc/passwd", "../..", "/dev/zero"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """tiny-a and tiny-b, sub/tiny-c, and a LoRA for them in Lora/."""
    root = two_model_home(tmp_path_factory.mktemp("paths-home"))
    models = root / "models"
    (models / "sub").mkdir()
    (models / "Lora").mkdir()
    tiny = build_tiny("sd1")
    save_single_file(tiny, models / "sub" / "tiny-c.safetensors")
    _write_kohya(models / "Lora" / "style.safetensors", tiny, SD1_LAYERS)
    return root


def settings_for(home, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", models_dir=home / "models", outputs_dir=tmp_path / "out", default_model="tiny-a")


@pytest.fixture
def client(home, tmp_path):
    with TestClient(create_app(settings_for(home, tmp_path))) as c:
        yield c


def wait_for(client, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job never reached {statuses}: {job}"
        time.sleep(0.02)


def current(client) -> str:
    return next(m["name"] for m in client.get("/api/v1/models").json() if m["current"])


def assert_refused(response, status: int, field: str, name_key: str = "field") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert (body["error"]["param"] if name_key == "param" else body[name_key]) == field, body


# -- every HTTP door refuses paths outside the models dir -------------------------------------------


@pytest.mark.parametrize("bad", OUTSIDE)
def test_every_http_door_refuses_paths_outside_the_models_dir(client, tmp_path, bad):
    # Native first: the old server queued these, and its worker then hashed /dev/zero for ever.
    assert_refused(client.post("/api/v1/txt2img", json={**FAST, "model": bad}), 422, "model")
    assert_refused(client.put("/api/v1/models/current", json={"name": bad}), 422, "name")
    assert_refused(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad}), 422, "sd_model_checkpoint")
    override = {**FAST, "override_settings": {"sd_model_checkpoint": bad}}
    assert_refused(client.post("/sdapi/v1/txt2img", json=override), 422, "override_settings.sd_model_checkpoint")
    openai = {"prompt": "a red apple", "size": "64x64", "steps": 2, "model": bad}
    assert_refused(client.post("/v1/images/generations", json=openai), 400, "model", name_key="param")
    assert_refused(client.post("/api/v1/txt2img", json={**FAST, "loras": [bad]}), 422, "loras")
    assert_refused(client.post("/api/v1/txt2img", json={**FAST, "prompt": f"an apple <lora:{bad}:0.5>"}), 422, "prompt")
    assert_refused(client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": f"an apple <lora:{bad}:0.5>"}), 422, "prompt")

    # Nothing was queued, the current model is as it was, and nothing outside was hashed.
    assert client.get("/api/v1/jobs").json() == []
    assert current(client) == "tiny-a"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-a.safetensors [")
    cache = json.loads((tmp_path / "data" / "cache" / "models.json").read_text())
    assert all(key.removeprefix("lora:").startswith(str(client.app.state.settings.models_dir.resolve())) for key in cache), cache
    assert client.post("/api/v1/txt2img?wait=true", json=FAST).json()["status"] == "done"


def test_a_subfolder_that_leads_out_and_a_symlink_out_are_refused(home, tmp_path):
    """... while the model the server was started with (``serve --model PATH``, outside the models dir)
    stays usable by the path the A1111 routes list it under."""
    outside = tmp_path / "elsewhere"
    save_diffusers_folder(build_tiny("sd1"), outside / "model")
    start = save_single_file(build_tiny("sd1"), tmp_path / "start" / "mine.safetensors")
    link = home / "models" / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with TestClient(create_app(settings_for(home, tmp_path), model=str(start))) as client:
            for name in ("sub/../../models/../..", "link/model", str(link / "model"), str(outside / "model")):
                assert_refused(client.put("/api/v1/models/current", json={"name": name}), 422, "name")
                assert_refused(client.post("/api/v1/txt2img", json={**FAST, "model": name}), 422, "model")
            title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
            assert title.startswith("mine.safetensors [")
            assert client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": title}}).status_code == 200
            assert client.post("/api/v1/txt2img", json={**FAST, "model": str(start)}).status_code == 202
    finally:
        link.unlink()


def test_names_the_registry_lists_and_paths_inside_the_models_dir_still_work(client, home):
    models = home / "models"
    for name in ("sub/tiny-c", "sub/tiny-c.safetensors", str(models / "sub" / "tiny-c.safetensors"), "sub/../tiny-b.safetensors"):
        switched = client.put("/api/v1/models/current", json={"name": name})
        assert switched.status_code == 200, (name, switched.text)
    assert current(client) == "tiny-b"
    for name in ("tiny-a", "sub/tiny-c.safetensors", str(models / "tiny-b.safetensors")):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 200, name
    job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "model": "sub/tiny-c", "prompt": "an apple <lora:style:0.5>"}).json()
    assert job["status"] == "done" and job["model"] == "tiny-c", job
    job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "loras": ["Lora/style.safetensors"]}).json()
    assert job["status"] == "done", job


def test_a_switch_to_a_file_that_is_not_a_usable_checkpoint_is_refused_at_once(client, home):
    broken = home / "models" / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    try:
        refused = client.put("/api/v1/models/current", json={"name": "broken"})
    finally:
        broken.unlink()
    assert_refused(refused, 422, "name")
    assert "not a model that can generate" in refused.json()["detail"]
    assert current(client) == "tiny-a"


# -- a failed switch, and cancel while loading ------------------------------------------------------


def test_a_switch_that_fails_to_load_keeps_the_previous_model(home, tmp_path):
    settings = settings_for(home, tmp_path)

    def loader(name, cancel):
        if name.endswith("tiny-b.safetensors"):
            raise ModelFileError("tiny-b.safetensors is damaged (as this test's loader says)")
        return load_model(name, device="cpu", settings=settings)

    with TestClient(create_app(settings, loader=loader)) as client:
        assert client.post("/api/v1/txt2img?wait=true", json=FAST).json()["status"] == "done"
        assert client.put("/api/v1/models/current", json={"name": "tiny-b"}).status_code == 200
        failed = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
        assert failed["status"] == "failed" and "tiny-b.safetensors is damaged" in failed["error"]
        assert current(client) == "tiny-a"
        job = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
        assert job["status"] == "done" and job["model"] == "tiny-a"


def test_cancel_stops_a_job_while_its_model_loads(home, tmp_path):
    settings = settings_for(home, tmp_path)
    loading, saw_cancel, calls = threading.Event(), threading.Event(), []

    def loader(name, cancel):
        calls.append(name)
        if len(calls) == 1:
            loading.set()
            while not cancel():  # a load that only a cancel ends
                time.sleep(0.01)
            saw_cancel.set()
            raise GenerationCancelled
        return load_model(name, device="cpu", settings=settings)

    with TestClient(create_app(settings, loader=loader)) as client:
        job = client.post("/api/v1/txt2img", json=FAST).json()
        # Until the loader runs; a server that never hands it the cancel flag runs the job to its end.
        while not loading.wait(0.02) and client.get(f"/api/v1/jobs/{job['id']}").json()["status"] in ("queued", "running"):
            pass
        client.post(f"/api/v1/jobs/{job['id']}/cancel")
        stopped = wait_for(client, job["id"], "cancelled", "done", "failed")
        assert saw_cancel.is_set() and stopped["status"] == "cancelled" and stopped["progress"]["step"] == 0
        assert client.post("/api/v1/txt2img?wait=true", json=FAST).json()["status"] == "done"


def test_load_model_asks_cancel_between_its_parts(home, tmp_path):
    settings = settings_for(home, tmp_path)
    asked = []

    def cancel_at(n):
        def cancel():
            asked.append(n)
            return len(asked) >= n

        return cancel

    with pytest.raises(GenerationCancelled):
        load_model("tiny-a", device="cpu", settings=settings, cancel=cancel_at(3))
    assert len(asked) == 3  # it stopped at the first "stop" it was told
    asked.clear()
    assert load_model("tiny-a", device="cpu", settings=settings, cancel=lambda: bool(asked.append(0))).name == "tiny-a"
    assert len(asked) >= 4  # hashing, UNet, VAE, text encoder, moving to the device


# -- the CLI: any path, but never a device or FIFO; one line, never a hang --------------------------


def run_cli(home, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = ["--models-dir", str(home / "models"), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]
    # A hang (the old behaviour) fails here rather than stalling the suite.
    return subprocess.run(
        [sys.executable, "-m", "lienzo", *base, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_cli_refuses_a_device_a_fifo_and_a_bad_model_index_in_one_line(home, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    folder = save_diffusers_folder(build_tiny("sd1"), tmp_path / "bad-index")
    (folder / "model_index.json").write_text("{not json")
    cases = [
        (["--model", "/dev/zero"], "model: /dev/zero is not a regular file or model folder"),
        (["--model", str(fifo)], f"model: {fifo} is not a regular file or model folder"),
        (["--vae", str(fifo)], f"vae: {fifo} is not a regular file or model folder"),
        (["--model", str(tmp_path)], "is a folder without model_index.json or config.json"),
        (["--model", str(folder)], "bad-index/model_index.json is not valid JSON"),
    ]
    for flags, words in cases:
        result = run_cli(home, tmp_path, "generate", *flags, "--steps", "1", "--width", "64", "--height", "64", "an apple")
        assert result.returncode == 2, (flags, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr, (flags, result.stderr)


def test_a_fifo_or_device_link_in_the_models_dir_is_never_opened(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    save_single_file(build_tiny("sd1"), models / "good.safetensors")
    os.mkfifo(models / "pipe.safetensors")
    (models / "zero.ckpt").symlink_to("/dev/zero")
    registry = Registry(models, tmp_path / "cache")
    # sniff first: the old reader called a FIFO empty, and hashing it would block for ever.
    with pytest.raises(ModelFileError, match="is not a regular file or model folder"):
        formats.sniff(models / "pipe.safetensors")
    assert [e.name for e in registry.scan()] == ["good"]
    assert registry.entry(models / "pipe.safetensors").error.endswith("is not a regular file or model folder")
    assert registry.entry(models / "zero.ckpt").error == "/dev/zero is not a regular file or model folder"


# -- damaged files are listed as unreadable, the others still listed --------------------------------


def _safetensors(path, header, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


F32x2 = {"dtype": "F32", "shape": [2]}
DAMAGED = {
    "overlap": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12, "overlaps"),
    "gap": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, 20, "gap of 4 bytes"),
    "offsets-not-a-list": ({"a": {**F32x2, "data_offsets": 8}}, 8, "data_offsets 8"),
    "offsets-one-number": ({"a": {**F32x2, "data_offsets": [8]}}, 8, "data_offsets [8]"),
    "offsets-backwards": ({"a": {**F32x2, "data_offsets": [8, 0]}}, 8, "data_offsets [8, 0]"),
    "offsets-text": ({"a": {**F32x2, "data_offsets": ["0", "8"]}}, 8, "data_offsets ['0', '8']"),
    "negative-shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape [-2]"),
    "shape-too-big": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "does not fill"),
    "unknown-dtype": ({"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype 'F17'"),
    "no-shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, "lacks dtype, shape or data_offsets"),
    "bad-metadata": ({"__metadata__": {"a": [1]}}, 0, "__metadata__"),
    "deep": (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", 0, "nested more than"),
    "deep-metadata": (b'{"__metadata__":' + b'{"a":' * 5000 + b"1" + b"}" * 5001 + b"}", 0, "nested more than"),
    "huge-number": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + b"9" * 5000 + b"]}}", 8, "not valid JSON"),
    "trailing": ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "4 bytes after the last tensor"),
    "one-dim-conv": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": {**F32x2, "data_offsets": [0, 8]},
            "first_stage_model.encoder.conv_in.weight": {**F32x2, "data_offsets": [8, 16]},
        },
        16,
        "not 2 or more dimensions",
    ),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_safetensors_headers_are_one_line_errors(tmp_path, name):
    header, data, words = DAMAGED[name]
    path = tmp_path / f"{name}.safetensors"
    _safetensors(path, header, b"\0" * data)
    with pytest.raises(ModelFileError) as raised:
        formats.detect_architecture({k: s for k, (s, _) in formats.read_header(path).items()}, name=path.name)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_damaged_files_are_listed_as_unreadable_and_every_other_model_still_lists(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    save_single_file(build_tiny("sd1"), models / "good.safetensors")
    # Checked as strictly as the safetensors library reads, and no more: tensors in any order, metadata.
    valid = {"__metadata__": {"k": "v"}, "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}, "a": {**F32x2, "data_offsets": [0, 8]}}
    _safetensors(tmp_path / "valid.safetensors", valid, b"\0" * 16)
    assert formats.read_header(tmp_path / "valid.safetensors") == {"a": ((2,), "F32"), "b": ((2, 2), "F16")}
    assert formats.read_metadata(tmp_path / "valid.safetensors") == {"k": "v"}
    for name in ("overlap", "offsets-not-a-list", "deep"):
        header, data, _ = DAMAGED[name]
        _safetensors(models / f"{name}.safetensors", header, b"\0" * data)
    folder = save_diffusers_folder(build_tiny("sd1"), models / "bad-index")
    (folder / "model_index.json").write_text("[1, 2")
    torch.save({"w": torch.zeros(4)}, models / "cut.ckpt")
    (models / "cut.ckpt").write_bytes((models / "cut.ckpt").read_bytes()[:200])
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, outputs_dir=tmp_path / "out", default_model="good")
    with TestClient(create_app(settings)) as client:
        listed = client.get("/api/v1/models")
        assert listed.status_code == 200, listed.text
        by_name = {m["name"]: m for m in listed.json()}
        assert by_name["good"]["error"] is None and by_name["good"]["architecture"] == "SD 1.x" and by_name["good"]["current"]
        reasons = {
            "overlap": "overlaps", "offsets-not-a-list": "data_offsets 8", "deep": "nested more than",
            "bad-index": "bad-index/model_index.json is not valid JSON", "cut": "cut.ckpt",
        }
        for name, words in reasons.items():
            assert words in by_name[name]["error"] and by_name[name]["architecture"].startswith("unreadable"), by_name[name]
        a1111 = client.get("/sdapi/v1/sd-models")
        assert a1111.status_code == 200 and [m["model_name"] for m in a1111.json()] == ["good"]
        refused = client.put("/api/v1/models/current", json={"name": "overlap"})
        assert_refused(refused, 422, "name")
        assert "overlaps" in refused.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "overlap"}).status_code == 422
        assert current(client) == "good"


# -- the registry's two modes -----------------------------------------------------------------------


def test_registry_remote_mode_takes_only_the_models_dir(home, tmp_path):
    registry = Registry(home / "models", tmp_path / "cache")
    models = (home / "models").resolve()
    assert registry.resolve("sub/tiny-c", allow_paths=False) == home / "models" / "sub" / "tiny-c.safetensors"
    assert registry.resolve("sub/../tiny-a.safetensors", allow_paths=False) == models / "tiny-a.safetensors"
    for bad in (*OUTSIDE, "~", "sub/../../x", "a\0b", "x" * 5000):
        with pytest.raises(ModelFileError, match=r"^model: "):
            registry.resolve(bad, allow_paths=False)
    with pytest.raises(ModelFileError, match=r"^model: /dev/zero is not a regular file or model folder$"):
        registry.resolve("/dev/zero")
    with pytest.raises(ModelFileError, match="is a folder without model_index.json"):
        registry.resolve("/etc")
    assert registry.resolve(str(home / "models" / "tiny-a.safetensors")) == home / "models" / "tiny-a.safetensors"

    style = home / "models" / "Lora" / "style.safetensors"
    for name in ("style", "style.safetensors", "Lora/style.safetensors", str(style)):
        assert registry.resolve_lora(name, allow_paths=False) == style, name
    for bad in ("/etc/passwd", "../../x", "Lora/../tiny-a.safetensors", str(home / "models" / "tiny-a.safetensors")):
        with pytest.raises(ModelFileError, match=r"^lora: "):
            registry.resolve_lora(bad, allow_paths=False)
    assert registry.resolve_lora(str(home / "models" / "tiny-a.safetensors")) == home / "models" / "tiny-a.safetensors"
