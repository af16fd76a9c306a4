"""ControlNet and T2I-Adapter model files: which there are, and loading one into a diffusers model.

People keep these where their other tool wants them: AUTOMATIC1111's sd-webui-controlnet reads
``models/ControlNet``, ComfyUI ``models/controlnet`` and ``models/t2i_adapter``. A file there is in one of
four layouts: a diffusers folder, a single file with diffusers names (``diffusers_xl_canny_full``), a single
file with the original ldm names (lllyasviel's ``control_v11p_sd15_canny.pth``, keys ``input_blocks.*``,
``zero_convs.*``, ``input_hint_block.*``, sometimes under ``control_model.``), or TencentARC's original
T2I-Adapter layout (``body.*``, ``conv_in.*``). IP-Adapters (``image_proj.*`` and ``ip_adapter.*``, kind
"ip_adapter") are listed and found here too, from ``models/ControlNet`` as the extension has them or ComfyUI's
``models/ipadapter``; they are loaded by :mod:`lienzo.control.ip_adapter`, as they need a CLIP image encoder.

Single files carry no config. Diffusers' ``from_single_file`` would fetch one from the hub; here the
structure is read from the tensor shapes, and what weights do not show (head counts, norm settings) is
copied from the loaded U-Net, whose encoder a ControlNet is a copy of. So nothing is downloaded, and a tiny
test ControlNet loads exactly like a real one. Files are read weights-only through
:mod:`lienzo.models.formats`, with the same content sniffing and error messages as checkpoints.

Flux.1 ControlNets (InstantX's, Shakker-Labs' Union) are diffusers' ``FluxControlNetModel``: a folder whose
config.json says so, or a single file with its names (``controlnet_x_embedder.*``), its config read from the
shapes and, for the attention heads the weights do not show, from the loaded Flux.1 transformer. XLabs'
ControlNets are refused: their original layout (``double_blocks.*`` beside ``input_hint_block.*``) has no
diffusers converter, and their design (a pixel hint encoder, ``input_hint_block``, whose blocks repeat down the
transformer) is not one lienzo drives, in whatever names.
"""

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, FluxControlNetModel, T2IAdapter
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

from lienzo.control import ip_adapter
from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.models import formats
from lienzo.models.registry import header_tensors, sha256_file
from lienzo.models.single_file_load import _assign_weights, _count_indices, _few

log = logging.getLogger(__name__)

CONTROL_FOLDERS = ("controlnet", "t2i_adapter", "t2iadapter", "ipadapter")
CONTROL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
# The diffusers classes lienzo loads from a folder's config.json, and the kind each is.
_FOLDER_KINDS = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i_adapter", "FluxControlNetModel": "controlnet"}
_FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "Flux.1"}
_KIND_LABELS = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "ip_adapter": "IP-Adapter"}
# What an A1111 title looks like: "control_v11p_sd15_canny [d14c016b]".
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")

# sd-webui-controlnet names a model "stem [hash]" with A1111's *old* model hash (sd_models.model_hash):
# the sha256 of the 64 KiB at 1 MiB into the file, first 8 hex digits. It reads 64 KiB, not gigabytes,
# and it is the hash the extension's clients have saved in their settings and send back.
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_BYTES = 0x10000
_SHORT_HASH = 8

