"""The model families lienzo runs, as one typed table (ComfyUI's supported-models list, typed).

A family says what a loader and the engine need to know and the files do not always state: its
denoising network and text encoders (diffusers class names, imported when a model is loaded), its
latent space, the noise schedule it was trained with, and the defaults a request gets when it names
no steps, CFG scale, sampler or size. Adding a family is adding a row here plus the little code its
network call and prompt encoding need (:mod:`lienzo.generation.denoiser`, :mod:`lienzo.generation.text_encoding`).

This module imports nothing heavy, so a request can be checked against a family before torch loads.
"""

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: the diffusers pipeline's component names for it and its tokenizer,
    its transformers class, and the name ComfyUI's split layout gives its file (``clip_l``, ``t5xxl``)."""

    component: str  # "text_encoder", "text_encoder_2", ...
    tokenizer: str  # "tokenizer", "tokenizer_2", ...
    model_class: str  # "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "Qwen3Model", ...
    # "clip_l", "clip_g", "t5xxl", "qwen3", "qwen25vl" or "qwen3vl": what the split layout's files are called, and what to ask for
    kind: str
    optional: bool = False  # the model runs without it (SD 3.x without T5: zeros in its place)


@dataclass(frozen=True)
class Family:
    name: str  # the id: Components.family, the provenance record, the infotext's "Model family"
    label: str  # what people call it
    network: str  # "unet" or "transformer": the Components field holding the denoising network
    network_class: str  # the diffusers class of the network
    pipeline_class: str  # model_index.json's _class_name for a diffusers folder of this family
    text_encoders: tuple[TextEncoderSlot, ...]
    latent_channels: int
    flow: bool  # trained with flow matching (rectified flow): the prediction is a velocity, sigma runs 1 -> 0
    scheduler: dict = field(default_factory=dict)  # the training schedule's scheduler config, when a file has none
    default_size: int = 512
    default_steps: int = 20
    default_cfg: float = 7.0
    default_sampler: str = "DPM++ 2M"
    default_schedule: str = "Automatic"
    distilled_guidance: bool = False  # the network takes a guidance strength as an input (Flux.1 dev)
    default_distilled_cfg: float = 3.5
    max_sequence_length: int = 0  # T5 (Qwen3) tokens per prompt (0: no T5)
    # At a fixed shift, the Simple schedule's noise levels are spaced evenly from 1 to 1 / steps before the
    # shift (Z-Image's pipeline), not by the scheduler (SD 3.x's); a size-shifted schedule always is (Flux.1).
    even_sigmas: bool = False
    vae_class: str = "AutoencoderKL"  # the diffusers class of the VAE
    # The loop's latents are the VAE's in latent_patch x latent_patch patches (their channels side by side),
    # normalized by the VAE's batch-norm statistics in place of a scaling factor (Flux.2); 1: the VAE's own.
    latent_patch: int = 1
    # (steps, CFG scale) of the family's undistilled base models, where the defaults above are its step-distilled
    # ones' (Flux.2 Klein base: Flux2KleinPipeline's 50 steps, guidance 4); None: the family has one kind.
    base_defaults: tuple[int, float] | None = None
    # CFG rescales the guided prediction to the norm of the conditional one, per 2x2 patch (QwenImagePipeline).
    cfg_norm_rescale: bool = False
    # The network reads reference images after the noisy latents, in the same sequence (Flux.2's editing).
    reference_images: bool = False
    # The text encoder reads the reference images with the prompt, from the folder's processor/ (Qwen-Image-Edit),
    # and a picture needs at least one: its pipeline edits the images it is given.
    prompt_images: bool = False

    @property
    def is_transformer(self) -> bool:
        return self.network == "transformer"


