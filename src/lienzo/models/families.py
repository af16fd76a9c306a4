"""The model families lienzo runs, as one typed table (ComfyUI's supported-models list, typed).

A family says what a loader and the engine need to know and the files do not always state: its
denoising network and text encoders (diffusers class names, imported when a model is loaded), its
latent space, the noise schedule it was trained with, and the defaults a request gets when it names
no steps, CFG scale, sampler or size. Adding a family is adding a row here plus the little code its
network call and prompt encoding need (:mod:`lienzo.generation.denoiser`, :mod:`lienzo.generation.text_encoding`).

This module imports nothing heavy, so a request can be checked against a family before torch loads.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: the diffusers pipeline's component names for it and its tokenizer,
    its transformers class, and the name ComfyUI's split layout gives its file (``clip_l``, ``t5xxl``)."""

    component: str  # "text_encoder", "text_encoder_2", ...
    tokenizer: str  # "tokenizer", "tokenizer_2", ...
    model_class: str  # "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "Qwen3Model", ...
    kind: str  # "clip_l", "clip_g", "t5xxl" or "qwen3": what the split layout's files are called, and what to ask for
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
        # Flux2KleinPipeline ignores its guidance scale for them). Shifted by size and step count (its own mu).
        Family(
            "flux2", "Flux.2 Klein", "transformer", "Flux2Transformer2DModel", "Flux2KleinPipeline",
            (TextEncoderSlot("text_encoder", "tokenizer", "Qwen3ForCausalLM", "qwen3"),),
            32, True, {**_FLOW_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}, default_steps=4, default_cfg=1.0,
            max_sequence_length=512, vae_class="AutoencoderKLFlux2", latent_patch=2, **_FLOW_DEFAULTS,
        ),
    )
}
# Flux.1 schnell: the same network without the guidance input, distilled to a few steps.
SCHNELL_STEPS = 4
PIPELINE_FAMILIES = {f.pipeline_class: f.name for f in FAMILIES.values() if f.is_transformer}


def family(name: str) -> Family:
    return FAMILIES[name]