# Tensors only a ControlNet has: its hint encoder in diffusers and ldm names, a Control-LoRA's marker, and a Flux.1
# ControlNet's input projection of the control latents (diffusers' names).
_CONTROLNET_KEYS = (
    "controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight", "lora_controlnet", "controlnet_x_embedder.weight",
)
# A diffusers-named Flux.1 ControlNet's marker, and XLabs' original Flux.1 ControlNet's double blocks.
_FLUX_KEY = "controlnet_x_embedder.weight"
_XLABS_KEY = "double_blocks.0.img_attn.qkv.weight"
# FluxControlNetModel config entries the weights do not show, copied from the transformer it must fit.
_FROM_TRANSFORMER = ("attention_head_dim", "axes_dims_rope", "patch_size")
# A T2I-Adapter's first layers: diffusers names (full, light), TencentARC's (full, light), the style adapter's.
_ADAPTER_KEYS = (
    "adapter.conv_in.weight", "adapter.body.0.in_conv.weight", "body.0.block1.weight", "body.0.in_conv.weight",
    "style_embedding",
)
# ldm ControlNets saved inside a whole ControlLDM checkpoint carry this prefix (diffusers' LDM_CONTROLNET_KEY).
_LDM_PREFIX = "control_model."
# "diff" ControlNets (diff_control_sd15_*) store their weights minus SD 1.5's and mark it with this tensor;
# sd-webui-controlnet adds the loaded model's U-Net weights back, so do we.
_DIFFERENCE_MARKER = "difference"
# SDXL embeds each of its 6 size/crop numbers with 256 sinusoidal channels (as in single_file_load).
_SDXL_TIME_EMBED_DIM = 256
# U-Net config entries a ControlNet copies as they are: they leave no trace in the weights.
_FROM_UNET = (
    "flip_sin_to_cos", "freq_shift", "only_cross_attention", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "attention_head_dim", "num_attention_heads", "upcast_attention",
    "resnet_time_scale_shift", "encoder_hid_dim", "encoder_hid_dim_type",
)
# TencentARC's adapters flatten 4 levels x num_res_blocks into body.0 .. body.7; ComfyUI and
# sd-webui-controlnet both read them as 2 resnet blocks a level, the only count ever released.
_ADAPTER_RES_BLOCKS = 2
_ADAPTER_BODY = re.compile(r"body\.(\d+)\.(in_conv|block1|block2)\.(weight|bias)")
# The pixel unshuffle packs 8x8 pixels (SD 1.x adapters) or 16x16 (SDXL's) into channels: an SDXL adapter's
# first conv takes 256 (1 channel x 16 x 16) or 768 (RGB) inputs. ComfyUI tells them apart the same way.
_XL_ADAPTER_INPUTS = (256, 768)


@dataclass(frozen=True)
class ControlEntry:
    name: str  # file stem or folder name, e.g. "control_v11p_sd15_canny"
    path: Path
    kind: str  # "controlnet", "t2i_adapter" or "ip_adapter"
    family: str | None  # "sd1", "sd2" or "sdxl" as far as the file tells; None if it does not
    short_hash: str  # file: A1111's old model hash (see above); folder: the first 8 digits of lienzo's folder hash

    @property
    def title(self) -> str:
        """``name [hash]``: how sd-webui-controlnet's /controlnet/model_list names a model."""
        return f"{self.name} [{self.short_hash}]"

    @property
    def file_name(self) -> str:
        """The name with the file's extension; a folder has none."""
        return self.path.name


# (path, files' sizes and mtimes) -> (kind, family, short hash), or None for a file that is no control model.
# Reading a .pth's tensor shapes loads the whole file (pickles have no header), so listings remember them.
_described: dict[tuple, tuple[str, str | None, str] | None] = {}


def control_models(models_dir: Path) -> list[ControlEntry]:
    """Every ControlNet and T2I-Adapter in the models dir's control folders (:data:`CONTROL_FOLDERS`, any
    case, sub-folders too): weight files and diffusers folders, in name order, IP-Adapters among them. A file
    that is no control model (a damaged download) is left out, with a warning in the log the first time."""
    entries = []
    for folder in _control_folders(Path(models_dir)):
        for path in _candidates(folder):
            entry = _entry(path)
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda e: (e.name.lower(), str(e.path).lower()))


def find_control_model(name: str, models_dir: Path, field: str = "model") -> ControlEntry:
    """The control model a request names: by name, title (``name [hash]``), file name or path inside its
    control folder, in any case. A title whose hash differs still finds its name: the hash a client saved
    may come from another tool's hashing. Unknown: InvalidRequestError naming ``field``."""
    wanted = name.strip().lower()
    entries = control_models(models_dir)
    for entry in entries:
        if wanted in _aliases(entry, Path(models_dir)):
            return entry
    match = _TITLE.match(wanted)
    if match:
        for entry in entries:
            if match["name"].lower() in _aliases(entry, Path(models_dir)):
                return entry
    available = ", ".join(e.title for e in entries) or f"none: put ControlNet models in {Path(models_dir) / 'ControlNet'}"
    raise InvalidRequestError(field, f"no ControlNet model named {name!r}; available: {available}")


