"""Qwen-Image-Edit (2509 / 2511) through lienzo's one loop: the same pictures as ``QwenImageEditPlusPipeline(image=[...])``.

A tiny random model (tests/tiny_models.py) saved as a diffusers folder and loaded back through lienzo's loader; each
picture is compared, before 8-bit rounding, with what the pipeline makes from the same components, scheduler and
seed. The input images are the request's ``reference_images``: read by Qwen2.5-VL with every prompt, the negative
one too, and VAE-encoded after the noisy latents. The pipeline reads them at about a megapixel (VAE_IMAGE_SIZE),
which the tiny model would take minutes over: both sides read that size from the pipeline's module, patched here.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.engine import family_defaults, generate
from lienzo.generation.fields import check_references, image_hash
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.generation.latents import reference_size
from lienzo.images.metadata import parse_infotext, pnginfo, read_parameters
from lienzo.models.components import PromptCache
from lienzo.models.loading import load_components
from tiny_models import build_tiny, qwen_vl_processor, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "make the apple blue"
NEGATIVE = "blurry, dark colours"
# The input images VAE-encoded at about 96 x 96 pixels where the pipeline's are about 1024 x 1024: the square one at
# 96 x 96, the 3:2 one at 128 x 64 (sides multiples of 32). Qwen2.5-VL reads them at the pipeline's own size.
VAE_AREA = 96 * 96


def _picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [_picture(1, 80, 80), _picture(2, 150, 100)]


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    """The tiny Qwen-Image-Edit saved as a diffusers folder and loaded back through lienzo's loader."""
    folder = tmp_path_factory.mktemp("qwen-edit") / "tiny-qwenimage-edit"
    return load_components(save_diffusers_folder(build_tiny("qwenimage_edit"), folder))


@pytest.fixture(autouse=True)
def small_references(monkeypatch):
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)


def _pipe(components) -> QwenImageEditPlusPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    pipe = QwenImageEditPlusPipeline(
        transformer=components.transformer, vae=components.vae, scheduler=scheduler,
        text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        processor=qwen_vl_processor(components.tokenizer, components.image_processor),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(components, images, cfg: float, *, seed: int = 42) -> np.ndarray:
    return _pipe(components)(
        image=images, prompt=PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg,
        height=SIZE, width=SIZE, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]


def _request(**fields) -> GenerationRequest:
    fields = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIZE, "height": SIZE, "seed": 42, "steps": 3, **fields}
    return GenerationRequest(sampler="Euler", schedule="Simple", **fields)


