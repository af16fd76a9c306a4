"""The one place that turns model files into torch modules, with no network access at any point."""

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lienzo.errors import ModelFileError
from lienzo.models import formats
from lienzo.models.components import Components
from lienzo.models.single_file import bundled_tokenizer, load_single_file, load_vae_file, scheduler_config_for
from lienzo.safety import find_safety_checker

log = logging.getLogger(__name__)

# The scheduler settings that describe how a model was trained; sampler options come from the sampler table.
_SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "steps_offset", "timestep_spacing", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr",
)


def load_diffusers_folder(path: Path, *, prediction_type: str | None = None, dtype=torch.float32) -> Components:
    """A diffusers pipeline folder (``model_index.json`` + one sub-folder per component)."""
    index = json.loads((path / "model_index.json").read_text())
    local = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **local)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **local)
        text_encoder_2 = None
        if "text_encoder_2" in index and (path / "text_encoder_2").is_dir():
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **local)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelFileError(f"cannot load the diffusers folder {path}: {err}") from None
    family = "sdxl" if text_encoder_2 is not None else ("sd2" if text_encoder.config.hidden_act == "gelu" else "sd1")
    schedule = scheduler_config_for("epsilon")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        saved = json.loads(scheduler_file.read_text())
        schedule.update({k: saved[k] for k in _SCHEDULE_KEYS if k in saved})
    if prediction_type:
        schedule["prediction_type"] = prediction_type
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=_folder_tokenizer(path / "tokenizer", family),
        scheduler_config=schedule,
        family=family,
        text_encoder_2=text_encoder_2.eval() if text_encoder_2 is not None else None,
        tokenizer_2=_folder_tokenizer(path / "tokenizer_2", family, second=True) if text_encoder_2 is not None else None,
        name=path.name,
        source=path,
        # Found now, loaded on first use: the checker is 1.2 GB and a policy of "off" never runs it.
        safety_filter=find_safety_checker(path, dtype=dtype),
    )


def _folder_tokenizer(path: Path, family: str, second: bool = False) -> CLIPTokenizer:
    """The folder's own tokenizer, or the bundled CLIP BPE when a folder ships without one."""
    if (path / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    # OpenCLIP encoders (SD 2.x, SDXL's second) pad with "!"; OpenAI CLIP pads with end-of-text.
    return bundled_tokenizer("!" if family == "sd2" or second else "<|endoftext|>")


def load_components(
    path: Path,
    *,
    vae: Path | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
) -> Components:
    """Load a checkpoint file or diffusers folder (format judged by content), optionally with another VAE.

    ``vae_dtype`` None follows ``dtype``, except that beside fp16 a VAE whose config says ``force_upcast``
    (SD 1.x's, SD 2.x's and SDXL's own VAEs) stays in fp32: in fp16 they overflow to NaN (black images).
    A half-precision VAE that overflows anyway decodes again in fp32 (lienzo.generation.vae_decode).
    """
    kind = formats.sniff(path)
    if kind == "diffusers-folder":
        components = load_diffusers_folder(path, prediction_type=prediction_type, dtype=dtype)
    else:
        components = load_single_file(path, prediction_type=prediction_type, dtype=dtype)
    if vae is not None:
        if vae.is_dir():
            components.vae = AutoencoderKL.from_pretrained(vae, local_files_only=True, torch_dtype=dtype)
        else:
            # A VAE file does not say which model it was made for; keep the checkpoint's latent scale.
            scaling = components.vae.config.scaling_factor
            components.vae = load_vae_file(vae, scaling_factor=scaling, dtype=dtype)
        components.vae.eval()
        components.extra["vae_name"] = vae.stem
    if vae_dtype is None:
        upcast = dtype == torch.float16 and components.vae.config.get("force_upcast", True)
        vae_dtype = torch.float32 if upcast else dtype
    if components.vae.dtype != vae_dtype:
        components.vae.to(vae_dtype)
    return components