def load_control_model(
    entry: "ControlEntry | Path", unet, *, dtype=None, device=None
) -> "ControlNetModel | T2IAdapter | FluxControlNetModel":
    """A ControlNet or T2I-Adapter that fits ``unet`` (the base model's UNet2DConditionModel, or a Flux.1
    model's FluxTransformer2DModel, which takes Flux.1 ControlNets), in eval mode.

    ``dtype`` and ``device`` default to the network's. A single file's config is read from its tensor shapes,
    with the network's config for what the weights do not show. A model made for another family (an SDXL
    ControlNet on SD 1.5, a Flux.1 ControlNet on SDXL) is refused with a ModelFileError naming the file, what it
    is for and what the loaded model is.
    """
    path = Path(entry.path if isinstance(entry, ControlEntry) else entry)
    dtype = dtype or unet.dtype
    device = device or unet.device
    if _is_flux(unet):
        return _load_flux(path, unet, dtype).to(device).eval()
    if path.is_dir():
        model = _load_folder(path, unet, dtype)
    else:
        state_dict = formats.load_state_dict(path)
        try:
            model = _load_file(path, state_dict, unet, dtype)
        except KeyError as err:
            raise ModelFileError(f"{path.name} is missing the tensor {err.args[0]!r}; the file is incomplete") from err
    return model.to(device).eval()


# --- listing ---------------------------------------------------------------------------------


