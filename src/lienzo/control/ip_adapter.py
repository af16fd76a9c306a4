"""IP-Adapter (image prompts): its files, the CLIP vision encoder it reads pictures with, and the embeddings.

An IP-Adapter (Ye et al. 2023) adds a second key/value projection to each cross-attention layer of the U-Net:
the layer attends to the text and, beside it, to a few "image tokens" that a small projection makes from a
CLIP vision embedding of the reference picture. sd-webui-controlnet runs it as a ControlNet unit: the module
(``ip-adapter_clip_sd15``, ...) names the CLIP encoder, the model names the adapter file. The maths is
diffusers': its converters build the image projection (``_convert_ip_adapter_image_proj_to_diffusers``) and
the attention processors (``_convert_ip_adapter_attn_to_diffusers``) from the original key names, and the
embeddings are made as its pipelines' ``prepare_ip_adapter_image_embeds`` makes them. What lienzo adds is
reading the files people have (weights-only, the .bin's nested dictionaries too), finding the encoder in
``<models dir>/clip_vision`` under ComfyUI's and A1111's names with its config read from tensor shapes (so
nothing is downloaded), and checking that an adapter fits the loaded U-Net before it touches it.

Applying the adapter to the U-Net is :mod:`lienzo.generation.control`'s work: the loaded pieces here never
change the U-Net, so a later job without an image prompt gets the U-Net exactly as it was.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lienzo.errors import ModelFileError
from lienzo.images.io import flatten
from lienzo.models import formats

CLIP_VISION_FOLDER = "clip_vision"
_PARTS = ("image_proj", "ip_adapter")

# The encoders the extension's modules run, and the files each is kept as: ComfyUI's names (its IP-Adapter
# docs), the extension's own downloads (clip_h.pth, clip_g.pth) and Stability's clip_vision_g.
ENCODER_FILES = {
    "ViT-H": ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_h.pth", "clip_vision_h.safetensors"),
    "ViT-bigG": ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "clip_vision_g.safetensors", "clip_g.pth"),
}
# sd-webui-controlnet's modules and the encoder each runs; ip-adapter-auto picks by the model's name.
MODULE_ENCODERS = {"ip-adapter_clip_sd15": "ViT-H", "ip-adapter_clip_sdxl": "ViT-bigG", "ip-adapter_clip_sdxl_plus_vith": "ViT-H"}
AUTO_MODULE = "ip-adapter-auto"
# A transformers folder's config says which encoder it holds by its width.
_WIDTH_ENCODERS = {1280: "ViT-H", 1664: "ViT-bigG"}
# Head counts leave no trace in the weights: OpenCLIP's ViT-H and bigG and OpenAI's ViT-L have 16 heads,
# ViT-B 12; a width outside the table (a test's tiny encoder) gets heads of 64 channels.
_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_HEAD_WIDTH = 64
# OpenAI's ViT-L/14 (1024 wide, 24 layers) uses quick_gelu; the LAION encoders IP-Adapters read use gelu.
_QUICK_GELU = (1024, 24)
# Cross-attention widths: which family an adapter's key/value projections were made for.
_CROSS_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_IP_KEY = re.compile(r"(\d+)\.to_([kv])_ip\.weight")
# The tensors each image projection layout must have (the original repository's names).
_PLAIN_KEYS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_PLUS_KEYS = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight")
_FULL_KEYS = ("proj.0.weight", "proj.2.weight", "proj.3.weight")


@dataclass(eq=False)
class IPAdapter:
    """An adapter file made ready for one U-Net: diffusers' image projection and, per cross-attention layer
    (by attention processor name), a processor holding this adapter's key/value projections."""

    name: str
    layout: str  # "plain" (pooled image embedding), "plus" (resampler) or "full" (all patch tokens)
    projection: torch.nn.Module
    processors: dict[str, torch.nn.Module]
    embed_width: int  # the width of the CLIP output it takes: projection_dim (plain) or hidden_size

    @property
    def reads_hidden_states(self) -> bool:
        """Plus and full adapters read the encoder's penultimate hidden states, plain ones its image embedding."""
        return self.layout != "plain"


# --- reading files -------------------------------------------------------------------------------


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a .safetensors (``image_proj.*``, ``ip_adapter.*`` keys)
    or a pickle (those keys, or the original .bin's nested dictionaries), read weights-only."""
    path = Path(path)
    flat = formats.load_state_dict(path) if formats.sniff(path) == "safetensors" else _flat_pickle(path)
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in _PARTS}
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        if part in parts:
            parts[part][rest] = tensor
    describe(path.name, {f"{part}.{key}": tuple(t.shape) for part, tensors in parts.items() for key, t in tensors.items()})
    return parts


