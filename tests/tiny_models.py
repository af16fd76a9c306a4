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
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    ControlNetModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    Krea2Pipeline,
    Krea2Transformer2DModel,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
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
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLModel,
    T5Config,
    T5EncoderModel,
)

from lienzo.models.components import Components
from lienzo.models.families import FAMILIES as FAMILY_TABLE
from lienzo.models.single_file_layout import bundled_tokenizer, scheduler_config_for
from lienzo.models.single_file_save import save_single_file
from lienzo.models.tokenizers import bundled_t5_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
TRANSFORMER_FAMILIES = ("sd3", "flux", "chroma", "zimage", "flux2", "qwenimage", "krea2", "qwenimage_edit")
_T5_VOCAB = 32128  # T5 v1.1's embedding rows (its tokenizer has 32,100 tokens)
_DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sdxl_refiner": "epsilon"}
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
    # SDXL's refiner: cross-attends to bigG alone, no attention at the highest resolution (as the real one), and
    # 5 size/crop/aesthetic-score numbers beside the pooled text embedding.
    "sdxl_refiner": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=_SDXL_PROJECTION + 5 * 256,
    ),
}


def build_tiny(family: str, *, inpainting: bool = False, prediction_type: str | None = None, **options) -> Components:
    """A tiny random SD 1.x / 2.x / XL (or XL refiner) model (seed 0); ``inpainting`` gives the 9-channel UNet.
    ``sd3`` and ``flux`` give the transformer families (see :func:`build_tiny_transformer` for ``options``)."""
    if family in TRANSFORMER_FAMILIES:
        return build_tiny_transformer(family, **options)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES + TRANSFORMER_FAMILIES)}, got {family!r}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, **_UNETS[family])
    if family == "sdxl_refiner":  # bigG alone, as lienzo holds it: its first (only) text encoder
        return Components(
            unet=unet, vae=_tiny_vae(0.13025),
            text_encoder=CLIPTextModelWithProjection(_text_config("gelu", projection_dim=_SDXL_PROJECTION)),
            tokenizer=bundled_tokenizer("!"), scheduler_config=scheduler_config_for(prediction_type or _DEFAULT_PREDICTION[family]),
            family=family, name=f"tiny-{family}",
        )
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


def tiny_controlnet(unet, seed: int = 3) -> ControlNetModel:
    """A ControlNet copied from a tiny U-Net (its encoder, as ``ControlNetModel.from_unet`` copies it) whose zero
    convolutions and hint embedding's last layer are made non-zero, so that it steers (a trained one's are not zero)."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                param.normal_(0, 0.3)
    return net.eval()


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
    elif family == "qwenimage":
        transformer, encoders, vae = _tiny_qwenimage()
    elif family == "krea2":
        return _tiny_krea2()
    elif family == "qwenimage_edit":
        return _tiny_qwenimage_edit()
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


def _tiny_qwen25vl(tokenizer, positions: int, **token_ids) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL over ``tokenizer``: a language model of 32 channels with multimodal rotary sections, ``positions``
    long, and a one-block vision tower; ``token_ids`` name its vision tokens (Qwen-Image-Edit's)."""
    special = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=positions, **special,
            rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        vocab_size=len(tokenizer), **special, **token_ids,
    ))


def _tiny_qwenimage() -> tuple[QwenImageTransformer2DModel, dict, AutoencoderKLQwenImage]:
    """Qwen-Image's layout: a Qwen2.5-VL (language model of 32 channels, multimodal rotary sections, a one-block
    vision tower it never uses for text), a 4-channel Wan-style VAE (4x downsampling, a frame axis) whose latent
    statistics are not the identity, and two dual-stream blocks over its 2x2 patches (16 channels)."""
    tokenizer = _tiny_qwen_tokenizer()
    encoder = _tiny_qwen25vl(tokenizer, 2048)
    statistics = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=(statistics[0] - 0.5).tolist(), latents_std=(statistics[1] + 0.5).tolist(),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    return transformer, dict(text_encoder=encoder, tokenizer=tokenizer), vae


# The vision tokens of Qwen2.5-VL's tokenizer that Qwen-Image-Edit's prompt template and its processor use.
_QWEN_VISION_TOKENS = dict(
    vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>", image_token_id="<|image_pad|>",
    video_token_id="<|video_pad|>",
)