def _control_folders(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        return []
    return sorted(d for d in models_dir.iterdir() if d.is_dir() and d.name.lower() in CONTROL_FOLDERS)


def _candidates(folder: Path) -> list[Path]:
    """Diffusers folders of a control class, and weight files outside any model folder (a folder's
    diffusion_pytorch_model.safetensors is part of it, not a model of its own)."""
    model_folders = [config.parent for config in folder.rglob("config.json")]
    found = [d for d in model_folders if _folder_kind(d) is not None]
    for path in folder.rglob("*"):
        if (
            path.is_file()
            and path.suffix.lower() in CONTROL_SUFFIXES
            and not any(path.is_relative_to(d) for d in model_folders)
        ):
            found.append(path)
    return found


def _folder_kind(folder: Path) -> str | None:
    try:
        config = formats.read_json_file(folder / "config.json")
    except ModelFileError:
        return None
    return _FOLDER_KINDS.get(config.get("_class_name"))


def _entry(path: Path) -> ControlEntry | None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    try:
        stamp = (str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except OSError as err:
        log.warning("ControlNet model %s cannot be read: %s", path, err.strerror or err)
        return None
    if stamp not in _described:
        try:
            kind, family = _describe_folder(path) if path.is_dir() else _describe_file(path)
            _described[stamp] = (kind, family, _short_hash(path, files))
        except ModelFileError as err:
            log.warning("%s is left out of the ControlNet models: %s", path, err)
            _described[stamp] = None
        except OSError as err:
            log.warning("ControlNet model %s cannot be read: %s", path, err.strerror or err)
            _described[stamp] = None
    described = _described[stamp]
    if described is None:
        return None
    kind, family, short_hash = described
    return ControlEntry(path.stem if path.is_file() else path.name, path, kind, family, short_hash)


def _short_hash(path: Path, files: list[Path]) -> str:
    if path.is_dir():
        # lienzo's folder hash (registry.py's ModelEntry.sha256): sha256 over the files' own hashes.
        joined = "".join(f"{f.relative_to(path)}:{sha256_file(f)}\n" for f in files)
        return hashlib.sha256(joined.encode()).hexdigest()[:_SHORT_HASH]
    with path.open("rb") as f:
        f.seek(_LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_HASH_BYTES)).hexdigest()[:_SHORT_HASH]


def _aliases(entry: ControlEntry, models_dir: Path) -> set[str]:
    names = {entry.name, entry.title, entry.file_name}
    for folder in _control_folders(models_dir):
        if entry.path.is_relative_to(folder):
            inside = entry.path.relative_to(folder).as_posix()
            names |= {inside, inside.removesuffix(entry.path.suffix) if entry.path.is_file() else inside}
    return {name.lower() for name in names}


def _describe_folder(path: Path) -> tuple[str, str | None]:
    config = formats.read_json_file(path / "config.json")
    kind = _FOLDER_KINDS[config.get("_class_name")]
    if config.get("_class_name") == "FluxControlNetModel":
        return kind, "flux"
    if kind == "t2i_adapter":
        return kind, "sdxl" if config.get("adapter_type") == "full_adapter_xl" else "sd1"
    return kind, _config_family(config)


def _describe_file(path: Path) -> tuple[str, str | None]:
    try:
        shapes = {key.removeprefix(_LDM_PREFIX): shape for key, (shape, _, _) in header_tensors(path).items()}
    except ModelFileError:
        # The original IP-Adapter .bin nests its tensors in two dictionaries, which the shape reader does not open.
        shapes = ip_adapter.nested_shapes(path)
        if shapes is None:
            raise
    kind = _file_kind(shapes, path.name)
    if kind == "t2i_adapter":
        return kind, _adapter_family(shapes)
    if kind == "ip_adapter":
        return kind, ip_adapter.describe(path.name, shapes)
    if _FLUX_KEY in shapes or _XLABS_KEY in shapes:
        return kind, "flux"
    return kind, _shapes_family(shapes)


def _file_kind(keys, name: str) -> str:
    """"controlnet", "t2i_adapter" or "ip_adapter" by the tensor names of any layout; else a ModelFileError saying
    what it is."""
    if any(key in keys for key in _CONTROLNET_KEYS):
        return "controlnet"
    if any(key in keys for key in _ADAPTER_KEYS):
        return "t2i_adapter"
    if any(key.startswith(("ip_adapter.", "image_proj.")) for key in keys):
        return "ip_adapter"
    if any("lllite" in key for key in keys):
        raise ModelFileError(f"{name} is a ControlNet-LLLite, which lienzo does not apply")
    raise ModelFileError(
        f"{name} is not a ControlNet or T2I-Adapter: none of its {len(keys)} tensors is a control input layer"
    )


def _shapes_family(shapes) -> str | None:
    """A ControlNet's family from its tensors, in diffusers or ldm names: SDXL's extra embedding of sizes,
    else the attention projections (SD 1.x: 1x1 convolutions, SD 2.x: linear layers); None without attention."""
    if "add_embedding.linear_1.weight" in shapes or "label_emb.0.0.weight" in shapes:
        return "sdxl"
    proj_in = next((shape for key, shape in shapes.items() if key.endswith(".proj_in.weight")), None)
    if proj_in is None:
        return None
    return "sd2" if len(proj_in) == 2 else "sd1"


def _config_family(config) -> str | None:
    """The same from a diffusers ControlNet or U-Net config."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if not _attends(config):
        return None
    return "sd2" if config.get("use_linear_projection") else "sd1"


def _attends(config) -> bool:
    """Whether a ControlNet or U-Net config has any cross-attention (SDXL's "small" ControlNets have none)."""
    down = any(kind.startswith("CrossAttn") for kind in config.get("down_block_types") or ())
    return down or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"


def _adapter_family(shapes) -> str:
    """SDXL adapters unshuffle 16x16 pixels (see _XL_ADAPTER_INPUTS); the others were made for SD 1.x
    (an SD 2.x adapter would look the same; none was released)."""
    conv_in = shapes.get("adapter.conv_in.weight") or shapes.get("conv_in.weight")
    return "sdxl" if conv_in is not None and conv_in[1] in _XL_ADAPTER_INPUTS else "sd1"


# --- loading ---------------------------------------------------------------------------------


def _load_folder(path: Path, unet, dtype: torch.dtype):
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path} is a folder without config.json, so not a diffusers ControlNet or T2I-Adapter")
    config = formats.read_json_file(path / "config.json")
    kind = _FOLDER_KINDS.get(config.get("_class_name"))
    if kind is None:
        raise ModelFileError(
            f"{path.name} holds a {config.get('_class_name')!r}; lienzo loads ControlNetModel and T2IAdapter folders"
        )
    if config.get("_class_name") == "FluxControlNetModel":
        raise ModelFileError(f"{path.name} is {_what('flux', 'controlnet')} and does not fit the loaded {_model_label(unet.config)} model")
    model_class = ControlNetModel if kind == "controlnet" else T2IAdapter
    # Checked on the config, with the class's defaults filled in, before gigabytes of weights are read.
    init_config = model_class.extract_init_dict(config)[0]
    if kind == "controlnet":
        _check_controlnet_fit(path.name, init_config, unet.config)
    else:
        _check_adapter_fit(path.name, init_config, unet.config)
    try:
        return model_class.from_pretrained(path, local_files_only=True, torch_dtype=dtype, variant=_variant(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ModelFileError(f"cannot load the {_KIND_LABELS[kind]} folder {path}: {err}") from None


def _variant(folder: Path) -> str | None:
    """"fp16" for a folder that holds only the half-precision weights (``diffusion_pytorch_model.fp16.safetensors``,
    all that many people download from the hub); from_pretrained looks for the plain name unless told."""
    if any(folder.glob("diffusion_pytorch_model.safetensors*")) or any(folder.glob("diffusion_pytorch_model.bin*")):
        return None
    return "fp16" if any(folder.glob("diffusion_pytorch_model.fp16.*")) else None


def _load_file(path: Path, state_dict: dict, unet, dtype: torch.dtype):
    name = path.name
    if any(key.startswith(_LDM_PREFIX) for key in state_dict):
        # A whole ControlLDM checkpoint also holds its SD model; only the control model is wanted.
        state_dict = {key[len(_LDM_PREFIX) :]: t for key, t in state_dict.items() if key.startswith(_LDM_PREFIX)}
    kind = _file_kind(state_dict, name)
    if _FLUX_KEY in state_dict or _XLABS_KEY in state_dict:
        raise ModelFileError(f"{name} is {_what('flux', 'controlnet')} and does not fit the loaded {_model_label(unet.config)} model")
    if kind == "ip_adapter":
        raise ModelFileError(
            f"{name} is an IP-Adapter, not a ControlNet or T2I-Adapter: it is applied with an ip-adapter module and a "
            "CLIP image encoder (lienzo.control.ip_adapter.load_ip_adapter)"
        )
    if kind == "t2i_adapter":
        return _load_adapter(name, state_dict, unet, dtype)
    if "lora_controlnet" in state_dict:
        raise ModelFileError(
            f"{name} is a Control-LoRA (Stability AI's low-rank ControlNet), which lienzo does not load; "
            "use a full ControlNet file"
        )
    difference = state_dict.pop(_DIFFERENCE_MARKER, None) is not None
    if "input_hint_block.0.weight" in state_dict:
        state_dict = _convert_ldm(name, state_dict)
    config = _controlnet_config(name, state_dict, unet.config)
    # sd-webui-controlnet's rule: an SD 1.x/2.x ControlNet with "shuffle" in its name (control_v11e_sd15_shuffle)
    # pools its control to one value per channel, as its diffusers config says (global_pool_conditions).
    config["global_pool_conditions"] = "shuffle" in path.stem.lower() and "add_embedding.linear_1.weight" not in state_dict
    _check_controlnet_fit(name, config, unet.config)
    if difference:
        state_dict = _add_unet_weights(state_dict, unet)
    with init_empty_weights():
        model = ControlNetModel(**config)
    return _assign_weights(model, state_dict, "ControlNet", name, dtype)


def _convert_ldm(name: str, ldm: dict) -> dict:
    """ldm ControlNet names -> diffusers names with diffusers' own converter, plus SDXL's size embedding
    (label_emb), which that converter leaves out although its mapping table has it."""
    input_blocks = {key.split(".")[1] for key in ldm if key.startswith("input_blocks.")}
    # conv_in, then per level: layers_per_block resnets (+ attention) and a downsampler (none after the last).
    levels = 1 + sum(key.startswith("input_blocks.") and key.endswith(".0.op.weight") for key in ldm)
    converted = convert_controlnet_checkpoint(ldm, {"layers_per_block": len(input_blocks) // levels - 1})
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if ldm_key in ldm:
            converted[diffusers_key] = ldm[ldm_key]
    # The converter fills in None for a zero conv or mid-block output it expected and did not find.
    missing = [key for key, tensor in converted.items() if tensor is None]
    if missing:
        raise ModelFileError(f"{name} is incomplete: it lacks the ControlNet tensors {_few(missing)}")
    if len(converted) != len(ldm):
        used = {id(t) for t in converted.values()}
        unused = [key for key, t in ldm.items() if id(t) not in used]
        raise ModelFileError(
            f"{name}: {len(ldm) - len(converted)} of its tensors fit no ControlNet layer ({_few(unused)})"
        )
    return converted


def _controlnet_config(name: str, sd: dict, unet_config) -> dict:
    """ControlNetModel arguments from diffusers-named tensors; what leaves no trace in them from the U-Net."""
    if "conv_in.weight" not in sd or not any(key.startswith("down_blocks.") for key in sd):
        raise ModelFileError(f"{name} is not a complete ControlNet: it has no input convolution or encoder blocks")
    levels = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("down_blocks."))
    attention = [any(key.startswith(f"down_blocks.{i}.attentions.") for key in sd) for i in range(levels)]
    depth = [_count_indices(sd, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    mid_attention = any(key.startswith("mid_block.attentions.") for key in sd)
    mid_depth = _count_indices(sd, "mid_block.attentions.0.transformer_blocks.")
    # ControlNetModel gives its middle block the last level's depth, so the two must agree when both attend.
    if attention[-1] and mid_attention and depth[-1] != mid_depth:
        raise ModelFileError(
            f"{name}: its last level has {depth[-1]} transformer blocks and its middle block {mid_depth}; "
            "a diffusers ControlNet cannot hold that"
        )
    to_k = next((t for key, t in sd.items() if key.endswith("attn2.to_k.weight")), None)
    proj_in = next((t for key, t in sd.items() if key.endswith(".proj_in.weight")), None)
    hint_blocks = _count_indices(sd, "controlnet_cond_embedding.blocks.")
    hint_in = sd["controlnet_cond_embedding.conv_in.weight"]
    config = {key: unet_config[key] for key in _FROM_UNET if key in unet_config}
    config.update(
        in_channels=sd["conv_in.weight"].shape[1],
        conditioning_channels=hint_in.shape[1],
        # conv_in, then pairs of (same width, next width with stride 2)
        conditioning_embedding_out_channels=[hint_in.shape[0]]
        + [sd[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0] for i in range(hint_blocks // 2)],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attention else "UNetMidBlock2D",
        block_out_channels=[sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)],
        layers_per_block=_count_indices(sd, "down_blocks.0.resnets."),
        # A level without attention ignores its depth, except the last, whose depth the middle block takes.
        transformer_layers_per_block=[d if a else 1 for d, a in zip(depth[:-1], attention[:-1])]
        + [depth[-1] if attention[-1] else mid_depth],
        cross_attention_dim=to_k.shape[1] if to_k is not None else unet_config["cross_attention_dim"],
        use_linear_projection=proj_in.ndim == 2 if proj_in is not None else unet_config["use_linear_projection"],
    )
    if "add_embedding.linear_1.weight" in sd:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=unet_config.get("addition_time_embed_dim") or _SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1],
        )
    return config


def _add_unet_weights(state_dict: dict, unet) -> dict:
    """A "diff" ControlNet's tensors plus the U-Net's of the same name (its encoder's copy), in float32."""
    base = unet.state_dict()
    return {
        key: t.float() + base[key].detach().to("cpu", torch.float32) if key in base else t
        for key, t in state_dict.items()
    }


def _load_adapter(name: str, state_dict: dict, unet, dtype: torch.dtype) -> T2IAdapter:
    if "style_embedding" in state_dict:
        raise ModelFileError(f"{name} is a T2I style adapter (CLIP-vision tokens), which lienzo does not apply")
    if "body.0.in_conv.weight" in state_dict or "adapter.body.0.in_conv.weight" in state_dict:
        raise ModelFileError(
            f"{name} is a light T2I-Adapter as a single file, which lienzo does not load; use its diffusers folder"
        )
    if any(key.endswith("down_opt.op.weight") for key in state_dict):
        raise ModelFileError(
            f"{name} is a T2I-Adapter that downsamples with convolutions, which diffusers' adapter has no layer for"
        )
    if "adapter.conv_in.weight" not in state_dict:
        state_dict = _adapter_from_original(name, state_dict)
    config = _adapter_config(name, state_dict)
    _check_adapter_fit(name, config, unet.config)
    with init_empty_weights():
        model = T2IAdapter(**config)
    return _assign_weights(model, state_dict, "T2I-Adapter", name, dtype)


def _adapter_from_original(name: str, original: dict) -> dict:
    """TencentARC's names -> diffusers': body.K (K = level x 2 + block) becomes adapter.body.LEVEL.resnets.BLOCK,
    and a level's channel-changing in_conv sits on its first block. The inverse of the prefix table
    ComfyUI and sd-webui-controlnet use to read diffusers adapters; diffusers ships no converter for it."""
    renamed, unused = {}, []
    for key, tensor in original.items():
        match = _ADAPTER_BODY.fullmatch(key)
        if key in ("conv_in.weight", "conv_in.bias"):
            renamed[f"adapter.{key}"] = tensor
        elif match and match[2] == "in_conv" and int(match[1]) % _ADAPTER_RES_BLOCKS == 0:
            renamed[f"adapter.body.{int(match[1]) // _ADAPTER_RES_BLOCKS}.in_conv.{match[3]}"] = tensor
        elif match and match[2] != "in_conv":
            level, block = divmod(int(match[1]), _ADAPTER_RES_BLOCKS)
            renamed[f"adapter.body.{level}.resnets.{block}.{match[2]}.{match[3]}"] = tensor
        else:
            unused.append(key)
    if unused:
        raise ModelFileError(f"{name}: {len(unused)} of its tensors fit no T2I-Adapter layer ({_few(unused)})")
    return renamed


def _adapter_config(name: str, sd: dict) -> dict:
    """T2IAdapter arguments from diffusers-named full-adapter tensors."""
    levels = _count_indices(sd, "adapter.body.")
    inputs = sd["adapter.conv_in.weight"].shape[1]
    xl = inputs in _XL_ADAPTER_INPUTS
    downscale = 16 if xl else 8
    if inputs % (downscale * downscale):
        raise ModelFileError(
            f"{name}: its first convolution takes {inputs} channels, not image channels x {downscale}x{downscale} pixels"
        )
    return {
        "in_channels": inputs // (downscale * downscale),
        "channels": [sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels)],
        "num_res_blocks": _count_indices(sd, "adapter.body.0.resnets."),
        "downscale_factor": downscale,
        "adapter_type": "full_adapter_xl" if xl else "full_adapter",
    }


# --- fitting the loaded model ------------------------------------------------------------------


def _check_controlnet_fit(name: str, config: dict, unet_config) -> None:
    """A ControlNet adds one residual to each of the U-Net's encoder outputs: its levels, channels, layers
    and text width must be the U-Net's, and an SDXL one needs SDXL's size embedding."""
    differences = []
    ours, theirs = list(config["block_out_channels"]), list(unet_config["block_out_channels"])
    if ours != theirs:
        differences.append(f"channels {_channels(ours)}, the model's {_channels(theirs)}")
    if config["layers_per_block"] != unet_config["layers_per_block"]:
        layers = config["layers_per_block"]
        differences.append(f"{layers} layers a level, the model's {unet_config['layers_per_block']}")
    if _attends(config) and config["cross_attention_dim"] != unet_config["cross_attention_dim"]:
        differences.append(
            f"cross-attention width {config['cross_attention_dim']}, the model's {unet_config['cross_attention_dim']}"
        )
    if (config.get("addition_embed_type") == "text_time") != (unet_config.get("addition_embed_type") == "text_time"):
        here = config.get("addition_embed_type") == "text_time"
        differences.append("SDXL's size embedding " + ("here, not in the model" if here else "missing"))
    if differences:
        raise ModelFileError(
            f"{name} is {_what(_config_family(config), 'controlnet')} and does not fit the loaded "
            f"{_model_label(unet_config)} model: {'; '.join(differences)}"
        )


def _check_adapter_fit(name: str, config: dict, unet_config) -> None:
    """A T2I-Adapter's features are added to the U-Net's encoder levels: an SDXL adapter (4 features, the
    first three at SDXL's three levels) needs SDXL, an SD 1.x one the U-Net's channels level by level."""
    xl = config["adapter_type"] == "full_adapter_xl"
    channels, levels = list(config["channels"]), list(unet_config["block_out_channels"])
    fits = channels[: len(levels)] == levels if xl else channels == levels
    if xl != (unet_config.get("addition_embed_type") == "text_time") or not fits:
        raise ModelFileError(
            f"{name} is {_what('sdxl' if xl else 'sd1', 't2i_adapter')} with channels {_channels(channels)} and does not "
            f"fit the loaded {_model_label(unet_config)} model (channels {_channels(levels)})"
        )


def _what(family: str | None, kind: str) -> str:
    if family is None:
        return f"a {_KIND_LABELS[kind]} for an unknown model"
    article = "a" if family == "flux" else "an"  # "an SD...", "a Flux.1..."
    return f"{article} {_FAMILY_LABELS[family]} {_KIND_LABELS[kind]}"


def _model_label(unet_config) -> str:
    return _FAMILY_LABELS.get(_config_family(unet_config), "Stable Diffusion")


def _channels(channels: list[int]) -> str:
    return "/".join(str(c) for c in channels)


# --- Flux.1 ControlNets ------------------------------------------------------------------------


def _is_flux(network) -> bool:
    """Whether the loaded network is Flux.1's transformer (whose ControlNets are FluxControlNetModel)."""
    return type(network).__name__ == "FluxTransformer2DModel"


def _load_flux(path: Path, transformer, dtype: torch.dtype) -> FluxControlNetModel:
    """A FluxControlNetModel from a diffusers folder or diffusers-named file that fits ``transformer``; anything
    else (a U-Net ControlNet, an adapter, XLabs' layout) refused, naming what it is."""
    if path.is_dir():
        config = formats.read_json_file(path / "config.json") if (path / "config.json").is_file() else {}
        if config.get("_class_name") != "FluxControlNetModel":
            family = _describe_folder(path)[1] if config.get("_class_name") in _FOLDER_KINDS else None
            kind = _FOLDER_KINDS.get(config.get("_class_name"), "controlnet")
            raise ModelFileError(f"{path.name} is {_what(family, kind)} and does not fit the loaded Flux.1 model (it takes Flux.1 ControlNets)")
        init_config = FluxControlNetModel.extract_init_dict(config)[0]
        _check_flux_fit(path.name, init_config, transformer.config)
        _check_no_hint_encoder(path.name, init_config)
        try:
            return FluxControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype, variant=_variant(path))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise ModelFileError(f"cannot load the Flux.1 ControlNet folder {path}: {err}") from None
    state_dict = formats.load_state_dict(path)
    if _XLABS_KEY in state_dict:
        raise ModelFileError(
            f"{path.name} is an XLabs Flux.1 ControlNet in its original layout, which diffusers cannot read; "
            "use a diffusers-format Flux.1 ControlNet (InstantX, Shakker-Labs)"
        )
    if _FLUX_KEY not in state_dict:
        kind, family = _describe_file(path)
        raise ModelFileError(f"{path.name} is {_what(family, kind)} and does not fit the loaded Flux.1 model (it takes Flux.1 ControlNets)")
    try:
        config = _flux_config(state_dict, transformer.config)
    except KeyError as err:
        raise ModelFileError(f"{path.name} is missing the tensor {err.args[0]!r}; the file is incomplete") from err
    _check_flux_fit(path.name, config, transformer.config)
    _check_no_hint_encoder(path.name, config)
    with init_empty_weights():
        model = FluxControlNetModel(**config)
    return _assign_weights(model, state_dict, "Flux.1 ControlNet", path.name, dtype)


def _flux_config(sd: dict, transformer_config) -> dict:
    """FluxControlNetModel arguments from diffusers-named tensors: block counts, widths, guidance and union
    embeddings; the head width, rotary axes and patch size (which leave no trace) from the transformer."""
    config = {key: transformer_config[key] for key in _FROM_TRANSFORMER if key in transformer_config}
    inner, in_channels = sd["x_embedder.weight"].shape
    config.update(
        in_channels=in_channels,
        num_layers=_count_indices(sd, "transformer_blocks."),
        num_single_layers=_count_indices(sd, "single_transformer_blocks."),
        num_attention_heads=inner // config["attention_head_dim"],
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd,
    )
    if "controlnet_mode_embedder.weight" in sd:
        config["num_mode"] = sd["controlnet_mode_embedder.weight"].shape[0]
    if "input_hint_block.conv_out.weight" in sd:
        config["conditioning_embedding_channels"] = sd["input_hint_block.conv_out.weight"].shape[0]
    return config


def _check_no_hint_encoder(name: str, config: dict) -> None:
    if config.get("conditioning_embedding_channels") is not None:
        raise ModelFileError(
            f"{name} is an XLabs-style Flux.1 ControlNet (a pixel hint encoder, input_hint_block), which lienzo does not drive; "
            "use an InstantX-style one (it reads the map's VAE latents)"
        )


def _check_flux_fit(name: str, config: dict, transformer_config) -> None:
    """A Flux.1 ControlNet's samples are added to the transformer's hidden states and it reads the same packed
    latents, text and pooled vector: all those widths must be the transformer's."""
    def width(c) -> int:
        return c["num_attention_heads"] * c["attention_head_dim"]

    differences = [
        f"{what} {config[key]}, the model's {transformer_config[key]}"
        for what, key in (("input channels", "in_channels"), ("text width", "joint_attention_dim"), ("pooled width", "pooled_projection_dim"))
        if config[key] != transformer_config[key]
    ]
    if width(config) != width(transformer_config):
        differences.insert(0, f"hidden width {width(config)}, the model's {width(transformer_config)}")
    if differences:
        raise ModelFileError(f"{name} is {_what('flux', 'controlnet')} and does not fit the loaded Flux.1 model: {'; '.join(differences)}")