_CLIP_L = TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModel", "clip_l")
_FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
# Flux.1's schedule, shifted by the image's size; Chroma's pipeline shifts alike. (A folder's own config wins.)
_SIZE_SHIFTED = {
    **_FLOW_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
# Qwen/Qwen-Image's scheduler_config.json, which its edit models share (a folder's own config wins).
_QWEN_IMAGE_SCHEDULER = {
    **_FLOW_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}
_FLOW_DEFAULTS = dict(default_size=1024, default_sampler="Euler", default_schedule="Simple")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "SD 1.x", "unet", "UNet2DConditionModel", "StableDiffusionPipeline", (_CLIP_L,), 4, False),
        Family("sd2", "SD 2.x", "unet", "UNet2DConditionModel", "StableDiffusionPipeline", (_CLIP_L,), 4, False, default_size=768),
        Family(
            "sdxl", "SDXL", "unet", "UNet2DConditionModel", "StableDiffusionXLPipeline",
            (_CLIP_L, TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g")), 4, False,
            default_size=1024,
        ),
        # SDXL's refiner: a U-Net over SDXL's latents that reads OpenCLIP bigG alone, and an aesthetic score where
        # SDXL reads the target size (lienzo.generation.denoiser). Its one encoder is the Components' text_encoder
        # here, as lienzo's first encoder is the one tokenization and embeddings go by; StableDiffusionXLImg2ImgPipeline's
        # folder names it text_encoder_2 (with text_encoder null), which lienzo.models.loading reads into that slot.
        Family(
            "sdxl_refiner", "SDXL refiner", "unet", "UNet2DConditionModel", "StableDiffusionXLImg2ImgPipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "clip_g"),), 4, False,
            default_size=1024,
        ),
        Family(
            "sd3", "SD 3.x", "transformer", "SD3Transformer2DModel", "StableDiffusion3Pipeline",
            (
                TextEncoderSlot("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "clip_l"),
                TextEncoderSlot("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g"),
                TextEncoderSlot("text_encoder_3", "tokenizer_3", "T5EncoderModel", "t5xxl", optional=True),
            ),
            16, True, {**_FLOW_SCHEDULER, "shift": 3.0}, default_steps=28, default_cfg=5.0, max_sequence_length=256,
            **_FLOW_DEFAULTS,
        ),
        Family(
            "flux", "Flux.1", "transformer", "FluxTransformer2DModel", "FluxPipeline",
            (_CLIP_L, TextEncoderSlot("text_encoder_2", "tokenizer_2", "T5EncoderModel", "t5xxl")),
            16, True, _SIZE_SHIFTED, default_steps=20, default_cfg=1.0, distilled_guidance=True, max_sequence_length=512,
            **_FLOW_DEFAULTS,
        ),
        # T5 alone, read with its padding masked; real CFG with a negative prompt (ChromaPipeline's defaults).
        Family(
            "chroma", "Chroma", "transformer", "ChromaTransformer2DModel", "ChromaPipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "T5EncoderModel", "t5xxl"),),
            16, True, _SIZE_SHIFTED, default_steps=35, default_cfg=5.0, max_sequence_length=512, **_FLOW_DEFAULTS,
        ),
        # Qwen3's chat-templated prompt; Turbo's defaults (8 steps, no CFG: ZImagePipeline's guidance_scale 0,
        # which is CFG scale 1 here, as its guidance_scale g is uncond + (g + 1) * (cond - uncond)).
        Family(
            "zimage", "Z-Image", "transformer", "ZImageTransformer2DModel", "ZImagePipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen3Model", "qwen3"),),
            16, True, {**_FLOW_SCHEDULER, "shift": 3.0}, default_steps=8, default_cfg=1.0, max_sequence_length=512,
            even_sigmas=True, **_FLOW_DEFAULTS,
        ),
        # Qwen3's chat-templated prompt read at three layers; the distilled Klein's defaults (4 steps, no CFG:
        # Flux2KleinPipeline ignores its guidance scale for them), the base Klein's as base_defaults. Shifted by
        # size and step count (its own mu).
        Family(
            "flux2", "Flux.2 Klein", "transformer", "Flux2Transformer2DModel", "Flux2KleinPipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen3ForCausalLM", "qwen3"),),
            32, True, {**_FLOW_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}, default_steps=4, default_cfg=1.0,
            max_sequence_length=512, vae_class="AutoencoderKLFlux2", latent_patch=2, base_defaults=(50, 4.0),
            reference_images=True, **_FLOW_DEFAULTS,
        ),
        # Qwen2.5-VL's chat-templated prompt; real CFG with a negative prompt, rescaled to the conditional
        # prediction's norm (QwenImagePipeline's true_cfg_scale), on the 5-D Wan-style VAE's latents.
        Family(
            "qwenimage", "Qwen-Image", "transformer", "QwenImageTransformer2DModel", "QwenImagePipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen2_5_VLForConditionalGeneration", "qwen25vl"),),
            16, True,
            _QWEN_IMAGE_SCHEDULER,
            default_steps=50, default_cfg=4.0, max_sequence_length=512, vae_class="AutoencoderKLQwenImage",
            cfg_norm_rescale=True, **_FLOW_DEFAULTS,
        ),
        # Qwen-Image's parts and defaults (QwenImageEditPlusPipeline's 50 steps, true CFG 4): the input images are
        # read by Qwen2.5-VL with the prompt and, VAE-encoded, by the network after the noisy latents. (The first
        # Qwen-Image-Edit's QwenImageEditPipeline templates and sizes its one image otherwise: not this row's.)
        Family(
            "qwenimage_edit", "Qwen-Image-Edit", "transformer", "QwenImageTransformer2DModel", "QwenImageEditPlusPipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen2_5_VLForConditionalGeneration", "qwen25vl"),),
            16, True,
            _QWEN_IMAGE_SCHEDULER,
            # No max_sequence_length: QwenImageEditPlusPipeline reads the whole prompt, whatever its argument says.
            default_steps=50, default_cfg=4.0, vae_class="AutoencoderKLQwenImage",
            cfg_norm_rescale=True, reference_images=True, prompt_images=True, **_FLOW_DEFAULTS,
        ),
        # Qwen3-VL's prompt in Qwen-Image's template, a fixed-length block read at twelve layers; Qwen-Image's VAE.
        # Krea2Pipeline's guidance_scale g is cond + g * (cond - uncond), CFG scale 1 + g here: the base model's
        # 28 steps and g 4.5 are CFG 5.5 (base_defaults), the distilled (TDM) one's 8 steps and g 0 are CFG 1.
        # Shifted by size (Krea's own sequence lengths); the distilled model at a fixed mu (its pipeline's 1.15).
        Family(
            "krea2", "Krea 2", "transformer", "Krea2Transformer2DModel", "Krea2Pipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen3VLModel", "qwen3vl"),),
            16, True,
            {
                **_FLOW_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 6400,
            },
            default_steps=8, default_cfg=1.0, max_sequence_length=512, vae_class="AutoencoderKLQwenImage",
            base_defaults=(28, 5.5), **_FLOW_DEFAULTS,
        ),
    )
}
# Flux.1 schnell: the same network without the guidance input, distilled to a few steps.
SCHNELL_STEPS = 4
PIPELINE_FAMILIES = {f.pipeline_class: f.name for f in FAMILIES.values() if f.is_transformer}


def family(name: str) -> Family:
    return FAMILIES[name]


# BFL names Flux.2 Klein's undistilled files by the word "base" (flux-2-klein-base-4b.safetensors).
_BASE_WORD = re.compile(r"(?:^|[^a-z0-9])base(?:$|[^a-z0-9])")


def is_distilled(spec: Family, *, index: dict | None = None, stem: str = "") -> bool | None:
    """Whether a model of a family with base and step-distilled models (``base_defaults``) is the distilled one:
    by its diffusers folder's model_index.json (``is_distilled``, False when left out, as Flux2KleinPipeline's
    and Krea2Pipeline's own default), else by its file's name; None for a family with one kind."""
    if spec.base_defaults is None:
        return None
    if index is not None:
        return bool(index.get("is_distilled", False))
    return _BASE_WORD.search(stem.lower()) is None
