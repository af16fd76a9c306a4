"""Tiny seeded random Stable Diffusion models in the real layouts, for tests and as stand-in checkpoints.

They follow the same family rules a real checkpoint does (SD 1.x: 8 attention heads and conv
projections; SD 2.x / XL: 64 channels per head and linear projections; SDXL's text_time embedding),
so they survive the single-file round trip. Each has a few million parameters, most of them the
49,408-token embedding the real tokenizer needs.

Make a random-weight stand-in checkpoint:

    python tests/tiny_models.py sd1 tiny-sd1.safetensors [--inpainting]
    python tests/tiny_models.py sdxl tiny-sdxl --diffusers
"""

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lienzo.models.components import Components
from lienzo.models.single_file_layout import bundled_tokenizer, scheduler_config_for
from lienzo.models.single_file_save import save_single_file

FAMILIES = ("sd1", "sd2", "sdxl")
_DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
# The real CLIP vocabulary, so that the bundled tokenizer's ids fit.
_VOCAB = 49408
_TEXT_HIDDEN = 64  # one head of 64 channels
_SDXL_PROJECTION = 32  # unlike the hidden size, so a transposed text_projection cannot pass unnoticed


# What differs between the families' UNets; everything else is shared (see build_tiny).
_UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8,
    ),
    # Attention at the highest resolution, as in the real SD 2 (sd1 above has it at the lowest).
    "sd2": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
    ),
    # Two transformer blocks per attention but one in the middle block (real SDXL: 2 and 10 per level,
    # 10 in the middle), kept at the 64-channel level so that the model stays small.
    "sdxl": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(2, 1),
        cross_attention_dim=2 * _TEXT_HIDDEN,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # pooled text embedding + 6 size/crop numbers x 256 sinusoidal channels
        projection_class_embeddings_input_dim=_SDXL_PROJECTION + 6 * 256,
    ),
}


def build_tiny(family: str, *, inpainting: bool = False, prediction_type: str | None = None) -> Components:
    """A tiny random SD 1.x / 2.x / XL model (seed 0); ``inpainting`` gives the 9-channel UNet."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, **_UNETS[family])
    xl = family == "sdxl"
    open_clip = family == "sd2"  # SD 2.x's only encoder is OpenCLIP (gelu, pads with "!")
    return Components(
        unet=unet,
        vae=_tiny_vae(0.13025 if xl else 0.18215),
        text_encoder=CLIPTextModel(_text_config("gelu" if open_clip else "quick_gelu")),
        tokenizer=bundled_tokenizer("!" if open_clip else "<|endoftext|>"),
        text_encoder_2=CLIPTextModelWithProjection(_text_config("gelu", projection_dim=_SDXL_PROJECTION)) if xl else None,
        tokenizer_2=bundled_tokenizer("!") if xl else None,
        scheduler_config=scheduler_config_for(prediction_type or _DEFAULT_PREDICTION[family]),
        family=family,
        name=f"tiny-{family}",
    )


def save_diffusers_folder(components: Components, folder) -> Path:
    """Write ``components`` as a diffusers pipeline folder (model_index.json and one folder per part)."""
    folder = Path(folder)
    scheduler = EulerDiscreteScheduler.from_config(components.scheduler_config)
    parts = dict(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        scheduler=scheduler,
    )
    if components.family == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            **parts,
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.save_pretrained(folder)
    return folder


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    )


def _text_config(hidden_act: str, projection_dim: int = _TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=4 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=_TEXT_HIDDEN // 64,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight Stable Diffusion stand-in model.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("output", type=Path, help="a .safetensors file, or a folder with --diffusers")
    parser.add_argument("--inpainting", action="store_true", help="9-channel inpainting UNet")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"))
    parser.add_argument("--diffusers", action="store_true", help="write a diffusers folder instead of one file")
    args = parser.parse_args(argv)
    components = build_tiny(args.family, inpainting=args.inpainting, prediction_type=args.prediction_type)
    if args.diffusers:
        save_diffusers_folder(components, args.output)
    else:
        save_single_file(components, args.output)


if __name__ == "__main__":
    main()
