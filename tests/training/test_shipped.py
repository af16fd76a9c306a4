"""The model shipped in the package, lienzo-mini: small, licensed, reproducible, and every door's default."""

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.models.registry import EMBEDDED, embedded_model
from lienzo.training.artifacts import sections
from lienzo.training.config import build_config, validate_config

pytestmark = pytest.mark.shipped
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "lienzo-mini.toml"


def test_the_package_ships_lienzo_mini_small_and_without_pickles():
    assert embedded_model() == EMBEDDED
    files = [p for p in EMBEDDED.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert sorted(p.parent.name for p in weights) == ["text_encoder", "unet", "vae"]
    # Version 2's 22M-parameter UNet at fp16 (44 MB), the text encoder (14 MB) and the VAE (8 MB).
    assert sum(p.stat().st_size for p in weights) <= 64 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".ckpt", ".pt", ".pth", ".pkl"}]
    assert not (EMBEDDED / "training").exists()  # checkpoints and logs stay in the run folder


def test_card_states_licence_attribution_evaluation_and_the_committed_recipe():
    card = (EMBEDDED / "README.md").read_text()
    parts = sections(card)
    assert 'license: "CC BY-SA 4.0"' in card
    assert "Source: OpenMoji (https://openmoji.org)" in parts["Data"] and "Licence: CC BY-SA 4.0" in parts["Data"]
    assert "Notice: All emojis designed by OpenMoji" in parts["Data"]
    assert "lienzo generate" in parts["Use"]
    assert "Fréchet distance" in parts["Evaluation"] and "floor" in parts["Evaluation"] and "ceiling" in parts["Evaluation"]
    assert parts["Known limits"]
    recipe = re.search(r"```toml\n(.*?)```", parts["Recipe"], re.S).group(1)
    assert validate_config(tomllib.loads(recipe)).identity() == build_config(None, RECIPE).identity()
    assert "Training was stopped" not in card


def test_every_training_image_is_recorded_with_its_hash_and_licence():
    manifest = json.loads((EMBEDDED / "dataset_manifest.json").read_text())
    assert manifest["licence"] == "CC BY-SA 4.0"
    assert len(manifest["images"]) == manifest["counts"]["images"] > 4000
    assert all(len(r["sha256"]) == 64 and r["caption"] for r in manifest["images"])
    # The attribution names openmoji-index.json for each emoji's author: it travels with the model.
    index = json.loads((EMBEDDED / "openmoji-index.json").read_text())
    authors = {e["path"]: e["author"] for e in index["images"]}
    assert all(authors.get(f"train/{r['path']}") for r in manifest["images"])


@pytest.fixture(scope="module")
def lienzo(tmp_path_factory):
    """The CLI with an empty models dir: only the shipped model can answer."""
    root = tmp_path_factory.mktemp("shipped")

    def run(*args):
        base = ["--models-dir", str(root / "models"), "--data-dir", str(root / "data"), "--outputs-dir", str(root / "out")]
        result = CliRunner().invoke(app, [*base, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        return [line for line in result.stdout.splitlines() if line.endswith(".png")]

    return run


def _colour(path: str) -> np.ndarray:
    """Mean RGB of the drawn (not near-white) pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(float)
    drawn = pixels[pixels.min(axis=1) < 200]
    assert len(drawn) > 0.05 * len(pixels), "the picture is (almost) blank"
    return drawn.mean(axis=0)


def test_generate_without_a_model_draws_the_prompt_with_lienzo_mini(lienzo):
    (red,) = lienzo("generate", "red apple", "--seed", "1")
    image = Image.open(red)
    assert image.size == (256, 256)
    info = parse_infotext(read_parameters(red))
    assert info.model == "lienzo-mini" and info.params["Steps"] == "20"
    r, g, b = _colour(red)
    assert r > g + 60 and r > b + 60
    # The words steer it: the same seed with "green" is far greener (the shipped model: g - r = -135 red, -7 green).
    (green,) = lienzo("generate", "green apple", "--seed", "1")
    assert _greenness(green) > _greenness(red) + 60


def _greenness(path: str) -> float:
    r, g, _ = _colour(path)
    return g - r


def test_img2img_inpaint_and_outpaint_default_to_lienzo_mini(lienzo, tmp_path):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (128, 128), "white").save(picture)
    mask = tmp_path / "mask.png"
    Image.new("L", (128, 128), 255).save(mask)
    made = lienzo("img2img", str(picture), "red apple", "--steps", "4")
    made += lienzo("inpaint", str(picture), str(mask), "red apple", "--steps", "4")
    made += lienzo("outpaint", str(picture), "red apple", "--steps", "4", "--right", "64")
    assert [parse_infotext(read_parameters(p)).model for p in made] == ["lienzo-mini"] * 3
    assert Image.open(made[2]).size == (192, 128)
