"""LoRAs on Chroma and Z-Image, in the formats people train and download them in.

As in test_transformer_lora.py: each test writes a small LoRA for the tiny model in one format's names,
applies it through lienzo's ``apply_loras`` and checks the changed layers against W + weight * alpha / rank
* B @ A worked by hand (a fused qkv's B split by rows), so diffusers' renaming, splitting and alpha scaling
are checked, not only that something changed.
"""

import pytest
import torch

from lienzo.models.lora import apply_loras
from test_transformer_lora import DOUBLE, SD1_NAMES, Layer, _qkv, _write, adds_and_comes_off, assert_tag_remakes, refused_in_one_line
from tiny_models import build_tiny

SINGLE = "single_transformer_blocks.0"
FORMATS = {
    # Chroma LoRAs as kohya sd-scripts (and ComfyUI) write them: Flux.1's block names.
    "chroma-kohya": ("chroma", "kohya", [
        Layer("lora_unet_double_blocks_0_img_attn_qkv", "transformer", _qkv(f"{DOUBLE}.attn"), 4, 2.0),
        Layer("lora_unet_double_blocks_0_txt_mlp_0", "transformer", (f"{DOUBLE}.ff_context.net.0.proj",), 2, 8.0),
        Layer("lora_unet_single_blocks_1_linear2", "transformer", ("single_transformer_blocks.1.proj_out",), 4, 4.0),
    ]),
    # ComfyUI / ai-toolkit: the original checkpoint's names under diffusion_model., peft's matrix names.
    "chroma-comfyui": ("chroma", "peft", [
        Layer("diffusion_model.double_blocks.0.img_attn.proj", "transformer", (f"{DOUBLE}.attn.to_out.0",), 4),
        Layer("diffusion_model.double_blocks.0.txt_attn.qkv", "transformer",
              _qkv(f"{DOUBLE}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")), 2, 1.0),
        # (Not linear1: diffusers splits it at full-size Flux's widths, which real Chroma shares and the tiny lacks.)
        Layer("diffusion_model.single_blocks.0.linear2", "transformer", (f"{SINGLE}.proj_out",), 4, 2.0),
    ]),
    # diffusers/peft, including a layer of Chroma's own (the approximator that replaces Flux's modulation).
    "chroma-diffusers": ("chroma", "peft", [
        Layer(f"transformer.{DOUBLE}.attn.to_k", "transformer", (f"{DOUBLE}.attn.to_k",), 4),
        Layer(f"transformer.{SINGLE}.proj_mlp", "transformer", (f"{SINGLE}.proj_mlp",), 2, 4.0),
        Layer("transformer.distilled_guidance_layer.in_proj", "transformer", ("distilled_guidance_layer.in_proj",), 2),
    ]),
    "zimage-diffusers": ("zimage", "peft", [
        Layer("transformer.layers.0.attention.to_q", "transformer", ("layers.0.attention.to_q",), 4),
        Layer("transformer.noise_refiner.0.feed_forward.w2", "transformer", ("noise_refiner.0.feed_forward.w2",), 2, 2.0),
        Layer("transformer.context_refiner.0.attention.to_out.0", "transformer",
              ("context_refiner.0.attention.to_out.0",), 4),
    ]),
    # ComfyUI / ai-toolkit: diffusers' module names under diffusion_model., with a peft-style alpha.
    "zimage-comfyui": ("zimage", "peft", [
        Layer("diffusion_model.layers.1.attention.to_k", "transformer", ("layers.1.attention.to_k",), 4, 8.0),
        Layer("diffusion_model.layers.0.feed_forward.w1", "transformer", ("layers.0.feed_forward.w1",), 2),
    ]),
    # kohya: underscores, an alpha per module, the original checkpoint's fused qkv and bare "out".
    "zimage-kohya": ("zimage", "kohya", [
        Layer("lora_unet_layers_0_attention_qkv", "transformer", _qkv("layers.0.attention"), 4, 2.0),
        Layer("lora_unet_layers_1_attention_out", "transformer", ("layers.1.attention.to_out.0",), 2, 1.0),
        Layer("lora_unet_noise_refiner_0_feed_forward_w3", "transformer", ("noise_refiner.0.feed_forward.w3",), 4, 8.0),
        Layer("lora_unet_context_refiner_0_attention_to_v", "transformer", ("context_refiner.0.attention.to_v",), 2, 4.0),
    ]),
}


