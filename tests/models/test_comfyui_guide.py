"""Issue 19's "done when", on tiny random stand-ins of exactly the files a ComfyUI guide has a new user
download: Flux.1 schnell as a GGUF transformer (``unet/``) with ``clip_l``, an fp8 ``t5xxl`` (``clip/``)
and ``ae`` (``vae/``); SD 3.5 Medium as one all-in-one file (``checkpoints/``). Each makes txt2img,
img2img and inpaint pictures from the CLI, the A1111 API and lienzo's own API (the studio's), and each
picture is remade exactly from its PNG by ``--from``."""

import base64

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from gguf import GGMLQuantizationType
from PIL import Image
from test_assembly import save_all_in_one, save_text_encoder, save_vae
from test_transformer_files import original_names, write_gguf
from tiny_models import build_tiny

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.server.app import create_app
from lienzo.settings import Settings

FLUX = "flux1-schnell-Q4_0"
SD35 = "sd3.5_medium"
SMALL = ("--steps", "2", "-W", "64", "-H", "64")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui-guide")
    models = root / "models"
    flux = build_tiny("flux", guidance=False)
    (models / "unet").mkdir(parents=True)
    write_gguf(models / "unet" / f"{FLUX}.gguf", original_names("flux", flux.transformer.state_dict()), GGMLQuantizationType.Q4_0, "flux")
    save_text_encoder(flux.text_encoder, models / "clip" / "clip_l.safetensors")
    save_text_encoder(flux.text_encoder_2, models / "clip" / "t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn)
    save_vae(flux.vae, models / "vae" / "ae.safetensors")
    (models / "checkpoints").mkdir()
    save_all_in_one(build_tiny("sd3"), models / "checkpoints" / f"{SD35}.safetensors")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(root / "mask.png")
    return root


def cli(home, *args) -> str:
    """Run lienzo on the guide's models dir; the path of the one PNG it wrote."""
    base = ["--models-dir", str(home / "models"), "--data-dir", str(home / "data"), "--outputs-dir", str(home / "out")]
    result = CliRunner().invoke(app, [*base, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def remade_exactly(home, path, mode: str) -> None:
    """``lienzo <mode> [inputs] --from PNG``: the same picture, from its parameters alone."""
    inputs = {"txt2img": (), "img2img": (str(home / "photo.png"),), "inpaint": (str(home / "photo.png"), str(home / "mask.png"))}
    command = "generate" if mode == "txt2img" else mode
    again = cli(home, command, *inputs[mode], "--from", str(path))
    assert np.array_equal(pixels(again), pixels(path)), mode
    # The same parameters, but for the safety note: the CLI's and the server's policies are separate settings.
    first, second = (parse_infotext(read_parameters(p)) for p in (path, again))
    assert (first.prompt, first.negative_prompt) == (second.prompt, second.negative_prompt)
    assert {k: v for k, v in first.params.items() if k != "Safety filter"} == {k: v for k, v in second.params.items() if k != "Safety filter"}


@pytest.mark.parametrize("model", [FLUX, SD35])
def test_cli_makes_and_remakes_each_mode(home, model):
    photo, mask = str(home / "photo.png"), str(home / "mask.png")
    made = {
        "txt2img": cli(home, "generate", "a red apple", "--model", model, *SMALL, "--seed", "1"),
        "img2img": cli(home, "img2img", photo, "a red apple", "--model", model, *SMALL, "--seed", "2", "--strength", "0.6"),
        "inpaint": cli(home, "inpaint", photo, mask, "a red apple", "--model", model, *SMALL, "--seed", "3"),
    }
    for mode, path in made.items():
        params = parse_infotext(read_parameters(path)).params
        assert params["Model"] == model
        if model == FLUX:  # assembled from the guide's files, which the infotext names as Forge does
            assert [params[f"Module {i}"] for i in (1, 2)] == ["clip_l", "t5xxl_fp8_e4m3fn"]
        remade_exactly(home, path, mode)


@pytest.fixture(scope="module")
def client(home):
    settings = Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=home / "out")
    with TestClient(create_app(settings, model=FLUX)) as c:
        yield c


def b64(path) -> str:
    return base64.b64encode((path).read_bytes()).decode()


def saved(home, name: str, b64_png: str):
    path = home / name
    path.write_bytes(base64.b64decode(b64_png))
    return path


@pytest.mark.parametrize("model", [FLUX, SD35])
def test_a1111_api_makes_pictures_that_remake_exactly(home, client, model):
    base = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": model}}
    bodies = {
        "txt2img": ("/sdapi/v1/txt2img", {**base, "seed": 11}),
        "img2img": ("/sdapi/v1/img2img", {**base, "seed": 12, "init_images": [b64(home / "photo.png")], "denoising_strength": 0.6}),
        "inpaint": (
            "/sdapi/v1/img2img",
            {**base, "seed": 13, "init_images": [b64(home / "photo.png")], "mask": b64(home / "mask.png"), "inpaint_full_res": False},
        ),
    }
    for mode, (url, body) in bodies.items():
        r = client.post(url, json=body)
        assert r.status_code == 200, r.text
        remade_exactly(home, saved(home, f"a1111-{model}-{mode}.png", r.json()["images"][0]), mode)


def test_studio_api_makes_pictures_that_remake_exactly(home, client):
    """The studio's calls: lienzo's own API, each mode, on both models."""
    photo, mask = b64(home / "photo.png"), b64(home / "mask.png")
    for model in (FLUX, SD35):
        assert client.put("/api/v1/models/current", json={"name": model}).status_code == 200
        base = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}
        bodies = {
            "txt2img": {**base, "seed": 21},
            "img2img": {**base, "seed": 22, "init_image": photo, "denoising_strength": 0.6},
            "inpaint": {**base, "seed": 23, "init_image": photo, "mask": mask},
        }
        for mode, body in bodies.items():
            job = client.post(f"/api/v1/{mode}?wait=true", json=body).json()
            assert job["status"] == "done", job
            path = home / f"studio-{model}-{mode}.png"
            path.write_bytes(client.get(job["images"][0]["url"]).content)
            remade_exactly(home, path, mode)
