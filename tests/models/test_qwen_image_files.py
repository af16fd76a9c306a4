"""Qwen-Image from the files people download: the transformer in its original names (diffusers', with or without
ComfyUI's prefix) in fp32, bf16, fp8, scaled fp8 and GGUF, what ``lienzo models`` lists for it, and its LoRAs in
diffusers/peft, ComfyUI and kohya names.

The exactness bar is test_transformer_files' own (see its FORMAT_BOUNDS and GGUF_DECODE). The tiny Qwen-Image of
tests/tiny_models.py splits its rotary axes unlike the real one (which no tensor states), so the network here is
a small one laid out like the real model (heads of 32 split 4, 14, 14 as 128 splits 16, 56, 56).
"""

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear
from test_transformer_files import (
    EXACT,
    FORMAT_BOUNDS,
    GGUF_DECODE,
    GGUF_QUANTS,
    encode,
    max_diff,
    relative_diff,
    rounded,
    write_gguf,
    write_safetensors,
)
from test_transformer_lora import SD1_NAMES, Layer, _probe, _write, refused_in_one_line
from tiny_models import build_tiny

from lienzo.errors import ModelFileError
from lienzo.models.lora import apply_loras
from lienzo.models.transformer_files import detect_transformer_family, load_transformer_file, transformer_config

PREFIX = "model.diffusion_model."
CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 14, 14),
)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**CONFIG).eval()


@torch.no_grad()
def qwen_output(network: torch.nn.Module) -> torch.Tensor:
    """One call on fixed noise: a 4x4 grid of packed latents, 8 text tokens."""
    generator = torch.Generator().manual_seed(0)
    config = network.config
    return network(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long),
        timestep=torch.tensor([0.7]), img_shapes=[[(1, 4, 4)]], return_dict=False,
    )[0]


def network_file(tmp_path, network, layout: str, names: str):
    reference = rounded(network, layout)
    tensors = reference.state_dict()
    if names == "comfyui":
        tensors = {PREFIX + key: t for key, t in tensors.items()}
    if layout in GGUF_QUANTS:
        return write_gguf(tmp_path / f"qwen-image-{layout}.gguf", tensors, GGUF_QUANTS[layout], "qwen_image"), reference
    return write_safetensors(tmp_path / f"qwen_image_{names}_{layout}.safetensors", encode(tensors, layout)), reference


@pytest.mark.parametrize("names", ["diffusers", "comfyui"])
def test_qwen_image_is_detected_and_its_config_read_from_shapes(network, names):
    tensors = network.state_dict()
    shapes = {(PREFIX if names == "comfyui" else "") + key: tuple(t.shape) for key, t in tensors.items()}
    assert detect_transformer_family(shapes) == "qwenimage"
    assert transformer_config("qwenimage", shapes) == CONFIG


def test_the_real_qwen_image_config_comes_out_right():
    real = dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    )
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in QwenImageTransformer2DModel(**real).state_dict().items()}
    assert transformer_config("qwenimage", shapes) == real


def test_other_families_are_not_taken_for_qwen_image():
    for family in ("flux", "flux2", "zimage", "sd3"):
        shapes = {key: tuple(t.shape) for key, t in build_tiny(family).transformer.state_dict().items()}
        assert detect_transformer_family(shapes) == family


@pytest.mark.parametrize(
    "layout, names",
    [("fp32", "diffusers"), ("bf16", "comfyui"), ("fp8", "diffusers"), ("scaled-fp8", "comfyui"), ("gguf-q8_0", "comfyui"),
     ("gguf-q4_0", "diffusers")],
)
def test_qwen_image_files_load_and_run_like_the_model_they_hold(tmp_path, network, layout, names):
    path, reference = network_file(tmp_path, network, layout, names)
    family, loaded = load_transformer_file(path)
    assert family == "qwenimage" and isinstance(loaded, QwenImageTransformer2DModel)
    got = qwen_output(loaded)
    if layout in GGUF_QUANTS:
        assert relative_diff(got, qwen_output(reference)) <= GGUF_DECODE
        to_q = loaded.transformer_blocks[0].attn.to_q
        assert isinstance(to_q, GGUFLinear) and to_q.weight.dtype == torch.uint8  # kept quantized
    else:
        assert max_diff(got, qwen_output(reference)) <= EXACT
    assert max_diff(got, qwen_output(network)) <= FORMAT_BOUNDS[layout]


def test_lienzo_models_lists_qwen_image_files(tmp_path, network):
    from lienzo.models.registry import Registry

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    network_file(models / "diffusion_models", network, "fp8", "comfyui")
    network_file(models / "diffusion_models", network, "gguf-q8_0", "comfyui")
    entries = {e.name: e for e in Registry(models, tmp_path / "cache").scan()}
    fp8 = entries["diffusion_models/qwen_image_comfyui_fp8"]
    assert (fp8.architecture, fp8.quantization, fp8.is_checkpoint) == ("Qwen-Image", "fp8", True)
    assert fp8.size_bytes == (models / "diffusion_models" / "qwen_image_comfyui_fp8.safetensors").stat().st_size
    gguf = entries["diffusion_models/qwen-image-gguf-q8_0"]
    assert (gguf.architecture, gguf.quantization) == ("Qwen-Image", "GGUF Q8_0")


