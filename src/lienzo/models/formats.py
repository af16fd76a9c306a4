"""What is this file? Formats judged by content, safetensors headers, weights-only loading, architecture.

A file's extension says nothing we trust: users rename ``.safetensors`` to ``.ckpt`` and back, and
downloads get cut short. :func:`sniff` reads the first bytes (and, for safetensors, the whole JSON
header) and either names the format or raises :class:`ModelFileError` with a one-line reason.
"""

import json
import math
import pickle
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lienzo.errors import GenerationCancelled, ModelFileError

# The safetensors format itself refuses headers above 100 MB; a bigger number means a damaged file.
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
# A valid header nests 3 deep (header, tensor entry, shape); json.loads recurses once per level, so a
# damaged one nested thousands deep would raise RecursionError instead of a one-line reason.
_MAX_HEADER_NESTING = 8
# Bits per element of every safetensors dtype, to check that each tensor's byte range fits its shape.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# model_index.json and scheduler_config.json are a few hundred bytes; a bigger one is not what it says.
_MAX_CONFIG_BYTES = 1024 * 1024

# Pickle protocols 2-5 start with the PROTO opcode (0x80) and the protocol number; torch's legacy
# (pre-1.6) .ckpt format is a protocol-2 pickle stream.
_PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in (2, 3, 4, 5))
_ZIP_START = b"PK\x03\x04"
_GGUF_MAGIC = b"GGUF"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_UNET_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
_VAE_CONV_IN = VAE_PREFIX + "encoder.conv_in.weight"
_SD1_CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD2_OPEN_CLIP = "cond_stage_model.model.token_embedding.weight"
_SDXL_CLIP = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model.token_embedding.weight"
# SDXL's refiner has bigG alone, so it is SGM's first (only) text embedder.
_SDXL_REFINER_OPEN_CLIP = "conditioner.embedders.0.model.token_embedding.weight"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """What a single-file checkpoint holds, read from tensor names and shapes alone."""

    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    inpainting: bool  # UNet input conv takes 9 channels: latents + mask + masked-image latents
    in_channels: int
    context_dim: int  # width of the text embeddings the UNet cross-attends to

    @property
    def label(self) -> str:
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}[self.family]
        return f"{name} inpainting" if self.inpainting else name


def stop_if_cancelled(cancel: Callable[[], bool] | None) -> None:
    """Raise GenerationCancelled when ``cancel`` says so; loaders call it between their long steps."""
    if cancel is not None and cancel():
        raise GenerationCancelled


def sniff(path) -> str:
    """Name a model file's format by its content: "safetensors", "gguf", "torch-zip", "pickle" or "diffusers-folder".

    Only a regular file is opened: a FIFO would block the reader and a device never end.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            read_model_index(path)
            return "diffusers-folder"
        raise ModelFileError(f"{path} is a folder without model_index.json, so not a diffusers model folder")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"{path} is not a regular file or model folder")
    size = info.st_size
    if size == 0:
        raise ModelFileError(f"{path.name} is empty (0 bytes); the download or copy probably failed")
    with path.open("rb") as f:
        head = f.read(9)
    # Safetensors first: its 8-byte header length can itself begin with 0x80 0x02 (a 640-byte header).
    if len(head) == 9 and head[8:9] == b"{":
        _read_safetensors_header(path)
        return "safetensors"
    if head.startswith(_GGUF_MAGIC):
        read_gguf_header(path)
        return "gguf"
    if head.startswith(_ZIP_START):
        return "torch-zip"
    if head.startswith(_PICKLE_STARTS):
        return "pickle"
    raise ModelFileError(
        f"{path.name} is not a model file lienzo knows: expected safetensors, GGUF, a PyTorch checkpoint "
        "(.ckpt/.pt) or a diffusers folder"
    )


def read_json_file(path: Path) -> dict:
    """A small JSON object file of a model folder (``model_index.json``, a scheduler config), or a one-line error."""
    label = f"{path.parent.name}/{path.name}"
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{label} is not a regular file")
        if info.st_size > _MAX_CONFIG_BYTES:
            raise ModelFileError(f"{label} has {info.st_size:,} bytes; a model config has a few hundred")
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise ModelFileError(f"cannot read {label}: {err.strerror or err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFileError(f"{label} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{label} is not a JSON object")
    return data


def read_model_index(folder: Path) -> dict:
    """A diffusers folder's ``model_index.json``, checked to be a JSON object."""
    return read_json_file(Path(folder) / "model_index.json")


