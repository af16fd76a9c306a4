"""The one place that turns model files into torch modules, with no network access at any point."""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lienzo.errors import ModelFileError
from lienzo.models import formats
from lienzo.models.assembly import assemble, check_t5_option, folder_pieces, plan_memory
from lienzo.models.components import Components, vae_dtype_for
from lienzo.models.quiet import quiet_transformers
from lienzo.models.single_file_layout import scheduler_config_for
from lienzo.models.single_file_load import load_single_file, load_vae_file
from lienzo.models.tokenizers import clip_folder_tokenizer, embedding_rows
from lienzo.models.transformer_loading import load_transformer_folder, transformer_family
from lienzo.safety import find_safety_checker

log = logging.getLogger(__name__)

# The scheduler settings that describe how a model was trained; sampler options come from the sampler table.
_SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "steps_offset", "timestep_spacing", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr",
)


def load_diffusers_folder(
    path: Path,
    *,
    prediction_type: str | None = None,
    dtype=torch.float32,
    vae_dtype: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """A diffusers pipeline folder (``model_index.json`` + one sub-folder per component).

    ``vae_dtype`` None: see :func:`lienzo.models.components.vae_dtype_for`. ``cancel`` is asked
    between components.
    """
    index = formats.read_model_index(path)
    spec = transformer_family(index)
    if spec is not None:
        return load_transformer_folder(path, spec, dtype=dtype, vae_dtype=vae_dtype, cancel=cancel)
    local = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **local)
        formats.stop_if_cancelled(cancel)
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", local_files_only=True, torch_dtype=vae_dtype_for(vae_config, dtype, vae_dtype)
        )
        formats.stop_if_cancelled(cancel)
        # quiet: transformers 5 draws a "Loading weights" bar per encoder, lines in the CLI's one-line errors.
        with quiet_transformers():
            refiner = formats.is_refiner_index(index)
            if refiner:  # bigG alone, in text_encoder_2/: lienzo's first (only) encoder (lienzo.models.families)
                text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **local)
            else:
                text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **local)
            text_encoder_2 = None
            if not refiner and "text_encoder_2" in index and (path / "text_encoder_2").is_dir():
                formats.stop_if_cancelled(cancel)
                text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **local)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelFileError(f"cannot load the diffusers folder {path}: {err}") from None
    if refiner:
        family = "sdxl_refiner"
    else:
        family = "sdxl" if text_encoder_2 is not None else ("sd2" if text_encoder.config.hidden_act == "gelu" else "sd1")
    schedule = scheduler_config_for("epsilon")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        saved = formats.read_json_file(scheduler_file)
        schedule.update({k: saved[k] for k in _SCHEDULE_KEYS if k in saved})
    if prediction_type:
        schedule["prediction_type"] = prediction_type
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        # OpenCLIP encoders (SD 2.x, SDXL's second, the refiner's) pad with "!"; OpenAI CLIP pads with end-of-text.
        tokenizer=clip_folder_tokenizer(
            path / ("tokenizer_2" if refiner else "tokenizer"), text_encoder, "!" if family in ("sd2", "sdxl_refiner") else "<|endoftext|>"
        ),
        scheduler_config=schedule,
        family=family,
        text_encoder_2=text_encoder_2.eval() if text_encoder_2 is not None else None,
        tokenizer_2=clip_folder_tokenizer(path / "tokenizer_2", text_encoder_2, "!") if text_encoder_2 is not None else None,
        name=path.name,
        source=path,
        # Found now, loaded on first use: the checker is 1.2 GB and a policy of "off" never runs it.
        safety_filter=find_safety_checker(path, dtype=dtype),
    )


def _check_vocabularies(components: Components, *, folder: bool) -> None:
    """Refuse a tokenizer whose ids can pass the end of its text encoder's embedding: the model would
    otherwise load, then stop at the first prompt with torch's "index out of range in self"."""
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(components, tokenizer_name), getattr(components, encoder_name)
        if tokenizer is None or encoder is None:
            continue
        tokens, rows = len(tokenizer), embedding_rows(encoder)
        if tokens > rows:
            why = (
                f"its {tokenizer_name}/ and {encoder_name}/ folders come from different models"
                if folder
                else "a single file carries no tokenizer and is read with CLIP's, so this text encoder needs "
                "a diffusers folder with its own tokenizer"
            )
            raise ModelFileError(
                f"model {components.name}: {tokenizer_name} has {tokens:,} tokens "
                f"but {encoder_name}'s embedding has {rows:,} rows; {why}"
            )