# --- LoRAs ----------------------------------------------------------------------------------------


BLOCK = "transformer_blocks.0"
LORA_FORMATS = {
    "diffusers": ("peft", [
        Layer(f"transformer.{BLOCK}.attn.to_q", "transformer", (f"{BLOCK}.attn.to_q",), 4),
        Layer(f"transformer.{BLOCK}.img_mlp.net.0.proj", "transformer", (f"{BLOCK}.img_mlp.net.0.proj",), 2, 4.0),
    ]),
    # ComfyUI / ai-toolkit: the same names under diffusion_model., with an alpha.
    "comfyui": ("peft", [
        Layer(f"diffusion_model.{BLOCK}.attn.add_k_proj", "transformer", (f"{BLOCK}.attn.add_k_proj",), 4, 2.0),
        Layer(f"diffusion_model.{BLOCK}.txt_mlp.net.2", "transformer", (f"{BLOCK}.txt_mlp.net.2",), 2),
    ]),
    # kohya: underscores, lora_down/lora_up, an alpha per module.
    "kohya": ("kohya", [
        Layer("lora_unet_transformer_blocks_0_attn_to_k", "transformer", (f"{BLOCK}.attn.to_k",), 4, 8.0),
        Layer("lora_unet_transformer_blocks_1_img_mod_1", "transformer", ("transformer_blocks.1.img_mod.1",), 2, 1.0),
    ]),
}


def _prediction(components) -> torch.Tensor:
    return qwen_output(components.transformer).flatten()


@pytest.mark.parametrize("fmt", list(LORA_FORMATS))
def test_qwen_image_loras_add_weight_times_alpha_over_rank_times_b_a(tmp_path, fmt):
    naming, layers = LORA_FORMATS[fmt]
    components = build_tiny("qwenimage")
    path = tmp_path / f"{fmt}.safetensors"
    expected = _write(path, components, layers, naming)
    probes = _probe(components, expected)
    original = _prediction(components)
    apply_loras(components, [(path, "style", 0.5)])
    for key, (down, up, scale) in expected.items():
        x, base_weight, bias = probes[key]
        with torch.no_grad():
            got = components.transformer.get_submodule(key[1])(x)
        by_hand = torch.nn.functional.linear(x, base_weight + 0.5 * scale * up @ down, bias)
        torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    assert (_prediction(components) - original).abs().max() > 1e-5
    apply_loras(components, [])
    assert torch.equal(_prediction(components), original)


@pytest.mark.parametrize(
    ("family", "names", "theirs", "ours"),
    [
        ("qwenimage", SD1_NAMES, "SD 1.x, 2.x or XL", "Qwen-Image"),
        ("qwenimage", ["diffusion_model.double_blocks.0.img_attn.qkv"], "Flux.1", "Qwen-Image"),
        ("flux", [f"transformer.{BLOCK}.img_mlp.net.0.proj"], "Qwen-Image", "Flux.1"),
        ("flux2", ["lora_unet_transformer_blocks_0_txt_mod_1"], "Qwen-Image", "Flux.2 Klein"),
    ],
    ids=["sd1-on-qwen", "flux-on-qwen", "qwen-on-flux", "qwen-on-flux2"],
)
def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path, family, names, theirs, ours):
    refused_in_one_line(tmp_path, family, names, theirs, ours)


# --- assembled ------------------------------------------------------------------------------------


def test_a_qwen_image_file_with_its_folders_parts_draws_what_the_folder_draws(tmp_path, network):
    """ComfyUI's transformer file completed with a Qwen-Image diffusers folder's text_encoder/ (its tokenizer/ beside)
    and vae/: the same pixels as the folder. A Qwen2.5-VL single file of a width whose unstated config lienzo does not
    know is refused in one line (the split files themselves: test_qwen_image_split_files)."""
    import numpy as np
    from safetensors.torch import save_file

    from lienzo.generation.engine import generate
    from lienzo.generation.request import GenerationRequest
    from lienzo.models.loading import load_components
    from tiny_models import save_diffusers_folder

    components = build_tiny("qwenimage")
    components.transformer = network
    folder = save_diffusers_folder(components, tmp_path / "qwen-image")
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    transformer, _ = network_file(models / "diffusion_models", network, "fp32", "comfyui")
    assembled = load_components(transformer, text_encoders=[folder / "text_encoder"], vae=folder / "vae")
    assert assembled.family == "qwenimage" and type(assembled.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    request = GenerationRequest(prompt="a red apple", width=64, height=64, steps=2, seed=1, sampler="Euler", schedule="Simple")
    assert np.array_equal(generate(assembled, request).images[0].pixels, generate(load_components(folder), request).images[0].pixels)

    encoder_file = models / "text_encoders" / "qwen_2.5_vl_7b.safetensors"
    encoder_file.parent.mkdir()
    save_file({key: t.contiguous() for key, t in components.text_encoder.state_dict().items()}, encoder_file)
    with pytest.raises(ModelFileError) as err:
        load_components(transformer, text_encoders=[folder / "tokenizer"], vae=folder / "vae")
    message = str(err.value)
    assert message == (
        "qwen_2.5_vl_7b.safetensors is a Qwen2.5-VL 32 wide; lienzo knows the config of Qwen-Image's (3584 wide, Qwen2.5-VL 7B)"
    )
    assert "\n" not in message