def is_refiner_index(index: dict) -> bool:
    """Whether a U-Net folder's ``model_index.json`` is SDXL's refiner's: a text_encoder_2 and no text_encoder
    (StableDiffusionXLImg2ImgPipeline writes the missing one as ``[null, null]``)."""
    return index.get("text_encoder_2") not in (None, [None, None]) and index.get("text_encoder") in (None, [None, None])


def read_header(path) -> dict[str, tuple[Shape, str]]:
    """Tensor name -> (shape, safetensors dtype such as "F16") without reading any tensor data."""
    header = _safetensors_header(Path(path))
    return {
        name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items() if name != "__metadata__"
    }


def read_gguf_header(path) -> dict[str, tuple[Shape, str]]:
    """Tensor name -> (shape, GGML type such as "Q8_0" or "F16") of a GGUF file, without reading tensor data.

    GGUF lists dimensions fastest-first (ggml's order); the shapes here are reversed to torch's order.
    The reader maps the file and checks that every tensor's bytes lie inside it.
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    # The reader raises ValueError for a bad magic, version or a tensor running past the end of the file,
    # and numpy's errors (also ValueErrors, or IndexError) for fields cut short.
    except (ValueError, IndexError, OSError) as err:
        raise ModelFileError(f"{path.name} is truncated or damaged: its GGUF header cannot be read ({err})") from None
    return {
        tensor.name: (tuple(int(n) for n in reversed(tensor.shape)), tensor.tensor_type.name) for tensor in reader.tensors
    }


def read_metadata(path) -> dict[str, str]:
    """The free-form ``__metadata__`` strings of a safetensors file (``modelspec.*``, trainer notes)."""
    return dict(_safetensors_header(Path(path)).get("__metadata__") or {})


def load_pickle_dict(path: Path, what: str = "") -> dict:
    """A PyTorch file's top-level dictionary, read weights-only: lienzo never runs code from a model file. Every
    reader of .pth/.pt/.bin/.ckpt files comes here, so all refuse the same way; ``what`` (``upscaler``, ...) leads
    the errors."""
    lead = f"{what}: " if what else ""
    try:
        # An open file, not the path: torch >= 2.13 routes any path ending in .safetensors to
        # safetensors by its name, and a torch file renamed so would fail there.
        with path.open("rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch raises this both for forbidden globals (code) and for damaged pickle streams.
        raise ModelFileError(
            f"{lead}lienzo refuses to load {path.name}: it holds Python objects or code besides tensors (or is damaged), "
            "and lienzo never runs code from model files; convert it to .safetensors with a tool you trust"
        ) from err
    # A damaged pickle stream fails in whichever reader meets the damage first (struct: a cut-off record).
    except (RuntimeError, OSError, EOFError, ValueError, IndexError, struct.error) as err:
        raise ModelFileError(f"{lead}cannot read {path.name}: damaged or not a PyTorch checkpoint ({err})") from err
    if not isinstance(loaded, dict):
        raise ModelFileError(f"{lead}{path.name} holds a {type(loaded).__name__}, not a dictionary of tensors")
    return loaded


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, on CPU. Pickles are read weights-only, never executed."""
    path = Path(path)
    kind = sniff(path)
    if kind == "diffusers-folder":
        raise ModelFileError(f"{path.name} is a diffusers folder, not a single checkpoint file")
    if kind == "gguf":
        # Its tensors are mostly quantized blocks that only a quantization-aware loader can use.
        raise ModelFileError(f"{path.name} is a GGUF file, which lienzo reads only as an SD 3.x or Flux.1 transformer or a T5 encoder")
    if kind == "safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ModelFileError(f"cannot read {path.name}: {err}") from err
    loaded = load_pickle_dict(path)
    # Lightning-era .ckpt files wrap the weights next to epoch counters and optimizer state.
    if isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    tensors = {key: value for key, value in loaded.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path.name} holds no tensors")
    return tensors