def _outputs(components) -> torch.Tensor:
    """The network's prediction for fixed inputs, as one vector (LoRAs change only the network here)."""
    g = torch.Generator().manual_seed(11)
    network = components.transformer
    with torch.no_grad():
        if components.family == "chroma":
            side = 4  # packed latents: one token per 2x2 patch
            ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
            out = network(
                hidden_states=torch.randn(1, side * side, network.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, network.config.joint_attention_dim, generator=g),
                timestep=torch.tensor([0.6]), img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], 1),
                txt_ids=torch.zeros(8, 3),
            ).sample
        else:
            # Z-Image takes a list of (channels, frames, height, width) latents and of caption features.
            out = network(
                [torch.randn(16, 1, 8, 8, generator=g)], torch.tensor([0.6]),
                [torch.randn(8, network.config.cap_feat_dim, generator=g)],
            ).sample
    return torch.cat([p.flatten() for p in out]) if isinstance(out, list) else out.flatten()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_adds_weight_times_alpha_over_rank_times_b_a_and_comes_off_exactly(tmp_path, fmt):
    family, naming, layers = FORMATS[fmt]
    components = build_tiny(family)
    path, original = adds_and_comes_off(tmp_path / f"{fmt}.safetensors", components, naming, layers, _outputs)
    apply_loras(components, [(path, "style", 0.0)])
    assert torch.equal(_outputs(components), original)


def test_a_flux_lora_on_chroma_changes_the_layers_chroma_has_and_warns_about_the_rest(tmp_path, caplog):
    """Flux.1's modulation (img_mod) and CLIP-L (lora_te1_) layers have no place in Chroma: left out, said so."""
    components, reference = build_tiny("chroma"), build_tiny("chroma")
    fitting = FORMATS["chroma-kohya"][2]
    # Sizes of Flux.1's layers, which the tiny Chroma lacks: its approximator's width, its T5's.
    flux_only = [
        Layer("lora_unet_double_blocks_0_img_mod_lin", "transformer", ("distilled_guidance_layer.out_proj",), 2, 1.0),
        Layer("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
              ("encoder.block.0.layer.0.SelfAttention.q",), 2, 1.0),
    ]
    _write(tmp_path / "flux.safetensors", components, [*fitting, *flux_only], "kohya")
    _write(tmp_path / "fitting.safetensors", components, fitting, "kohya")
    t5_before = components.text_encoder(torch.arange(8)[None]).last_hidden_state

    apply_loras(components, [(tmp_path / "flux.safetensors", "flux", 1.0)])
    apply_loras(reference, [(tmp_path / "fitting.safetensors", "fitting", 1.0)])
    assert torch.equal(_outputs(components), _outputs(reference))
    assert torch.equal(components.text_encoder(torch.arange(8)[None]).last_hidden_state, t5_before)
    # Six once the qkv is split in three; img_mod (Flux's norm1.linear) is the one that does not fit.
    assert "flux.safetensors: 1 of its 6 transformer layers fit no layer of this model" in caplog.text
    assert "flux.safetensors: its 1 text_encoder layers are ignored" in caplog.text


@pytest.mark.parametrize("fmt", ["chroma-kohya", "zimage-kohya"])
def test_prompt_tag_generation_writes_lora_hashes_and_remakes_the_same_pixels(tmp_path, fmt):
    family, naming, layers = FORMATS[fmt]
    components = build_tiny(family)
    path = tmp_path / "style.safetensors"
    _write(path, components, layers, naming)

    assert_tag_remakes(components, path)


ZIMAGE_NAMES = [layer.name for layer in FORMATS["zimage-kohya"][2]]


@pytest.mark.parametrize(
    ("family", "names", "theirs", "ours"),
    [
        ("chroma", SD1_NAMES, "SD 1.x, 2.x or XL", "Chroma"),
        ("chroma", ["lora_unet_joint_blocks_0_x_block_attn_qkv"], "SD 3.x", "Chroma"),
        ("chroma", ZIMAGE_NAMES, "Z-Image", "Chroma"),
        ("zimage", SD1_NAMES, "SD 1.x, 2.x or XL", "Z-Image"),
        ("zimage", ["diffusion_model.double_blocks.0.img_attn.qkv"], "Flux.1", "Z-Image"),
        ("flux", ["diffusion_model.layers.0.feed_forward.w1"], "Z-Image", "Flux.1"),
        ("sd1", ZIMAGE_NAMES, "Z-Image", "SD 1.x"),
    ],
    ids=["sd1-on-chroma", "sd3-on-chroma", "zimage-on-chroma", "sd1-on-zimage", "flux-on-zimage", "zimage-on-flux",
         "zimage-on-sd1"],
)
def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path, family, names, theirs, ours):
    refused_in_one_line(tmp_path, family, names, theirs, ours)