def _flat_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled adapter's tensors, with the nested dictionaries of the original .bin flattened to dotted keys.
    :func:`lienzo.models.formats.load_state_dict` keeps only top-level tensors, which such a .bin has none of."""
    loaded = formats.load_pickle_dict(path)
    flat = {}
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif isinstance(value, dict):
            flat |= {f"{key}.{inner}": t for inner, t in value.items() if isinstance(t, torch.Tensor)}
    return flat


def nested_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes of a pickled IP-Adapter in the original nested layout, with dotted keys; None when the
    file is no such pickle. (A listing's shape reader sees no tensors at its top level.)"""
    if formats.sniff(path) == "safetensors":
        return None
    flat = _flat_pickle(path)
    if not any(key.startswith(("image_proj.", "ip_adapter.")) for key in flat):
        return None
    return {key: tuple(t.shape) for key, t in flat.items()}


def describe(name: str, shapes: dict) -> str | None:
    """The family (``sd1``, ``sd2``, ``sdxl``; None when the width is not a released one) of an IP-Adapter file
    from its tensor names and shapes (``image_proj.*``, ``ip_adapter.*``); an incomplete one is a ModelFileError."""
    proj = {key.removeprefix("image_proj."): shape for key, shape in shapes.items() if key.startswith("image_proj.")}
    layers = {key.removeprefix("ip_adapter."): shape for key, shape in shapes.items() if key.startswith("ip_adapter.")}
    layout = _layout(name, proj, layers)
    wanted = {"plain": _PLAIN_KEYS, "plus": _PLUS_KEYS, "full": _FULL_KEYS}.get(layout, ())
    missing = [f"image_proj.{key}" for key in wanted if key not in proj]
    pairs = {}
    for key in layers:
        match = _IP_KEY.fullmatch(key)
        if match:
            pairs.setdefault(int(match[1]), set()).add(match[2])
    missing += [f"ip_adapter.{n}.to_{'v' if kinds == {'k'} else 'k'}_ip.weight" for n, kinds in sorted(pairs.items()) if len(kinds) < 2]
    if not pairs:
        missing.append("ip_adapter.N.to_k_ip.weight / to_v_ip.weight")
    if missing:
        raise ModelFileError(f"{name} is an incomplete IP-Adapter: it lacks {', '.join(missing[:3])}")
    first = layers[f"{min(pairs)}.to_k_ip.weight"]
    return _CROSS_FAMILIES.get(first[1])


def _layout(name: str, proj: dict, layers: dict) -> str:
    """The image projection's kind, as diffusers' converter tells them apart; "faceid" for the FaceID adapters
    (their projection, or the LoRA they carry beside the attention weights)."""
    if "perceiver_resampler.proj_in.weight" in proj or any("lora" in key for key in layers):
        return "faceid"
    if "proj.weight" in proj:
        return "plain"
    if "proj.3.weight" in proj:
        return "full"
    if "norm.weight" in proj and "proj.0.weight" in proj:
        return "faceid"
    if "latents" in proj:
        return "plus"
    raise ModelFileError(f"{name} is an IP-Adapter whose image_proj tensors ({', '.join(sorted(proj)[:3]) or 'none'}) match no known layout")


# --- loading -------------------------------------------------------------------------------------


def load_ip_adapter(path: Path, unet, *, dtype=None, device=None) -> IPAdapter:
    """The adapter at ``path`` made ready for ``unet`` (a UNet2DConditionModel), on ``device`` in ``dtype``
    (default: the U-Net's). ``unet`` is read, not changed. FaceID adapters and adapters for another family's
    cross-attention are refused with a ModelFileError saying why."""
    path = Path(path)
    dtype = dtype or unet.dtype
    device = device or unet.device
    parts = read_ip_adapter(path)
    layout = _layout(path.name, parts["image_proj"], parts["ip_adapter"])
    if layout == "faceid":
        raise ModelFileError(
            f"{path.name} is a FaceID IP-Adapter: it reads an insightface face embedding, and insightface (with its "
            "face detection models) is not part of lienzo, so it cannot be applied; use a plain, plus or full-face IP-Adapter"
        )
    if unet.encoder_hid_proj is not None:
        raise ModelFileError(f"{path.name}: the loaded model's U-Net already projects its text input, which an IP-Adapter would replace")
    _check_fit(path.name, parts["ip_adapter"], unet)
    try:
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(parts["image_proj"])
        # diffusers builds a processor for every attention layer; only the cross-attention ones hold the adapter.
        processors = {
            name: processor.to(device=device, dtype=dtype)
            for name, processor in unet._convert_ip_adapter_attn_to_diffusers([parts]).items()
            if hasattr(processor, "to_k_ip")
        }
    except (KeyError, RuntimeError, ValueError) as err:
        raise ModelFileError(f"{path.name}: its tensors do not fit diffusers' IP-Adapter layers ({err})") from None
    proj = parts["image_proj"]
    width = {"plain": proj.get("proj.weight"), "plus": proj.get("proj_in.weight"), "full": proj.get("proj.0.weight")}[layout]
    embed_width = width.shape[0] if layout == "full" else width.shape[1]
    return IPAdapter(path.stem, layout, projection.to(device=device, dtype=dtype).eval(), processors, embed_width)


