"""The networks a run trains: a fresh seeded Stable Diffusion architecture, or a frozen base with a LoRA."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lienzo.generation.engine import native_size
from lienzo.models.components import Components
from lienzo.models.loading import load_components
from lienzo.models.single_file_layout import bundled_tokenizer
from lienzo.training.config import TrainConfig
from lienzo.training.lora import ADAPTER, add_lora
from lienzo.training.state import TrainingError

_CLIP_BOS, _CLIP_EOS = 49406, 49407
PROMPT_LENGTH = 77  # CLIP's context; the engine encodes prompts in chunks of this length


@dataclass
class Networks:
    """The models of a run (keyed by their diffusers folder names), its noise schedule and tokenizer."""

    models: dict[str, torch.nn.Module]  # "vae", "text_encoder", "unet"
    noise: DDPMScheduler
    tokenizer: CLIPTokenizer
    lora_params: list[torch.nn.Parameter] = field(default_factory=list)  # a LoRA run's trainable weights


def noise_scheduler(config: TrainConfig, base: dict | None = None) -> DDPMScheduler:
    """The training noise schedule: the base model's for a LoRA, the config's otherwise."""
    if base is not None:
        return DDPMScheduler.from_config(base)
    m = config.model
    return DDPMScheduler(
        num_train_timesteps=m.num_train_timesteps, beta_start=m.beta_start, beta_end=m.beta_end,
        beta_schedule=m.beta_schedule, prediction_type=m.prediction_type, clip_sample=False,
        steps_offset=1, timestep_spacing="leading",
    )


def build_models(config: TrainConfig) -> dict[str, torch.nn.Module]:
    """Fresh seeded VAE, text encoder and UNet with the Stable Diffusion architecture (SD 1.x layout)."""
    torch.manual_seed(config.seed)
    v, u, t = config.model.vae, config.model.unet, config.model.text_encoder
    levels = len(v.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups, sample_size=config.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
            num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=PROMPT_LENGTH,
            hidden_act="quick_gelu", bos_token_id=_CLIP_BOS, eos_token_id=_CLIP_EOS, pad_token_id=_CLIP_EOS,
        )
    )
    latent_size = config.resolution // 2 ** (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=v.latent_channels, out_channels=v.latent_channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)),
        cross_attention_dim=t.hidden_size, attention_head_dim=u.attention_heads, norm_num_groups=u.norm_num_groups,
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def load_base(config: TrainConfig) -> Components:
    """A LoRA's base model; its native size becomes the training resolution unless the config names one."""
    base = load_components(Path(config.lora.base))
    if base.family == "sdxl" or base.is_inpainting:
        raise TrainingError("lora.base: LoRA training supports SD 1.x and 2.x text-to-image models; this one is "
                            f"{'SDXL' if base.family == 'sdxl' else 'an inpainting model'}")
    if "resolution" not in config.model_fields_set:
        config.resolution = max(64, native_size(base))
    return base


def fresh_networks(config: TrainConfig, vae_path: Path | None, checkpoint: Path | None, device: torch.device) -> Networks:
    """Seeded models from the config, a given VAE in place of the fresh one, then the checkpoint's weights; all frozen."""
    nets = Networks(build_models(config), noise_scheduler(config), bundled_tokenizer())
    models = nets.models
    if vae_path is not None:
        models["vae"] = AutoencoderKL.from_pretrained(vae_path, local_files_only=True)
    if checkpoint is not None:
        for name in models:
            if (checkpoint / name).is_dir():
                models[name] = type(models[name]).from_pretrained(checkpoint / name, local_files_only=True)
    if "vae" not in config.stages and vae_path is None and checkpoint is None:
        raise TrainingError("vae: a run without the vae stage needs a trained VAE: pass --vae FOLDER")
    for module in models.values():
        module.to(device).requires_grad_(False)
    return nets


def lora_networks(config: TrainConfig, base: Components, checkpoint: Path | None, device: torch.device) -> Networks:
    """The base model, frozen, with a trainable LoRA; a checkpoint holds only the LoRA's weights."""
    lora = config.lora
    models = {"vae": base.vae, "text_encoder": base.text_encoder, "unet": base.unet}
    # Seeded: peft starts each LoRA's A matrix random (B at zero), and one seed must give one run.
    torch.manual_seed(config.seed)
    text_encoder = base.text_encoder if lora.text_encoder else None
    params = add_lora(base.unet, rank=lora.rank, alpha=lora.alpha, text_encoder=text_encoder)
    if checkpoint is not None:
        set_peft_model_state_dict(base.unet, load_file(checkpoint / "unet_lora.safetensors"), adapter_name=ADAPTER)
        if text_encoder is not None:
            set_peft_model_state_dict(text_encoder, load_file(checkpoint / "text_encoder_lora.safetensors"), adapter_name=ADAPTER)
    for module in models.values():
        module.to(device)
    return Networks(models, noise_scheduler(config, base.scheduler_config), base.tokenizer, params)


def device_name(device: torch.device) -> str:
    """What the card's Compute line names: "cuda (NVIDIA H100 80GB HBM3)", or "cpu"."""
    return f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def speed_up(nets: Networks, device: torch.device, compile_models: bool) -> None:
    """On CUDA, convolutions in channels-last layout (cuDNN's fastest for them); ``compile``: torch.compile
    of the UNet and VAE forwards, in place so that weights keep their names."""
    for name in ("unet", "vae"):
        module = nets.models[name]
        if device.type == "cuda":
            module.to(memory_format=torch.channels_last)
        if compile_models:
            module.compile()


@contextmanager
def contiguous(models: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Weights in the standard layout while they are written: safetensors' ``save_file`` (LoRA checkpoints and
    exports) refuses channels-last tensors, and checkpoints load back in the standard layout anyway."""
    convolutional = [m for m in models.values() if any(p.dim() == 4 and not p.is_contiguous() for p in m.parameters())]
    for module in convolutional:
        module.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        for module in convolutional:
            module.to(memory_format=torch.channels_last)
