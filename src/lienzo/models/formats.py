"""What is this file? Formats judged by content, safetensors headers, weights-only loading, architecture.

A file's extension says nothing we trust: users rename ``.safetensors`` to ``.ckpt`` and back, and
downloads get cut short. :func:`sniff` reads the first bytes (and, for safetensors, the whole JSON
header) and either names the format or raises :class:`ModelFileError` with a one-line reason.
"""

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lienzo.errors import ModelFileError

# The safetensors format itself refuses headers above 100 MB; a bigger number means a damaged file.
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024

# Pickle protocols 2-5 start with the PROTO opcode (0x80) and the protocol number; torch's legacy
# (pre-1.6) .ckpt format is a protocol-2 pickle stream.
_PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in (2, 3, 4, 5))
_ZIP_START = b"PK\x03\x04"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_UNET_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
_VAE_CONV_IN = VAE_PREFIX + "encoder.conv_in.weight"
_SD1_CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD2_OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
_SDXL_CLIP = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model.token_embedding.weight"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """What a single-file checkpoint holds, read from tensor names and shapes alone."""

    family: str  # "sd1" | "sd2" | "sdxl"
    inpainting: bool  # UNet input conv takes 9 channels: latents + mask + masked-image latents
    in_channels: int
    context_dim: int  # width of the text embeddings the UNet cross-attends to

    @property
    def label(self) -> str:
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.family]
        return f"{name} inpainting" if self.inpainting else name


def sniff(path) -> str:
    """Name a model file's format by its content: "safetensors", "torch-zip", "pickle" or "diffusers-folder"."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers-folder"
        raise ModelFileError(f"{path} is a folder without model_index.json, so not a diffusers model folder")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path.name} is empty (0 bytes); the download or copy probably failed")
    with path.open("rb") as f:
        head = f.read(9)
    # Safetensors first: its 8-byte header length can itself begin with 0x80 0x02 (a 640-byte header).
    if len(head) == 9 and head[8:9] == b"{":
        _read_safetensors_header(path)
        return "safetensors"
    if head.startswith(_ZIP_START):
        return "torch-zip"
    if head.startswith(_PICKLE_STARTS):
        return "pickle"
    raise ModelFileError(
        f"{path.name} is not a model file lienzo knows: expected safetensors, a PyTorch checkpoint "
        "(.ckpt/.pt) or a diffusers folder"
    )


def read_header(path) -> dict[str, tuple[Shape, str]]:
    """Tensor name -> (shape, safetensors dtype such as "F16") without reading any tensor data."""
    header = _safetensors_header(Path(path))
    return {
        name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items() if name != "__metadata__"
    }


def read_metadata(path) -> dict[str, str]:
    """The free-form ``__metadata__`` strings of a safetensors file (``modelspec.*``, trainer notes)."""
    return dict(_safetensors_header(Path(path)).get("__metadata__") or {})


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, on CPU. Pickles are read weights-only, never executed."""
    path = Path(path)
    kind = sniff(path)
    if kind == "diffusers-folder":
        raise ModelFileError(f"{path.name} is a diffusers folder, not a single checkpoint file")
    if kind == "safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ModelFileError(f"cannot read {path.name}: {err}") from err
    try:
        # An open file, not the path: torch >= 2.13 routes any path ending in .safetensors to
        # safetensors by its name, and a torch file renamed so would fail there.
        with path.open("rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch raises this both for forbidden globals (code) and for damaged pickle streams.
        raise ModelFileError(
            f"lienzo refuses to load {path.name}: it holds Python objects or code besides tensors (or is damaged), "
            "and lienzo never runs code from model files; convert it to .safetensors with a tool you trust"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ModelFileError(f"cannot read {path.name}: damaged or not a PyTorch checkpoint ({err})") from err
    # Lightning-era .ckpt files wrap the weights next to epoch counters and optimizer state.
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{path.name} holds a {type(loaded).__name__}, not a dictionary of tensors")
    tensors = {key: value for key, value in loaded.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path.name} holds no tensors")
    return tensors


def detect_architecture(shapes: dict[str, Shape], *, name: str = "this file") -> Architecture:
    """Tell SD 1.x, 2.x and XL (and their inpainting variants) apart from ldm tensor names and shapes."""
    if _UNET_CONV_IN not in shapes or _VAE_CONV_IN not in shapes:
        raise ModelFileError(f"{name} is not a Stable Diffusion 1.x/2.x/XL checkpoint: {_what_it_looks_like(shapes)}")
    in_channels = shapes[_UNET_CONV_IN][1]
    has_label_emb = _UNET_LABEL_EMB in shapes
    if _SDXL_CLIP in shapes and _SDXL_OPEN_CLIP in shapes and has_label_emb:
        family, context_dim = "sdxl", shapes[_SDXL_CLIP][1] + shapes[_SDXL_OPEN_CLIP][1]
    elif _SD2_OPEN_CLIP in shapes and not has_label_emb:
        family, context_dim = "sd2", shapes[_SD2_OPEN_CLIP][1]
    elif _SD1_CLIP in shapes and not has_label_emb:
        family, context_dim = "sd1", shapes[_SD1_CLIP][1]
    else:
        raise ModelFileError(
            f"{name} is not a Stable Diffusion 1.x/2.x/XL checkpoint: it has a UNet and VAE but its text encoders "
            "or class embedding match none of them (SDXL refiner, unCLIP and upscaler models are not supported)"
        )
    return Architecture(family=family, inpainting=in_channels == 9, in_channels=in_channels, context_dim=context_dim)


def _what_it_looks_like(shapes: dict[str, Shape]) -> str:
    """A hint for the common mix-ups: a LoRA, VAE or embedding put where checkpoints go."""
    keys = list(shapes)
    if any("lora_" in key or ".lora_down." in key or ".lora_A." in key for key in keys):
        return "it looks like a LoRA; put it in the LoRA folder"
    if any(key.startswith(("encoder.conv_in.", "first_stage_model.encoder.conv_in.")) for key in keys):
        return "it looks like a VAE alone; put it in the VAE folder"
    if any(key in ("emb_params", "string_to_param") or key.startswith("string_to_param.") for key in keys):
        return "it looks like a textual-inversion embedding"
    return f"none of its {len(keys)} tensors is a UNet input layer ({_UNET_CONV_IN})"


def _safetensors_header(path: Path) -> dict:
    if sniff(path) != "safetensors":
        raise ModelFileError(f"{path.name} is not a safetensors file")
    return _read_safetensors_header(path)


def _read_safetensors_header(path: Path) -> dict:
    """Parse and check the JSON header: 8-byte little-endian length, JSON object, offsets inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8 or length > SAFETENSORS_MAX_HEADER:
            raise ModelFileError(
                f"{path.name} is truncated or damaged: its safetensors header claims {length} bytes "
                f"but the file has {size} bytes in all; download or copy it again"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path.name} has a damaged safetensors header (not valid JSON: {err})") from err
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} has a damaged safetensors header (not a JSON object)")
    data_size = size - 8 - length
    needed = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ModelFileError(f"{path.name} has a damaged safetensors header (entry {key!r})")
        try:
            needed = max(needed, int(entry["data_offsets"][1]))
        except (TypeError, IndexError, ValueError) as err:
            raise ModelFileError(f"{path.name} has a damaged safetensors header (entry {key!r})") from err
    if needed > data_size:
        raise ModelFileError(
            f"{path.name} is truncated: its tensors need {needed} bytes of data but only {data_size} are there; "
            "download or copy it again"
        )
    return header
