"""LoRAs on Flux.2 Klein, in the formats people train and download them in.

As in test_transformer_lora.py: each test writes a small LoRA with random matrices for the tiny Klein in one
format's names, applies it through lienzo's ``apply_loras`` and checks the changed layers against
W + weight * alpha / rank * B @ A worked by hand (a fused qkv's B split by rows), so diffusers' renaming,
splitting and alpha scaling are checked, not only that something changed. LoRAs for other families, Flux.1's
included (whose original block names Flux.2 shares), are refused.
"""

import pytest
import torch

from lienzo.errors import ModelFileError
from lienzo.models.lora import apply_loras
from test_transformer_lora import DOUBLE, SD1_NAMES, Layer, _qkv, _write, adds_and_comes_off, assert_tag_remakes, refused_in_one_line
from test_transformer_lora import FORMATS as FLUX_FORMATS
from test_transformer_lora_2 import ZIMAGE_NAMES
from tiny_models import build_tiny

SINGLE = "single_transformer_blocks.0"
FORMATS = {
    # diffusers/peft: the diffusers modules' own names under transformer., a peft-style alpha on one.
    "diffusers": ("peft", [
        Layer(f"transformer.{DOUBLE}.attn.to_k", "transformer", (f"{DOUBLE}.attn.to_k",), 4),
        Layer(f"transformer.{SINGLE}.attn.to_qkv_mlp_proj", "transformer", (f"{SINGLE}.attn.to_qkv_mlp_proj",), 2, 4.0),
        Layer(f"transformer.{DOUBLE}.ff.linear_in", "transformer", (f"{DOUBLE}.ff.linear_in",), 4),
    ]),
    # ComfyUI / ai-toolkit: BFL's names under diffusion_model., peft's matrix names.
    "comfyui": ("peft", [
        Layer("diffusion_model.double_blocks.0.img_attn.qkv", "transformer", _qkv(f"{DOUBLE}.attn"), 4, 2.0),
        Layer("diffusion_model.double_blocks.0.txt_mlp.0", "transformer", (f"{DOUBLE}.ff_context.linear_in",), 2),
        Layer("diffusion_model.single_blocks.0.linear1", "transformer", (f"{SINGLE}.attn.to_qkv_mlp_proj",), 4, 8.0),
        Layer("diffusion_model.single_blocks.0.linear2", "transformer", (f"{SINGLE}.attn.to_out",), 2),
        Layer("diffusion_model.double_stream_modulation_img.lin", "transformer", ("double_stream_modulation_img.linear",), 2),
    ]),
    # The same names with kohya's matrix names, as some ComfyUI exports write them.
    "comfyui-down-up": ("kohya", [
        Layer("diffusion_model.double_blocks.0.txt_attn.qkv", "transformer",
              _qkv(f"{DOUBLE}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")), 4, 1.0),
        Layer("diffusion_model.double_blocks.0.img_attn.proj", "transformer", (f"{DOUBLE}.attn.to_out.0",), 2),
    ]),
    # kohya sd-scripts / musubi-tuner: underscores, lora_down/lora_up, an alpha per module.
    "kohya": ("kohya", [
        Layer("lora_unet_double_blocks_0_img_attn_qkv", "transformer", _qkv(f"{DOUBLE}.attn"), 4, 2.0),
        Layer("lora_unet_double_blocks_0_txt_mlp_2", "transformer", (f"{DOUBLE}.ff_context.linear_out",), 2, 8.0),
        Layer("lora_unet_single_blocks_0_linear1", "transformer", (f"{SINGLE}.attn.to_qkv_mlp_proj",), 4, 4.0),
        Layer("lora_unet_single_blocks_0_linear2", "transformer", (f"{SINGLE}.attn.to_out",), 2),
    ]),
}


def _outputs(components) -> torch.Tensor:
    """The network's prediction for fixed inputs (4x4 packed latents, 8 text tokens), as one vector."""
    g = torch.Generator().manual_seed(11)
    network = components.transformer
    side = 4
    image_ids = torch.zeros(side * side, 4)
    image_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    image_ids[:, 2] = torch.arange(side).repeat(side)
    with torch.no_grad():
        out = network(
            hidden_states=torch.randn(1, side * side, network.config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, network.config.joint_attention_dim, generator=g),
            timestep=torch.tensor([0.6]), img_ids=image_ids, txt_ids=torch.zeros(8, 4),
        ).sample
    return out.flatten()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_adds_weight_times_alpha_over_rank_times_b_a_and_comes_off_exactly(tmp_path, fmt):
    naming, layers = FORMATS[fmt]
    adds_and_comes_off(tmp_path / f"{fmt}.safetensors", build_tiny("flux2"), naming, layers, _outputs)


def test_prompt_tag_generation_writes_lora_hashes_and_changes_the_picture(tmp_path):
    components = build_tiny("flux2")
    path = tmp_path / "style.safetensors"
    _write(path, components, FORMATS["kohya"][1], "kohya")
    assert_tag_remakes(components, path)


@pytest.mark.parametrize(
    ("family", "names", "theirs", "ours"),
    [
        ("flux2", SD1_NAMES, "SD 1.x, 2.x or XL", "Flux.2 Klein"),
        ("flux2", ZIMAGE_NAMES, "Z-Image", "Flux.2 Klein"),
        ("flux2", ["lora_unet_joint_blocks_0_x_block_attn_qkv"], "SD 3.x", "Flux.2 Klein"),
        ("flux", [layer.name for layer in FORMATS["diffusers"][1]], "Flux.2 Klein", "Flux.1"),
        ("chroma", ["diffusion_model.double_stream_modulation_img.lin"], "Flux.2 Klein", "Chroma"),
    ],
    ids=["sd1-on-flux2", "zimage-on-flux2", "sd3-on-flux2", "flux2-on-flux", "flux2-on-chroma"],
)
def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path, family, names, theirs, ours):
    refused_in_one_line(tmp_path, family, names, theirs, ours)


@pytest.mark.parametrize("fmt", ["flux-kohya", "flux-diffusers"])
def test_a_flux1_lora_does_not_fit_klein_and_is_refused(tmp_path, fmt):
    """Flux.1's kohya names are Flux.2's too; its layers' widths (or diffusers' module names) are not."""
    flux, klein = build_tiny("flux"), build_tiny("flux2")
    family, naming, layers = FLUX_FORMATS[fmt]
    path = tmp_path / "flux1.safetensors"
    _write(path, flux, [layer for layer in layers if layer.part == "transformer"], naming)
    original = _outputs(klein)
    refused = r"^lora: (flux1\.safetensors does not fit this flux2 model|none of the layers in flux1\.safetensors exist in this flux2 model)"
    with pytest.raises(ModelFileError, match=refused):
        apply_loras(klein, [(path, "x", 1.0)])
    assert not klein.loras.adapters and not getattr(klein.transformer, "peft_config", {})
    assert torch.equal(_outputs(klein), original)
