"""Diffusers folders of the transformer families (SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein): their parts,
by the family table.

What is in the folder is read with diffusers' and transformers' own ``from_pretrained``, offline; the
family's row says which class each part is and which text encoders it may go without.
"""

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from lienzo.errors import ModelFileError
from lienzo.models import formats
from lienzo.models.components import Components, vae_dtype_for
from lienzo.models.families import FAMILIES, PIPELINE_FAMILIES, Family, is_distilled
from lienzo.models.quiet import first_line, quiet_transformers
from lienzo.models.tokenizers import folder_tokenizer


def transformer_family(index: dict) -> Family | None:
    """The transformer family a ``model_index.json`` names by its pipeline class, or None (a U-Net family)."""
    # A folder saved from the family's img2img or inpaint pipeline holds the same parts.
    pipeline = str(index.get("_class_name", "")).replace("Img2Img", "").replace("Inpaint", "")
    name = PIPELINE_FAMILIES.get(pipeline)
    return None if name is None else FAMILIES[name]


def diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def transformers_class(name: str):
    return getattr(importlib.import_module("transformers"), name)


def load_transformer_folder(
    path: Path,
    spec: Family,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """A transformer family's pipeline folder (``StableDiffusion3Pipeline``, ``FluxPipeline``, ...): transformer,
    VAE, text encoders and tokenizers, and the scheduler's config (shift, dynamic shifting) as the folder states it."""
    local = {"local_files_only": True}
    try:
        transformer = diffusers_class(spec.network_class).from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **local)
        formats.stop_if_cancelled(cancel)
        vae_class = diffusers_class(spec.vae_class)
        vae_config = vae_class.load_config(path, subfolder="vae", **local)
        vae = vae_class.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype_for(vae_config, dtype, vae_dtype), **local)
        parts: dict = {}
        with quiet_transformers():
            for slot in spec.text_encoders:
                formats.stop_if_cancelled(cancel)
                if not (path / slot.component).is_dir():
                    if slot.optional:
                        continue
                    raise ModelFileError(
                        f"model {path.name}: the {spec.label} folder has no {slot.component}/ ({slot.kind}), which this family needs"
                    )
                encoder = transformers_class(slot.model_class).from_pretrained(path, subfolder=slot.component, torch_dtype=dtype, **local)
                parts[slot.component] = encoder.eval()
                parts[slot.tokenizer] = folder_tokenizer(path / slot.tokenizer, slot, encoder)
            # The image processor of the Qwen2VLProcessor the pipeline reads the images with (its tokenizer is tokenizer/'s:
            # the processor itself cannot be built without torchvision, for the video processor it checks for).
            if spec.prompt_images:
                if not (path / "processor").is_dir():
                    raise ModelFileError(f"model {path.name}: the {spec.label} folder has no processor/, which this family needs")
                parts["image_processor"] = transformers_class("AutoImageProcessor").from_pretrained(path / "processor", **local)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelFileError(f"cannot load the diffusers folder {path}: {first_line(err)}") from None
    schedule = dict(spec.scheduler)
    index = formats.read_model_index(path)
    layers = index.get("text_encoder_select_layers")  # Krea2Pipeline's; None: its own default
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        schedule.update({k: v for k, v in formats.read_json_file(scheduler_file).items() if not k.startswith("_")})
    return Components(
        unet=None,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler_config=schedule,
        family=spec.name,
        is_distilled=is_distilled(spec, index=index),
        text_encoder_layers=None if layers is None else tuple(layers),
        name=path.name,
        source=path,
        **parts,
    )
