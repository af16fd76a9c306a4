"""The loaded parts of one latent diffusion model, as every loader returns them."""

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lienzo.devices import execution_device
from lienzo.models.families import Family, family
from lienzo.safety.base import SafetyFilter

TILING_CHOICES = ("auto", "on", "off")  # Components.vae_tiling


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA applied to a model: the name it was asked for by, its weight, its A1111 short hash (the
    infotext's ``Lora hashes``) and the file it was read from (for provenance; not part of equality)."""

    name: str
    weight: float
    short_hash: str
    file: Path | None = field(default=None, compare=False)


@dataclass
class LoraState:
    """The LoRAs of one model: every file read so far, as peft adapters (resolved path -> the adapter
    :mod:`lienzo.models.lora` keeps), and the ones the last request made active, in its order."""

    adapters: dict[str, Any] = field(default_factory=dict)
    active: list[ActiveLora] = field(default_factory=list)


@dataclass
class SpeedState:
    """What :mod:`lienzo.models.speed` did to a model: whether the U-Net's linear layers are int8 (LoRAs
    cannot wrap them, and the infotext records it), how long each compiled part took on its first call,
    and the CPU copies of the weights low-VRAM offload streams (part name -> (state dict, device))."""

    int8: bool = False
    fp8: list[str] = field(default_factory=list)  # the parts whose weights are stored in fp8
    compile_seconds: dict[str, float] = field(default_factory=dict)
    offloaded: dict[str, tuple[dict, torch.device]] = field(default_factory=dict)


@dataclass
class PromptCache:
    """Prompt embeddings kept across jobs for one model (:mod:`lienzo.generation.prompts` reads and fills it):
    key -> embeddings, least recently used first, together at most ``max_bytes`` (0: none are kept), counted in
    ``nbytes``; they sit where they are used (beside the network: its GPU's memory). Components built by hand
    keep none: their weights may change in place between jobs (a model being trained), which no key would
    see; :func:`lienzo.studio.load_model` gives a loaded model one."""

    max_bytes: int = 0
    entries: OrderedDict = field(default_factory=OrderedDict)
    nbytes: int = 0


@dataclass
class Components:
    """The denoising network (a U-Net or a transformer), VAE, text encoder(s) and tokenizer(s) plus
    the noise schedule they were trained with, named as the family's diffusers pipeline names them.

    ``family`` is a key of :data:`lienzo.models.families.FAMILIES`. U-Net families (SD 1.x, 2.x, XL)
    set ``unet``; transformer families (SD 3.x, Flux.1) set ``transformer`` and leave ``unet`` None.
    ``scheduler_config`` is a diffusers scheduler config (``num_train_timesteps``, ``beta_*``,
    ``prediction_type``, ``timestep_spacing``, ``shift``, ...); the sampler table builds any scheduler
    from it. SDXL's second text encoder is OpenCLIP bigG; SD 3.x has CLIP-L, bigG and T5 (the last may
    be None: it is optional there); Flux.1 has CLIP-L and T5 (``text_encoder_2``); Chroma has T5 alone and
    Z-Image Qwen3 alone (``text_encoder``, so that field is not always CLIP). ``safety_filter``
    is the model's own checker when its folder has one; set it to plug in another.
    """

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    family: str
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    transformer: torch.nn.Module | None = None  # SD3Transformer2DModel, FluxTransformer2DModel, ...: the family's network_class
    # Each text encoder's file, for the infotext and provenance when they came apart from the network
    # (ComfyUI's split layout, --text-encoder): component name -> file name.
    text_encoder_files: dict[str, str] = field(default_factory=dict)
    # Where the text encoders run when not beside the network: the CPU, to leave a GPU's memory to the
    # network (they run once per prompt, the network every step). None: beside the network.
    text_encoder_device: torch.device | None = None
    # Step-distilled (Flux.2 Klein: its folder's is_distilled, a file's name) or a base model, for a family with
    # both (Family.base_defaults); None: the family has one kind.
    is_distilled: bool | None = None
    # The text encoder's hidden states the network reads, where its folder's model_index.json says which
    # (Krea2Pipeline's text_encoder_select_layers); None: the family's own.
    text_encoder_layers: tuple[int, ...] | None = None
    # The image processor of the folder's processor/ (Qwen2-VL's), for a family whose prompt is read with its reference
    # images (Family.prompt_images: Qwen-Image-Edit); None elsewhere.
    image_processor: Any = None
    # The text encoders rest in CPU memory and go to the network's device only to encode a text the prompt
    # cache lacks, and back once the job's prompts are encoded (lienzo.generation.prompts.text_encoders_on_call).
    text_encoder_offload: bool = False
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    name: str = ""
    short_hash: str = ""
    sha256: str = ""
    source: Path | None = None
    vae_name: str = ""  # a VAE loaded in place of the model's own: its file or folder name, for the infotext
    loras: LoraState = field(default_factory=LoraState)
    speed: SpeedState = field(default_factory=SpeedState)
    # Runs when a request's safety policy is blur or block; a diffusers folder's safety_checker sets it.
    safety_filter: SafetyFilter | None = None
    # When the VAE decodes in tiles: "auto" (large images), "on" or "off" (lienzo.models.speed sets it).
    vae_tiling: str = "auto"
    # ControlNets and T2I-Adapters loaded for this model's jobs, by file, most recently used last
    # (lienzo.control.prepare keeps a few: a server's next job usually wants the same ones).
    control_models: OrderedDict = field(default_factory=OrderedDict)
    # The refiner last used with this model: ((its path, sha256), its Components), kept for the next job.
    refiner: tuple | None = None

    @property
    def spec(self) -> Family:
        """The family's row of the family table."""
        return family(self.family)

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the U-Net, or the transformer."""
        return self.transformer if self.spec.is_transformer else self.unet

    @property
    def is_inpainting(self) -> bool:
        """9-channel UNets take latents + mask + masked-image latents."""
        return self.unet is not None and self.unet.config.in_channels == 9

    @property
    def guidance_embeds(self) -> bool:
        """The network takes a distilled guidance strength (Flux.1 dev; schnell does not)."""
        return self.spec.distilled_guidance and bool(getattr(self.network.config, "guidance_embeds", False))

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def execution_device(self) -> torch.device:
        """Where the network computes, also when CPU offload hooks hold its weights (low-VRAM mode)."""
        return execution_device(self.network)

    def to(self, device, dtype=None) -> "Components":
        device = torch.device(device)
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        for module in (self.unet, self.transformer, self.vae, *encoders):
            if module is None or getattr(module, "_hf_hook", None) is not None:
                continue  # offloaded: its hooks decide where it runs
            resting = self.text_encoder_device
            if resting is None and self.text_encoder_offload:
                resting = torch.device("cpu")
            target = resting if resting is not None and module in encoders else device
            # Only move what must move, and name a dtype only when one is asked for: diffusers 0.42 logs
            # "There are modules in ... that should be kept in float32: []" on every .to() given a dtype, None too.
            if module.device != target or (dtype is not None and module.dtype != dtype):
                module.to(device=target, **({} if dtype is None else {"dtype": dtype}))
        return self


def has_frames(vae) -> bool:
    """Wan-style video VAEs (Qwen-Image's) take and give N x C x frames x H x W (lienzo: one frame)."""
    return "temperal_downsample" in vae.config


def vae_scale_factor(vae) -> int:
    """The pixels per latent of a VAE's side: Wan-style video VAEs (Qwen-Image's) count their downsampling
    steps by ``temperal_downsample`` (QwenImagePipeline's formula), the others by their blocks."""
    if has_frames(vae):
        return 2 ** len(vae.config.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_dtype_for(vae_config: dict, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a VAE is read in: ``vae_dtype`` when given, else the model's ``dtype``, except that beside fp16 a
    VAE whose config says ``force_upcast`` (SD 1.x's, SD 2.x's and SDXL's own VAEs) stays in fp32: in fp16 they
    overflow to NaN (black images). A half-precision VAE that overflows anyway decodes again in fp32
    (lienzo.generation.vae_decode).
    """
    if vae_dtype is not None:
        return vae_dtype
    # AutoencoderKL's own default, which a config without the key gets too.
    upcast = dtype == torch.float16 and vae_config.get("force_upcast", True)
    return torch.float32 if upcast else dtype