def load_components(
    path: Path,
    *,
    vae: Path | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Sequence[Path] = (),
    t5: bool = True,
    models_dir: Path | None = None,
    device: torch.device | str = "cpu",
    low_vram: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Load a checkpoint file or diffusers folder (format judged by content), optionally with another VAE.

    A safetensors or GGUF file holding an SD 3.x or Flux.1 transformer is assembled with its text encoders and
    VAE (:mod:`lienzo.models.assembly`): ``text_encoders`` (``--text-encoder``) and ``vae`` name them, else they
    are found in ``models_dir``'s ComfyUI folders. ``t5`` False leaves SD 3.x's optional T5 out. Models of the
    transformer families are checked to fit in memory on ``device`` (``low_vram``: one part at a time) before
    any tensor is read.

    ``vae_dtype`` None follows ``dtype``, with fp32 beside fp16 for VAEs that overflow in fp16
    (:func:`lienzo.models.components.vae_dtype_for`). Each VAE is read straight in its dtype: read in fp16
    and cast up, an fp32 VAE would keep fp16's rounding. ``cancel`` is asked between the model's parts;
    when it says stop, GenerationCancelled is raised.
    """
    # 1. The model
    path = Path(path)
    kind = formats.sniff(path)
    spec = _transformer_spec(path, kind)
    if text_encoders and (spec is None or kind == "diffusers-folder"):
        raise ModelFileError(
            f"--text-encoder: model {path.name} has its own text encoders; "
            "--text-encoder completes a transformer file (SD 3.x, Flux.1, Chroma, Z-Image)"
        )
    if spec is not None and kind != "diffusers-folder":
        components = assemble(
            path, text_encoders=text_encoders, vae=vae, t5=t5, models_dir=models_dir, dtype=dtype, vae_dtype=vae_dtype,
            device=device, low_vram=low_vram, cancel=cancel,
        )
        _check_vocabularies(components, folder=False)
        return components
    if kind == "diffusers-folder":
        if spec is not None:
            check_t5_option(spec, t5, path.name)
            pieces = folder_pieces(path, spec, t5=t5, dtype=dtype)
            plan_memory(pieces, device, name=f"model {path.name} ({spec.label})", low_vram=low_vram, dtype=dtype)
        components = load_diffusers_folder(path, prediction_type=prediction_type, dtype=dtype, vae_dtype=vae_dtype, cancel=cancel)
        if not t5 and components.text_encoder_3 is not None:
            components.text_encoder_3 = components.tokenizer_3 = None
            log.info("model %s: without its T5-XXL text encoder (--no-t5)", path.name)
    else:
        components = load_single_file(path, prediction_type=prediction_type, dtype=dtype, vae_dtype=vae_dtype, cancel=cancel)
    # 2. Another VAE
    if vae is not None:
        formats.stop_if_cancelled(cancel)
        if vae.is_dir():
            config = AutoencoderKL.load_config(vae, local_files_only=True)
            components.vae = AutoencoderKL.from_pretrained(
                vae, local_files_only=True, torch_dtype=vae_dtype_for(config, dtype, vae_dtype)
            )
        elif spec is not None:
            from lienzo.models.transformer_files import load_flow_vae

            components.vae = load_flow_vae(vae, spec.name, dtype=vae_dtype_for({}, dtype, vae_dtype))
        else:
            # A VAE file does not say which model it was made for; keep the checkpoint's latent scale.
            scaling = components.vae.config.scaling_factor
            # The config read from the tensors leaves force_upcast at AutoencoderKL's default.
            components.vae = load_vae_file(vae, scaling_factor=scaling, dtype=vae_dtype_for({}, dtype, vae_dtype))
        components.vae.eval()
        components.vae_name = vae.stem
    # 3. Tokenizers that fit their text encoders, whichever way they were found
    _check_vocabularies(components, folder=kind == "diffusers-folder")
    return components


def _transformer_spec(path: Path, kind: str):
    """The transformer family (its row) a diffusers folder or a safetensors/GGUF file holds; None for SD 1.x/2.x/XL."""
    if kind == "diffusers-folder":
        return transformer_family(formats.read_model_index(path))
    if kind not in ("safetensors", "gguf"):
        return None
    from lienzo.models.families import FAMILIES
    from lienzo.models.registry import header_tensors
    from lienzo.models.transformer_files import detect_transformer_family

    family = detect_transformer_family({k: shape for k, (shape, _, _) in header_tensors(path, kind).items()})
    return None if family is None else FAMILIES[family]
