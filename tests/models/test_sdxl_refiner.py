"""SDXL's refiner as a family: its single file (SGM names: the U-Net, bigG as the only text embedder, the VAE) and
its diffusers folder (StableDiffusionXLImg2ImgPipeline's, no text_encoder) load to the same parts, the registry
names it, and img2img on it is diffusers' StableDiffusionXLImg2ImgPipeline's, aesthetic scores included."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from tiny_models import build_tiny, save_diffusers_folder

from lienzo.cli import app
from lienzo.generation import engine
from lienzo.generation.prompts import encode_prompt
from lienzo.generation.request import build_request
from lienzo.models.formats import detect_architecture, read_header
from lienzo.models.loading import load_components
from lienzo.models.registry import describe
from lienzo.models.single_file_save import save_single_file

MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def built():
    return build_tiny("sdxl_refiner")


@pytest.fixture(scope="module")
def models(built, tmp_path_factory):
    """A models folder with the tiny refiner as one file and as a diffusers folder."""
    root = tmp_path_factory.mktemp("refiner-models")
    save_single_file(built, root / "sd_xl_refiner_1.0.safetensors")
    save_diffusers_folder(built, root / "stable-diffusion-xl-refiner-1.0")
    return root


@pytest.fixture(scope="module")
def from_file(models):
    return load_components(models / "sd_xl_refiner_1.0.safetensors")


@pytest.fixture(scope="module")
def from_folder(models):
    return load_components(models / "stable-diffusion-xl-refiner-1.0")


def _init_image(size=64) -> Image.Image:
    x = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1))


def test_the_single_file_has_the_refiners_key_names(models):
    shapes = {key: shape for key, (shape, _) in read_header(models / "sd_xl_refiner_1.0.safetensors").items()}
    prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in shapes}
    assert prefixes == {"model.diffusion_model", "conditioner.embedders", "first_stage_model.encoder", "first_stage_model.decoder",
                        "first_stage_model.quant_conv", "first_stage_model.post_quant_conv"}
    assert not any(key.startswith("conditioner.embedders.1.") for key in shapes)
    # OpenCLIP's names, with q, k and v fused as nn.MultiheadAttention keeps them
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in shapes
    assert shapes["conditioner.embedders.0.model.text_projection"] == (64, 32)
    arch = detect_architecture(shapes)
    assert (arch.family, arch.label, arch.context_dim, arch.inpainting) == ("sdxl_refiner", "SDXL refiner", 64, False)


def test_single_file_and_diffusers_folder_load_the_same_parts(built, from_file, from_folder, models):
    index = json.loads((models / "stable-diffusion-xl-refiner-1.0" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    for loaded in (from_file, from_folder):
        assert loaded.family == "sdxl_refiner" and loaded.spec.label == "SDXL refiner"
        assert type(loaded.text_encoder).__name__ == "CLIPTextModelWithProjection" and loaded.text_encoder_2 is None
        assert loaded.tokenizer.pad_token == "!"  # OpenCLIP pads with token 0
        assert loaded.prediction_type == "epsilon" and loaded.vae.config.scaling_factor == 0.13025
        unet = loaded.unet.config
        assert (unet.addition_embed_type, unet.projection_class_embeddings_input_dim, unet.cross_attention_dim) == ("text_time", 32 + 5 * 256, 64)
        assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
        for attr in MODULES:
            want, got = getattr(built, attr).state_dict(), getattr(loaded, attr).state_dict()
            assert want.keys() == got.keys(), attr
            assert all(torch.equal(want[key], got[key]) for key in want), attr


def test_a_folder_whose_index_says_text_encoder_null_loads_as_the_refiner(built, models, tmp_path):
    folder = save_diffusers_folder(built, tmp_path / "refiner")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": None, "tokenizer": None}))
    loaded = load_components(folder)
    assert loaded.family == "sdxl_refiner"
    assert torch.equal(loaded.text_encoder.text_projection.weight, built.text_encoder.text_projection.weight)
    assert describe(folder) == "SDXL refiner (diffusers)"


# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json, and its text_encoder_2's (OpenCLIP bigG).
_REFINER_UNET = dict(
    sample_size=128,
    cross_attention_dim=1280,
    attention_head_dim=[6, 12, 24, 24],
    block_out_channels=[384, 768, 1536, 1536],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    # The published config says 4: the same layers, as the first level has no attention to give them.
    transformer_layers_per_block=[1, 4, 4, 4],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)


def test_the_full_size_refiner_layout_infers_the_published_config():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lienzo.models import single_file_load, single_file_save

    with init_empty_weights():
        unet = UNet2DConditionModel(**_REFINER_UNET)
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_BIG_G, num_attention_heads=20))
    prefix = "conditioner.embedders.0.model."
    ldm = single_file_save._with_prefix("model.diffusion_model.", single_file_save._unet_to_ldm(unet))
    ldm.update(single_file_save._with_prefix(prefix, single_file_save._open_clip_to_ldm(encoder)))
    ldm[prefix + "logit_scale"] = torch.empty((), device="meta")  # OpenCLIP's, which real files carry
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.empty(128, 3, 3, 3, device="meta")
    shapes = {key: tuple(tensor.shape) for key, tensor in ldm.items()}
    assert (detect_architecture(shapes).family, detect_architecture(shapes).context_dim) == ("sdxl_refiner", 1280)

    loaded = single_file_load._load_unet(ldm, "sdxl_refiner", "full", torch.float16)
    for key, value in _REFINER_UNET.items():
        got = loaded.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    (slot,) = single_file_load._TEXT_ENCODERS["sdxl_refiner"]
    text_config = single_file_load._load_text_encoder(ldm, slot, "full", torch.float16).config
    assert {key: getattr(text_config, key) for key in _BIG_G} == _BIG_G and text_config.num_attention_heads == 20


def test_registry_and_lienzo_models_name_it_an_sdxl_refiner(models, tmp_path):
    assert describe(models / "sd_xl_refiner_1.0.safetensors") == "SDXL refiner"
    assert describe(models / "stable-diffusion-xl-refiner-1.0") == "SDXL refiner (diffusers)"
    args = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out"), "models"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"}, catch_exceptions=False)  # one line per model
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("sd_xl_refiner_1.0" in line and "SDXL refiner" in line for line in lines), result.stdout
    assert any("stable-diffusion-xl-refiner-1.0" in line and "SDXL refiner (diffusers)" in line for line in lines), result.stdout


def test_the_prompt_is_read_by_bigG_alone_at_its_penultimate_layer(from_file):
    embeddings = encode_prompt(from_file, "a fox")
    ids = torch.tensor([from_file.tokenizer("a fox", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        output = from_file.text_encoder(ids, output_hidden_states=True)
    assert embeddings.embeds.shape == (1, 77, 64) and embeddings.pooled.shape == (1, 32)
    assert torch.equal(embeddings.embeds, output.hidden_states[-2])
    assert torch.equal(embeddings.pooled, output.text_embeds)


@pytest.mark.parametrize(("scheduler", "sampler"), [(EulerDiscreteScheduler, "Euler"), (DDIMScheduler, "DDIM")])
def test_img2img_matches_diffusers_refiner_pipeline(from_file, scheduler, sampler):
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=from_file.vae, text_encoder=None, tokenizer=None, text_encoder_2=from_file.text_encoder, tokenizer_2=from_file.tokenizer,
        unet=from_file.unet, scheduler=scheduler.from_config(from_file.scheduler_config), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    init = _init_image()
    # diffusers' defaults are the scores lienzo conditions on: aesthetic_score 6, negative_aesthetic_score 2.5
    ref = pipe(
        "a fox", negative_prompt="blurry", image=init, strength=0.5, num_inference_steps=6, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7), output_type="np",
    ).images[0]
    ours = engine.generate(from_file, build_request(
        prompt="a fox", negative_prompt="blurry", init_image=init, denoising_strength=0.5, steps=6, cfg_scale=5.0, sampler=sampler,
        schedule="DDIM", seed=7,
    ))
    assert ours.images[0].pixels.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.images[0].pixels - ref).max() <= 1e-4


def test_txt2img_on_the_refiner_runs(from_folder):
    result = engine.generate(from_folder, build_request(prompt="a fox", negative_prompt="blurry", steps=2, width=64, height=64, seed=3))
    pixels = result.images[0].pixels
    assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all() and pixels.std() > 0
