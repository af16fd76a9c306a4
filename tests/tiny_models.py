"""Tiny seeded random models of every family in the real layouts, for tests and as stand-in checkpoints.

They follow the same family rules a real checkpoint does (SD 1.x: 8 attention heads and conv
projections; SD 2.x / XL: 64 channels per head and linear projections; SDXL's text_time embedding),
so they survive the single-file round trip. Each has a few million parameters, most of them the
49,408-token embedding the real tokenizer needs.

Make a random-weight stand-in checkpoint:

    python tests/tiny_models.py sd1 tiny-sd1.safetensors [--inpainting]
    python tests/tiny_models.py sdxl tiny-sdxl --diffusers
    python tests/tiny_models.py flux tiny-flux --diffusers

SD 3.x and Flux.1 stand-ins are laid out like the real ones (16 latent channels, SD 3.5's dual
attention and QK norm, Flux's double and single blocks, guidance input and packed 2x2 patches) at a
few blocks of a few channels; their T5 has T5's real 32,128-token vocabulary so the bundled tokenizer fits.
Chroma, Z-Image and Flux.2 Klein stand-ins (``chroma``, ``zimage``, ``flux2``) are written as diffusers folders
only (``--diffusers``): lienzo reads no single file of theirs yet.
"""

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    ChromaPipeline,
    ChromaTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from lienzo.models.components import Components
from lienzo.models.families import FAMILIES as FAMILY_TABLE
from lienzo.models.single_file_layout import bundled_tokenizer, scheduler_config_for
from lienzo.models.single_file_save import save_single_file
from lienzo.models.tokenizers import bundled_t5_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
TRANSFORMER_FAMILIES = ("sd3", "flux", "chroma", "zimage", "flux2")
_T5_VOCAB = 32128  # T5 v1.1's embedding rows (its tokenizer has 32,100 tokens)
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


def build_tiny(family: str, *, inpainting: bool = False, prediction_type: str | None = None, **options) -> Components:
    """A tiny random SD 1.x / 2.x / XL model (seed 0); ``inpainting`` gives the 9-channel UNet.
    ``sd3`` and ``flux`` give the transformer families (see :func:`build_tiny_transformer` for ``options``)."""
    if family in TRANSFORMER_FAMILIES:
        return build_tiny_transformer(family, **options)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES + TRANSFORMER_FAMILIES)}, got {family!r}")
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


# Flux's rotary position axes split each head's channels as (1/8, 7/16, 7/16): (16, 56, 56) for 128.
FLUX_HEAD_DIM = 32
FLUX_ROPE = (4, 14, 14)


def build_tiny_transformer(family: str, *, t5: bool = True, guidance: bool = True) -> Components:
    """A tiny random SD 3.5-like (``sd3``: CLIP-L, bigG, T5; dual attention in its first block, QK norm),
    Flux.1-like (``flux``: CLIP-L, T5; ``guidance`` False gives schnell's network) or Chroma-like (``chroma``:
    T5; Flux's blocks modulated by one small approximator network) or Z-Image-like (``zimage``: Qwen3 with a
    byte-level tokenizer and Qwen3's chat template; a single-stream network with refiner blocks) or Flux.2
    Klein-like (``flux2``: see :func:`_tiny_flux2`) model, seed 0.
    ``t5`` False leaves SD 3's optional T5 out."""
    torch.manual_seed(0)
    spec = FAMILY_TABLE[family]
    clip_l = CLIPTextModelWithProjection(_text_config("quick_gelu", projection_dim=_SDXL_PROJECTION))
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=2 * _TEXT_HIDDEN, caption_projection_dim=16, pooled_projection_dim=2 * _SDXL_PROJECTION,
            out_channels=16, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        encoders = dict(
            text_encoder=clip_l, tokenizer=bundled_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config("gelu", projection_dim=_SDXL_PROJECTION)),
            tokenizer_2=bundled_tokenizer("!"),
            text_encoder_3=_tiny_t5(2 * _TEXT_HIDDEN) if t5 else None, tokenizer_3=bundled_t5_tokenizer() if t5 else None,
        )
        vae = _tiny_vae(1.5305, latent_channels=16, shift_factor=0.0609)
    elif family == "chroma":
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=FLUX_HEAD_DIM,
            num_attention_heads=2, joint_attention_dim=_TEXT_HIDDEN, axes_dims_rope=FLUX_ROPE,
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
        )
        encoders = dict(text_encoder=_tiny_t5(_TEXT_HIDDEN), tokenizer=bundled_t5_tokenizer())
        vae = _tiny_vae(0.3611, latent_channels=16, shift_factor=0.1159)  # Flux.1's VAE
    elif family == "zimage":
        transformer = ZImageTransformer2DModel(
            dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=_TEXT_HIDDEN,
            axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64],
        )
        tokenizer = _tiny_qwen_tokenizer()
        encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=2 * _TEXT_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        ))
        encoders = dict(text_encoder=encoder, tokenizer=tokenizer)
        vae = _tiny_vae(0.3611, latent_channels=16, shift_factor=0.1159)  # Flux.1's VAE
    elif family == "flux2":
        transformer, encoders, vae = _tiny_flux2()
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=FLUX_HEAD_DIM,
            num_attention_heads=2, joint_attention_dim=_TEXT_HIDDEN, pooled_projection_dim=_TEXT_HIDDEN,
            guidance_embeds=guidance, axes_dims_rope=FLUX_ROPE,
        )
        encoders = dict(
            text_encoder=CLIPTextModel(_text_config("quick_gelu")), tokenizer=bundled_tokenizer(),
            text_encoder_2=_tiny_t5(_TEXT_HIDDEN), tokenizer_2=bundled_t5_tokenizer(),
        )
        vae = _tiny_vae(0.3611, latent_channels=16, shift_factor=0.1159)
    return Components(
        unet=None, transformer=transformer.eval(), vae=vae.eval(), scheduler_config=dict(spec.scheduler), family=family,
        name=f"tiny-{family}", **{k: (v.eval() if isinstance(v, torch.nn.Module) else v) for k, v in encoders.items()},
    )