def _check_fit(name: str, layers: dict, unet) -> None:
    """One key/value pair per cross-attention layer of the U-Net, in its order, of its widths."""
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    pairs = sorted({int(m[1]) for key in layers if (m := _IP_KEY.fullmatch(key))})
    wanted_cross = unet.config.cross_attention_dim
    got_cross = layers[f"{pairs[0]}.to_k_ip.weight"].shape[1]
    # The original numbering: 1, 3, 5, ... over the attention layers (the even numbers were the self-attention's).
    if pairs != list(range(1, 2 * len(cross), 2)) or got_cross != wanted_cross:
        family = _CROSS_FAMILIES.get(got_cross)
        what = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}.get(family, "an")
        raise ModelFileError(
            f"{name} is {what} IP-Adapter ({len(pairs)} cross-attention layers {got_cross} wide) and does not fit the loaded "
            f"model ({len(cross)} layers {wanted_cross} wide)"
        )


# --- the CLIP vision encoder ---------------------------------------------------------------------


def encoder_for(module: str, model_name: str) -> str:
    """"ViT-H" or "ViT-bigG": the encoder a module runs; ip-adapter-auto's choice by the model's name, as the
    extension's preset table has it (SDXL adapters read bigG unless their name says vit-h)."""
    if module != AUTO_MODULE:
        return MODULE_ENCODERS[module]
    name = model_name.lower()
    return "ViT-bigG" if "sdxl" in name and "vit-h" not in name else "ViT-H"


def find_image_encoder(models_dir: Path, encoder: str) -> Path:
    """The file (or transformers folder) of ``encoder`` in ``<models dir>/clip_vision``, by its known names in any
    case, else a folder whose config is that encoder's width. Missing: a ModelFileError naming the files."""
    models_dir = Path(models_dir)
    folders = sorted(d for d in models_dir.iterdir() if d.is_dir() and d.name.lower() == CLIP_VISION_FOLDER) if models_dir.is_dir() else []
    folder = folders[0] if folders else None
    if folder is not None:
        present = {p.name.lower(): p for p in folder.iterdir()}
        for known in ENCODER_FILES[encoder]:
            # The file, or a transformers folder of that name without the extension.
            found = present.get(known.lower()) or present.get(Path(known).stem.lower())
            if found is not None:
                return found
        for config in sorted(folder.glob("*/config.json")):
            settings = formats.read_json_file(config)
            if _WIDTH_ENCODERS.get(settings.get("hidden_size", settings.get("vision_config", {}).get("hidden_size"))) == encoder:
                return config.parent
    where = folder or models_dir / CLIP_VISION_FOLDER
    raise ModelFileError(
        f"the IP-Adapter needs the CLIP {encoder} image encoder: put {' or '.join(ENCODER_FILES[encoder])} in {where}; "
        "lienzo never downloads it"
    )


def load_image_encoder(path: Path, *, dtype=torch.float32, device="cpu"):
    """A ``CLIPVisionModelWithProjection`` from a transformers folder (its config.json) or a single file with
    transformers' names, whose config is read from the tensor shapes."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModelWithProjection

    from lienzo.models.single_file_load import _assign_weights

    path = Path(path)
    if path.is_dir():
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ModelFileError(f"cannot load the CLIP vision folder {path}: {err}") from None
        return model.to(device).eval()
    state_dict = {k: t for k, t in formats.load_state_dict(path).items() if not k.endswith("position_ids")}
    config = _vision_config(path.name, state_dict)
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(config)
    return _assign_weights(model, state_dict, "CLIP vision", path.name, dtype).to(device)


def _vision_config(name: str, sd: dict):
    """transformers' CLIPVisionConfig for a file with its names: widths, depth, patch and picture size from the
    shapes; heads and activation from the table of released encoders (see _HEADS, _QUICK_GELU)."""
    from transformers import CLIPVisionConfig

    patch = sd.get("vision_model.embeddings.patch_embedding.weight")
    if patch is None or "visual_projection.weight" not in sd:
        raise ModelFileError(
            f"{name} is not a CLIP vision encoder with transformers' names (vision_model.*, visual_projection.weight)"
        )
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["visual_projection.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_HEADS.get(hidden, max(1, hidden // _HEAD_WIDTH)),
        num_channels=channels,
        patch_size=patch_size,
        image_size=math.isqrt(positions - 1) * patch_size,  # a class token, then a square of patches
        hidden_act="quick_gelu" if (hidden, layers) == _QUICK_GELU else "gelu",
    )


def encode_image(encoder, picture: Image.Image, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) embeddings of ``picture``, as diffusers' ``encode_image``: CLIP's preprocessing
    at the encoder's size, then the image embedding (1 x D) and zeros, or the penultimate hidden states
    (1 x tokens x D) of the picture and of an all-zero picture."""
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size
    pixels = CLIPImageProcessor(size=size, crop_size=size)(flatten(picture), return_tensors="pt").pixel_values
    pixels = pixels.to(device=encoder.device, dtype=encoder.dtype)
    with torch.no_grad():
        if not hidden_states:
            embeds = encoder(pixels).image_embeds
            return embeds, torch.zeros_like(embeds)
        cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return cond, uncond
