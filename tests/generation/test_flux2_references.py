"""Flux.2 Klein's reference images (its editing) through lienzo's one loop: the same pictures as
``Flux2KleinPipeline(image=[...])``, refused by families that read none, recorded in the infotext.

The tiny Klein of tests/tiny_models.py, saved as a diffusers folder and loaded back through lienzo's loader;
pictures are compared in fp32, before 8-bit rounding.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image

from lienzo.errors import InvalidRequestError, LienzoError
from lienzo.generation.engine import generate
from lienzo.generation.fields import REFERENCES, check_references, image_hash
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import MAX_REFERENCE_IMAGES, GenerationRequest, build_request
from lienzo.images.metadata import parse_infotext
from lienzo.models.loading import load_components
from tiny_models import build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "make the apple blue"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return load_components(save_diffusers_folder(build_tiny("flux2"), tmp_path_factory.mktemp("flux2") / "tiny-flux2"))


def _picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# The second reference is of another shape, its sides not multiples of a latent patch: cropped as diffusers crops it.
REFERENCES_USED = [_picture(1, 64, 64), _picture(2, 100, 70)]


def _request(**fields) -> GenerationRequest:
    fields = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "seed": 42, "steps": 3, "cfg_scale": 1.0, **fields}
    return GenerationRequest(sampler="Euler", schedule="Simple", **fields)


def _diffusers(klein, images, cfg: float, seed: int = 42, size: int | None = SIZE) -> np.ndarray:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(klein.scheduler_config)
    pipe = Flux2KleinPipeline(
        transformer=klein.transformer, vae=klein.vae, scheduler=scheduler, text_encoder=klein.text_encoder, tokenizer=klein.tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=PROMPT, image=images, height=size, width=size, num_inference_steps=3, guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]


@pytest.mark.parametrize(("count", "cfg"), [(1, 1.0), (2, 1.0), (2, 4.0)])
def test_references_match_diffusers(klein, count, cfg):
    """Each reference fitted, encoded to its mode, patched, normalized and packed after the noisy latents with
    time ids 10, 20, ...; the prediction sliced back; with CFG both passes read them."""
    images = REFERENCES_USED[:count]
    expected = _diffusers(klein, images, cfg)
    got = generate(klein, _request(reference_images=images, cfg_scale=cfg)).images[0].pixels
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_every_image_of_a_batch_reads_the_references(klein):
    """Two images in one batch, guided: each is diffusers' picture for its own seed (seed + i), the references
    repeated for every row, conditional and unconditional."""
    got = generate(klein, _request(reference_images=REFERENCES_USED, batch_size=2, cfg_scale=4.0)).images
    for i, image in enumerate(got):
        assert np.abs(image.pixels - _diffusers(klein, REFERENCES_USED, 4.0, seed=42 + i)).max() <= TOLERANCE


def test_a_reference_changes_the_picture_and_its_order_matters(klein):
    plain = generate(klein, _request()).images[0].pixels
    one = generate(klein, _request(reference_images=REFERENCES_USED[:1])).images[0].pixels
    swapped = generate(klein, _request(reference_images=REFERENCES_USED[::-1])).images[0].pixels
    both = generate(klein, _request(reference_images=REFERENCES_USED)).images[0].pixels
    assert np.abs(one - plain).max() > 1e-3
    # Their time ids tell the references apart (10 for the first, 20 for the second); a tiny model barely.
    assert np.abs(swapped - both).max() > 5e-5


def test_prompt_editing_reads_them_at_every_step(klein):
    """A prompt that changes at step 2 (a call of the network per stretch of steps) runs with the references."""
    request = _request(prompt="[a red apple:a green pear:2]")
    plain = generate(klein, request).images[0].pixels
    edited = generate(klein, request.model_copy(update={"reference_images": REFERENCES_USED})).images[0].pixels
    assert np.abs(edited - plain).max() > 1e-3


def test_without_a_size_the_picture_takes_the_first_references(klein):
    """Flux2KleinPipeline's default: the first reference's size once fitted, cropped to whole latent patches
    (100x70 to 100x68 here, whose VAE has a factor of 2: patches of 4 pixels)."""
    request = _request(reference_images=REFERENCES_USED[::-1]).model_copy(update={"width": None, "height": None})
    got = generate(klein, request).images[0].pixels
    expected = _diffusers(klein, REFERENCES_USED[::-1], 1.0, size=None)
    assert got.shape == expected.shape == (68, 100, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_img2img_reads_them_too(klein):
    request = _request(init_image=_picture(3, SIZE, SIZE), denoising_strength=0.6)
    plain = generate(klein, request).images[0].pixels
    edited = generate(klein, request.model_copy(update={"reference_images": REFERENCES_USED[:1]})).images[0].pixels
    assert np.abs(edited - plain).max() > 1e-3


def test_a_family_without_reference_input_refuses_them(tmp_path):
    components = load_components(save_diffusers_folder(build_tiny("flux"), tmp_path / "tiny-flux"))
    with pytest.raises(InvalidRequestError, match="^reference_images: Flux.1 models take no reference images") as err:
        generate(components, _request(reference_images=REFERENCES_USED[:1]))
    assert err.value.field == "reference_images" and "Flux.2 Klein" in str(err.value)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([_picture(0, 64, 64)] * (MAX_REFERENCE_IMAGES + 1), f"at most {MAX_REFERENCE_IMAGES} reference images"),
        ([_picture(0, 64, 63)], "image 1 is 64x63; each side must be at least 64"),
        ([_picture(0, 64, 64), _picture(0, 520, 64)], "image 2 is 520x64; a side may be at most 8 times"),
    ],
)
def test_the_request_refuses_what_diffusers_would(images, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        build_request(prompt="x", reference_images=images)
    assert err.value.field == "reference_images"


def test_inpainting_takes_no_references():
    image = _picture(0, 64, 64)
    with pytest.raises(InvalidRequestError, match="reference_images are for txt2img and img2img, not inpaint"):
        build_request(init_image=image, mask=Image.new("L", (64, 64), 255), reference_images=[image])


def test_the_infotext_records_their_hashes_and_a_remake_checks_them(klein):
    result = generate(klein, _request(reference_images=REFERENCES_USED))
    hashes = [image_hash(image) for image in REFERENCES_USED]
    assert result.images[0].parameters["Reference images"] == f"2: {hashes[0]}, {hashes[1]}"
    fields = fields_from_infotext(parse_infotext(result.images[0].infotext))
    assert fields["reference_images"] == tuple(hashes)
    check_references(fields["reference_images"], REFERENCES_USED)
    with pytest.raises(InvalidRequestError, match="^--reference: the picture was made with 2 reference image"):
        check_references(fields["reference_images"], [], "--reference")
    with pytest.raises(InvalidRequestError, match="^reference_images: the reference images given .* not the 2"):
        check_references(fields["reference_images"], REFERENCES_USED[::-1])
    assert "Reference images" not in generate(klein, _request()).images[0].parameters


def test_the_hash_is_of_the_pixels_not_the_file():
    image = _picture(5, 64, 64)
    assert image_hash(image) == image_hash(image.convert("RGBA")) != image_hash(_picture(6, 64, 64))
    with pytest.raises(LienzoError, match="'Reference images' must be"):
        REFERENCES.read("3: abc")