def test_the_folder_loads_with_its_processor(edit):
    """Qwen-Image's parts, and processor/'s image processor for the input images Qwen2.5-VL reads."""
    assert edit.family == "qwenimage_edit" and edit.spec.reference_images and edit.spec.prompt_images
    assert type(edit.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(edit.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(edit.image_processor).__name__.startswith("Qwen2VLImageProcessor")


# CFG 1: no negative pass; above it true CFG with the negative prompt, which reads the images too, rescaled to the
# conditional prediction's norm. Two images of different shapes: each with its own img_shapes entry.
@pytest.mark.parametrize(("count", "cfg"), [(1, 1.0), (2, 1.0), (1, 4.0), (2, 4.0)])
def test_edits_match_diffusers(edit, count, cfg):
    images = IMAGES[:count]
    expected = _diffusers(edit, images, cfg)
    got = generate(edit, _request(reference_images=images, cfg_scale=cfg)).images[0].pixels
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_the_2511_network_matches_diffusers(edit, monkeypatch):
    """Qwen-Image-Edit-2511's network (zero_cond_t: the input images' tokens modulated as at timestep 0, which it tells
    from the noisy latents' by img_shapes), guided, with two images."""
    request = _request(reference_images=IMAGES, cfg_scale=4.0)
    network = QwenImageTransformer2DModel.from_config({**edit.transformer.config, "zero_cond_t": True})
    network.load_state_dict(edit.transformer.state_dict())
    plus = generate(edit, request).images[0].pixels  # the same weights without it (2509's network)
    monkeypatch.setattr(edit, "transformer", network.eval())
    expected = _diffusers(edit, IMAGES, 4.0)
    got = generate(edit, request).images[0].pixels
    assert np.abs(got - expected).max() <= TOLERANCE and np.abs(got - plus).max() > 0


def test_every_image_of_a_batch_reads_the_images(edit):
    """Two pictures in one batch, guided (where the pipeline makes one at a time): each is the pipeline's for its own
    seed (seed + i), the images' latents after every row's, conditional and unconditional."""
    got = generate(edit, _request(reference_images=IMAGES, batch_size=2, cfg_scale=4.0)).images
    for i, image in enumerate(got):
        assert np.abs(image.pixels - _diffusers(edit, IMAGES, 4.0, seed=42 + i)).max() <= TOLERANCE


def test_weighted_prompts_and_the_images_change_the_picture(edit):
    """An emphasised word, another image, the images in another order: each a different picture."""
    request = _request(reference_images=IMAGES, cfg_scale=1.0)
    plain = generate(edit, request).images[0].pixels
    for change in ({"prompt": "make the (apple:1.5) blue"}, {"reference_images": IMAGES[::-1]}, {"reference_images": IMAGES[:1]}):
        assert np.abs(generate(edit, request.model_copy(update=change)).images[0].pixels - plain).max() > 0


def test_the_prompt_cache_keys_by_the_images(edit, monkeypatch):
    """The same texts read with other images are encoded again, not taken from the model's prompt cache; with the same
    images they are the cache's (the encoder not called). Guided, each job encodes its prompt and its negative prompt."""
    monkeypatch.setattr(edit, "prompt_cache", PromptCache(max_bytes=1 << 30))
    calls = []
    forward = type(edit.text_encoder).forward
    monkeypatch.setattr(edit.text_encoder, "forward", lambda *a, **k: calls.append(1) or forward(edit.text_encoder, *a, **k))
    request = _request(reference_images=IMAGES[:1], cfg_scale=4.0)
    first = generate(edit, request).images[0].pixels
    assert len(calls) == 2
    other = generate(edit, request.model_copy(update={"reference_images": IMAGES[1:]})).images[0].pixels
    assert len(calls) == 4
    again = generate(edit, request).images[0].pixels
    assert len(calls) == 4 and len(edit.prompt_cache.entries) == 4
    assert np.array_equal(first, again) and np.abs(first - other).max() > 0


def test_defaults_are_the_pipelines(edit):
    """No size, steps or CFG: QwenImageEditPlusPipeline's, the size about a megapixel of its last image's shape
    (sides multiples of 32: 1248 x 832 for 3:2; 1024 x 1024 for a square), 50 steps, true CFG 4, Euler."""
    assert reference_size(edit, IMAGES) == (1248, 832) and reference_size(edit, IMAGES[::-1]) == (1024, 1024)
    request = family_defaults(edit, GenerationRequest(prompt=PROMPT, reference_images=IMAGES))
    assert (request.steps, request.cfg_scale, request.sampler) == (50, 4.0, "Euler")


def test_without_images_it_names_the_field(edit):
    """The pipeline has nothing to edit without an image (it fails reading its size); lienzo says which field."""
    with pytest.raises(AttributeError):
        _pipe(edit)(image=None, prompt=PROMPT, num_inference_steps=2, output_type="np")
    with pytest.raises(InvalidRequestError, match="reference_images: Qwen-Image-Edit edits the images it is given"):
        generate(edit, _request())


def test_the_infotext_remakes_the_picture_with_the_images_again(edit, tmp_path):
    request = _request(prompt="make the (apple:1.2) blue", reference_images=IMAGES, cfg_scale=3.0, seed=9)
    made = generate(edit, request).images[0]
    path = tmp_path / "made.png"
    made.image.save(path, pnginfo=pnginfo(made.infotext))
    fields = fields_from_infotext(parse_infotext(read_parameters(path)))
    recorded = fields.pop("reference_images")
    assert fields["cfg_scale"] == 3.0 and fields["steps"] == 3 and recorded == tuple(map(image_hash, IMAGES))
    check_references(recorded, IMAGES)
    with pytest.raises(InvalidRequestError, match="^reference_images: the reference images given"):
        check_references(recorded, IMAGES[::-1])
    remade = generate(edit, build_request(**{k: v for k, v in fields.items() if k != "model"}, reference_images=IMAGES)).images[0]
    assert np.array_equal(remade.pixels, made.pixels) and remade.infotext == made.infotext


def test_qwen_image_loras_fit_it(tmp_path):
    """A LoRA in Qwen-Image's names (Qwen-Image-Edit's are the same network's) changes its layer, and goes again."""
    from safetensors.torch import save_file

    from lienzo.models.lora import apply_loras

    components = build_tiny("qwenimage_edit")
    layer = components.transformer.get_submodule("transformer_blocks.0.img_mlp.net.0.proj")
    generator = torch.Generator().manual_seed(3)
    save_file({
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": torch.randn(4, layer.in_features, generator=generator),
        "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight": torch.randn(layer.out_features, 4, generator=generator),
    }, tmp_path / "edit-style.safetensors")
    x = torch.randn(2, layer.in_features, generator=generator)

    def output() -> torch.Tensor:
        with torch.no_grad():
            return components.transformer.get_submodule("transformer_blocks.0.img_mlp.net.0.proj")(x)

    plain = output()
    apply_loras(components, [(tmp_path / "edit-style.safetensors", "edit-style", 1.0)])
    assert (output() - plain).abs().max() > 0.1
    apply_loras(components, [])
    assert torch.equal(output(), plain)


def test_the_models_dir_lists_it_as_qwen_image_edit(tmp_path):
    from lienzo.models.registry import Registry

    save_diffusers_folder(build_tiny("qwenimage_edit"), tmp_path / "models" / "tiny-edit")
    entries = Registry(tmp_path / "models", tmp_path / "cache").checkpoints()
    assert ("tiny-edit", "Qwen-Image-Edit (diffusers)") in [(e.name, e.architecture) for e in entries]