def _tiny_flux2() -> tuple[Flux2Transformer2DModel, dict, AutoencoderKLFlux2]:
    """Flux.2 Klein's layout: a Qwen3 language model deep enough for the three layers its pipeline reads
    (27 layers of 32 channels), a 4-latent-channel VAE whose batch-norm statistics are not the identity, and
    a double- and a single-stream block over its 2x2 patches (16 channels)."""
    tokenizer = _tiny_qwen_tokenizer()
    encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
    ))
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
    )
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    return transformer, dict(text_encoder=encoder, tokenizer=tokenizer), vae


def save_transformer_models(models_dir) -> Path:
    """A tiny Flux.1 dev (``tiny-flux``), Flux.1 schnell (``tiny-schnell``) and SD 3.x (``tiny-sd3``), as
    diffusers folders in ``models_dir``."""
    models_dir = Path(models_dir)
    save_diffusers_folder(build_tiny("flux"), models_dir / "tiny-flux")
    save_diffusers_folder(build_tiny("flux", guidance=False), models_dir / "tiny-schnell")
    save_diffusers_folder(build_tiny("sd3"), models_dir / "tiny-sd3")
    return models_dir


# Qwen3's chat template for one user turn: the turn, then the assistant's opening, with an empty thought when
# thinking is off (what Flux2KleinPipeline asks for; ZImagePipeline turns it on).
_QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _tiny_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Qwen's byte-level BPE reduced to its 256 byte tokens (no merges) and the three special tokens the chat
    template and padding use; it pads on the right with <|endoftext|>, as Qwen3's does."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None, chat_template=_QWEN_CHAT,
        padding_side="right",
    )


def _tiny_t5(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=_T5_VOCAB, d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config)


def save_diffusers_folder(components: Components, folder) -> Path:
    """Write ``components`` as a diffusers pipeline folder (model_index.json and one folder per part)."""
    folder = Path(folder)
    if components.spec.is_transformer:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
        shared = dict(transformer=components.transformer, vae=components.vae, scheduler=scheduler)
        names = [name for slot in components.spec.text_encoders for name in (slot.component, slot.tokenizer)]
        encoders = {name: getattr(components, name) for name in names}
        pipeline_class = {
            "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "chroma": ChromaPipeline, "zimage": ZImagePipeline,
            "flux2": Flux2KleinPipeline,
        }[components.family]
        pipeline_class(**shared, **encoders).save_pretrained(folder)
        return folder
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


def _tiny_vae(scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    """SD's VAE layout, two levels (a factor of 2); the 16-channel ones (SD 3, Flux) have no quant convs."""
    flow = latent_channels == 16
    return AutoencoderKL(
        shift_factor=shift_factor, use_quant_conv=not flow, use_post_quant_conv=not flow,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
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
    parser.add_argument("family", choices=FAMILIES + TRANSFORMER_FAMILIES)
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