def detect_architecture(shapes: dict[str, Shape], *, name: str = "this file") -> Architecture:
    """Tell SD 1.x, 2.x, XL and the XL refiner (and their inpainting variants) apart from ldm tensor names and shapes."""
    if _UNET_CONV_IN not in shapes or _VAE_CONV_IN not in shapes:
        raise ModelFileError(f"{name} is not a Stable Diffusion 1.x/2.x/XL checkpoint: {_what_it_looks_like(shapes)}")
    in_channels = _width(shapes, _UNET_CONV_IN, name)
    has_label_emb = _UNET_LABEL_EMB in shapes
    if _SDXL_CLIP in shapes and _SDXL_OPEN_CLIP in shapes and has_label_emb:
        family, context_dim = "sdxl", _width(shapes, _SDXL_CLIP, name) + _width(shapes, _SDXL_OPEN_CLIP, name)
    elif _SDXL_REFINER_OPEN_CLIP in shapes and has_label_emb:
        family, context_dim = "sdxl_refiner", _width(shapes, _SDXL_REFINER_OPEN_CLIP, name)
    elif _SD2_OPEN_CLIP in shapes and not has_label_emb:
        family, context_dim = "sd2", _width(shapes, _SD2_OPEN_CLIP, name)
    elif _SD1_CLIP in shapes and not has_label_emb:
        family, context_dim = "sd1", _width(shapes, _SD1_CLIP, name)
    else:
        raise ModelFileError(
            f"{name} is not a Stable Diffusion 1.x/2.x/XL checkpoint: it has a UNet and VAE but its text encoders "
            "or class embedding match none of them (unCLIP and upscaler models are not supported)"
        )
    return Architecture(family=family, inpainting=in_channels == 9, in_channels=in_channels, context_dim=context_dim)


def _width(shapes: dict[str, Shape], key: str, name: str) -> int:
    """Dimension 1 of ``key``'s tensor: the input channels of a conv, the width of an embedding."""
    shape = shapes[key]
    if len(shape) < 2:
        raise ModelFileError(f"{name} is damaged: its tensor {key} has shape {list(shape)}, not 2 or more dimensions")
    return shape[1]


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
    """Parse and check the JSON header as the safetensors library does before it reads any tensor: an
    8-byte little-endian length, a JSON object (nested no deeper than a header can be), every tensor with
    a known dtype, a shape of non-negative integers and a byte range that holds exactly that shape, the
    ranges one after another without overlap or gap, covering all the data after the header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        first = f.read(8)
        length = struct.unpack("<Q", first)[0] if len(first) == 8 else size
        if length > size - 8 or length > SAFETENSORS_MAX_HEADER:
            raise ModelFileError(
                f"{path.name} is truncated or damaged: its safetensors header claims {length} bytes "
                f"but the file has {size} bytes in all; download or copy it again"
            )
        raw = f.read(length)
    if _nested_too_deep(raw):
        raise _damaged(path, f"brackets nested more than {_MAX_HEADER_NESTING} deep, or unbalanced")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, f"not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "not a JSON object")
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _damaged(path, "__metadata__ is not an object of strings")
            continue
        ranges.append((*_tensor_range(path, key, entry), key))
    data_size = size - 8 - length
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise _damaged(path, f"the byte range of {key!r} {what}")
        end = stop
    if end > data_size:
        raise ModelFileError(
            f"{path.name} is truncated: its tensors need {end} bytes of data but only {data_size} are there; "
            "download or copy it again"
        )
    if end < data_size:
        raise _damaged(path, f"{data_size - end} bytes after the last tensor belong to none")
    return header


def _tensor_range(path: Path, key: str, entry) -> tuple[int, int]:
    """A header entry's data range, once its dtype, shape and range are checked against each other."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _damaged(path, f"entry {key!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BITS:
        raise _damaged(path, f"entry {key!r} has the unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise _damaged(path, f"entry {key!r} has the shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)) or offsets[0] > offsets[1]:
        raise _damaged(path, f"entry {key!r} has the data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits != 8 * (offsets[1] - offsets[0]):
        raise _damaged(
            path, f"entry {key!r} is a {dtype} tensor of shape {shape} in {offsets[1] - offsets[0]} bytes, which it does not fill"
        )
    return offsets[0], offsets[1]


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nested_too_deep(raw: bytes) -> bool:
    """Whether the JSON text may nest deeper than the limit (or its brackets do not pair), judged without
    recursion: strings removed, each pass strips the innermost bracket pairs, at least one level a pass."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(_MAX_HEADER_NESTING):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return bool(brackets)


def _damaged(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"{path.name} has a damaged safetensors header ({why})")
