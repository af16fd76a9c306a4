"""The command line on SD 3.x and Flux.1: tiny models as diffusers folders in a models dir, named by --model.

The flow models' options (--distilled-cfg, --shift) come from the field table like every other; a
picture remakes exactly from its parameters (--from), and ``lienzo info`` shows what made it.
"""

import numpy as np
import pytest
from PIL import Image

from lienzo.images.metadata import parse_infotext, read_parameters
from tiny_models import save_transformer_models

SMALL = ("--steps", "2", "-W", "64", "-H", "64")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir with a tiny Flux.1 dev, a Flux.1 schnell and an SD 3.x, as diffusers folders."""
    root = tmp_path_factory.mktemp("transformer-cli")
    save_transformer_models(root / "models")
    return root


def _path(result) -> str:
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    return path


def _params(path: str) -> dict:
    return parse_infotext(read_parameters(path)).params


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_flow_options_come_from_the_field_table(lienzo):
    for command in ("generate", "img2img", "inpaint", "outpaint"):
        text = lienzo(command, "--help").stdout
        assert "--distilled-cfg" in text and "--shift" in text, command
        assert "Forge's Distilled CFG Scale" in text


@pytest.mark.parametrize(
    ("model", "flags", "expected"),
    [
        # Flux.1 dev: its own guidance, no negative pass at the default CFG scale 1, the shift from the size.
        ("tiny-flux", ("--distilled-cfg", "2.5"), {"Distilled CFG Scale": "2.5", "CFG scale": "1", "Sampler": "Euler"}),
        # SD 3.x: real CFG with a negative prompt and a fixed shift.
        ("tiny-sd3", ("--shift", "2", "-n", "blurry"), {"Shift": "2", "CFG scale": "5", "Sampler": "Euler"}),
    ],
)
def test_generate_then_remake_from_the_png_exactly(lienzo, model, flags, expected):
    first = _path(lienzo("generate", "a red apple", "--model", model, *SMALL, "--seed", "3", *flags))
    params = _params(first)
    assert {k: params.get(k) for k in expected} == expected
    assert params["Model"] == model and params["Steps"] == "2"
    again = _path(lienzo("generate", "--from", first))
    assert again != first
    assert _params(again) == params
    assert np.array_equal(_pixels(again), _pixels(first))


def test_family_defaults_fill_what_the_command_leaves_open(lienzo):
    # schnell: 4 steps, CFG scale 1 and no distilled guidance (it has no such input).
    params = _params(_path(lienzo("generate", "a pear", "--model", "tiny-schnell", "-W", "64", "-H", "64", "--seed", "1")))
    assert (params["Steps"], params["CFG scale"], params["Sampler"]) == ("4", "1", "Euler")
    assert "Distilled CFG Scale" not in params


def test_image_modes_on_flux(lienzo, tmp_path):
    source = tmp_path / "source.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    square.save(mask)
    steps = ("--model", "tiny-flux", "--steps", "2", "--seed", "5")

    repainted = _path(lienzo("img2img", str(source), "a red apple", *steps, "--strength", "0.5"))
    assert Image.open(repainted).size == (64, 64)
    assert _params(repainted)["Denoising strength"] == "0.5"

    inpainted = _path(lienzo("inpaint", str(source), str(mask), "a red apple", *steps, "--mask-blur", "0"))
    kept, before = _pixels(inpainted), _pixels(str(source))
    assert np.array_equal(kept[:8], before[:8])  # far from the mask: untouched
    assert not np.array_equal(kept[24:40, 24:40], before[24:40, 24:40])

    grown = _path(lienzo("outpaint", str(source), "a red apple", *steps, "--right", "16"))
    assert Image.open(grown).size == (80, 64)


def test_info_shows_the_family_and_the_flow_parameters(lienzo):
    path = _path(lienzo("generate", "a plum", "--model", "tiny-flux", *SMALL, "--seed", "9", "--distilled-cfg", "4", "--shift", "1.5"))
    out = lienzo("info", path).stdout
    assert "Distilled CFG Scale: 4" in out and "Shift: 1.5" in out and "CFG scale: 1" in out
    assert "(flux)" in out  # the provenance record names the model's family
