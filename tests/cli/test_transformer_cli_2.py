"""Chroma and Z-Image through the command line and the A1111 API: tiny models as diffusers folders in
a models dir, each picture remade exactly from its PNG (--from)."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.server.app import create_app
from lienzo.settings import Settings
from tiny_models import build_tiny, save_diffusers_folder

SMALL = ("--steps", "2", "-W", "64", "-H", "64")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-cli-2")
    for name in ("chroma", "zimage"):
        save_diffusers_folder(build_tiny(name), root / "models" / f"tiny-{name}")
    return root


def _path(result) -> str:
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    ("model", "flags", "expected"),
    [
        ("tiny-chroma", ("-n", "blurry"), {"CFG scale": "5", "Sampler": "Euler", "Schedule type": "Simple"}),
        ("tiny-zimage", (), {"CFG scale": "1", "Shift": "3", "Sampler": "Euler"}),
    ],
)
def test_generate_then_remake_from_the_png_exactly(lienzo, model, flags, expected):
    first = _path(lienzo("generate", "a (red:1.2) apple", "--model", model, *SMALL, "--seed", "3", *flags))
    params = parse_infotext(read_parameters(first)).params
    assert {k: params.get(k) for k in expected} == expected and params["Model"] == model
    again = _path(lienzo("generate", "--from", first))
    assert np.array_equal(_pixels(again), _pixels(first))


def test_a1111_api_runs_them_with_their_defaults(home):
    settings = Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=home / "out")
    with TestClient(create_app(settings, model="tiny-zimage")) as client:
        for model, cfg in (("tiny-zimage", 1.0), ("tiny-chroma", 5.0)):
            body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 5, "override_settings": {"sd_model_checkpoint": model}}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            params = parse_infotext(image.info["parameters"]).params
            assert params["Model"] == model and float(params["CFG scale"]) == cfg