def _tiny_qwenimage_edit() -> Components:
    """Qwen-Image-Edit's layout, as a loaded folder is: Qwen-Image's tiny network and VAE; a Qwen2.5-VL like Qwen-Image's
    whose one-block vision tower reads the input images (Qwen2.5-VL's 14-pixel patches, merged 2x2), the tiny Qwen
    tokenizer with the vision tokens, and Qwen2-VL's image processor (PIL's: torchvision is not a dependency)."""
    transformer, _, vae = _tiny_qwenimage()
    tokenizer = _tiny_qwen_tokenizer()
    tokenizer.add_tokens(list(_QWEN_VISION_TOKENS.values()), special_tokens=True)
    vision = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _QWEN_VISION_TOKENS.items()}
    encoder = _tiny_qwen25vl(tokenizer, 4096, **vision)
    return Components(
        unet=None, transformer=transformer.eval(), vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tokenizer,
        image_processor=Qwen2VLImageProcessorPil(), scheduler_config=dict(FAMILY_TABLE["qwenimage_edit"].scheduler), family="qwenimage_edit",
        name="tiny-qwenimage_edit",
    )


# The tiny Krea 2's text_encoder_select_layers: three of its Qwen3-VL's five hidden states (0: the embeddings).
KREA2_LAYERS = (1, 2, 4)


def _tiny_krea2() -> Components:
    """Krea 2's layout, as a loaded folder of the base model is: a Qwen3-VL (language model of 32 channels, four
    layers, interleaved multimodal rotary sections, a one-block vision tower it never uses for text) read at
    :data:`KREA2_LAYERS`, Qwen-Image's tiny VAE, and two single-stream blocks over 2x2 patches (16 channels) after
    a one-block text fusion. The zero-initialised modulation tables and norm scales are randomised, so that each
    is exercised."""
    _, _, vae = _tiny_qwenimage()
    tokenizer = _tiny_qwen_tokenizer()
    encoder = Qwen3VLModel(Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, deepstack_visual_indexes=[0]),
    ))
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=32, num_text_layers=len(KREA2_LAYERS),
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=64, num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in transformer.parameters():
            if not parameter.any():
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.2 - 0.1)
    return Components(
        unet=None, transformer=transformer.eval(), vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tokenizer,
        scheduler_config=dict(FAMILY_TABLE["krea2"].scheduler), family="krea2", is_distilled=False,
        text_encoder_layers=KREA2_LAYERS, name="tiny-krea2",
    )


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


def qwen_vl_processor(tokenizer, image_processor) -> Qwen2VLProcessor:
    """transformers' Qwen2VLProcessor of these parts and no video processor, as QwenImageEditPlusPipeline takes it. Its
    constructor checks each part's class, and without torchvision it cannot look up the video processors' base class:
    that check is skipped for the absent video processor."""
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, part: None if part is None else check(self, name, part)
    try:
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


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
            "flux2": Flux2KleinPipeline, "qwenimage": QwenImagePipeline, "krea2": Krea2Pipeline,
            "qwenimage_edit": QwenImageEditPlusPipeline,
        }[components.family]
        options = {}
        if components.spec.prompt_images:  # processor/ is written below: transformers cannot save this processor
            options = dict(processor=None)
        if components.family == "krea2":  # its pipeline's config: which encoder layers it reads, and which model it is
            options = dict(text_encoder_select_layers=components.text_encoder_layers, is_distilled=bool(components.is_distilled))
        elif components.family == "flux2":  # the step-distilled Klein, as released (base folders say False)
            options = dict(is_distilled=components.is_distilled is not False)
        pipeline_class(**shared, **encoders, **options).save_pretrained(folder)
        if components.spec.prompt_images:  # processor/ as real folders have it: its tokenizer's and image processor's files
            components.tokenizer.save_pretrained(folder / "processor")
            components.image_processor.save_pretrained(folder / "processor")
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]}, indent=2))
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
    elif components.family == "sdxl_refiner":  # as the real refiner's folder: bigG as text_encoder_2, no text_encoder
        pipeline = StableDiffusionXLImg2ImgPipeline(
            **{**parts, "text_encoder": None, "tokenizer": None},
            text_encoder_2=components.text_encoder,
            tokenizer_2=components.tokenizer,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
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
