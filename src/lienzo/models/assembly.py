"""ComfyUI's split layout: an SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein or Qwen-Image transformer file,
assembled with its text encoders and VAE.

Flux.1, Chroma, Z-Image and Flux.2 Klein ship as a transformer alone (their makers' or ComfyUI's key names, in
bf16, fp8 or GGUF), and SD 3.5 as a file that may or may not carry its text encoders and VAE. The other parts
come, first match wins, from:

1. the files the user names: ``--text-encoder PATH`` (repeatable) and ``--vae PATH``;
2. the model file itself, when it bundles them (SD 3.5's all-in-one files);
3. the models dir, in ComfyUI's folders: text encoders in ``<models>/text_encoders`` or ``<models>/clip``,
   VAEs in ``<models>/vae`` (one with the family's latent channels, 16 or Flux.2's 32; a name saying the family
   is preferred: ``ae*``/``flux*`` for Flux.1, Chroma and Z-Image, which decode with Flux's VAE; ``sd3*`` for
   SD 3.x; ``flux2*`` for Flux.2 Klein).
   The models dir of a file in ComfyUI's ``<models>/diffusion_models`` or ``<models>/unet`` is looked in
   first, then lienzo's.

Which text encoder a file is, is read from its tensors (:func:`lienzo.models.transformer_files.text_encoder_kind`);
when they cannot tell (tiny test models), from ComfyUI's file names: ``clip_l*``, ``clip_g*``, ``t5*``, ``*t5xxl*``
or ``qwen*``.
Of several Qwen3 files, only those as wide as the transformer reads are candidates (Klein 4B takes Qwen3-4B,
Klein 9B Qwen3-8B). Of several files of one kind in the models dir, the most precise is taken: fp16 or bf16, then fp32, scaled fp8,
fp8, then GGUF from the largest file down. A smaller file would save disk only: every text encoder is read
into the model's dtype (only a GGUF transformer stays quantized in memory). SD 3.x runs without T5 (its slot
is optional): missing, or left out with ``t5=False`` (``--no-t5``), it is said in the log.

lienzo bundles the CLIP, T5 and Qwen tokenizers. A Qwen text encoder's own ``tokenizer.json`` (with the
``tokenizer_config.json`` that carries the chat template; a Z-Image or Klein diffusers folder's ``tokenizer/``
has both) is still preferred: from a folder given with ``--text-encoder FOLDER``, else from beside the Qwen
file (or its ``tokenizer/`` folder); without one, the bundled tokenizer reads the prompt. A Qwen3 given as a
transformers folder (a diffusers folder's ``text_encoder/``) brings its sibling ``tokenizer/``. Klein's Qwen3 is read as the Qwen3ForCausalLM its
pipeline holds, Z-Image's as a Qwen3Model.

Qwen-Image's transformer file is completed with ComfyUI's ``qwen_2.5_vl_7b*.safetensors`` (Qwen2.5-VL) and
``qwen_image_vae.safetensors`` (Wan 2.1's VAE), found or given, or with a Qwen-Image diffusers folder's
``text_encoder/`` (its ``tokenizer/`` beside) and ``vae/`` given with ``--text-encoder`` and ``--vae``.

Flux.2 Klein comes step-distilled (4 steps, no CFG) or as an undistilled base (50 steps, CFG 4); BFL names
the base's files ``flux-2-klein-base-*``, so a file whose name has the word ``base`` is read as a base.

Before any tensor is read, what the pieces will take in memory (from their headers) is set against what the
device has (:func:`plan_memory`): a model that cannot fit fails at once, in one line that says what to do.
"""

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lienzo.errors import ModelFileError
from lienzo.models import formats
from lienzo.models.components import Components, vae_dtype_for
from lienzo.models.families import FAMILIES, Family, TextEncoderSlot, is_distilled
from lienzo.models.quiet import first_line
from lienzo.models.registry import (
    TEXT_ENCODER_FOLDERS,
    TEXT_ENCODER_LABELS,
    WEIGHT_SUFFIXES,
    Tensors,
    header_tensors,
    text_encoder_kind_by_name,
    weight_format,
)
from lienzo.models.tokenizers import QWEN_KINDS

log = logging.getLogger(__name__)

TRANSFORMER_FOLDERS = ("diffusion_models", "unet")
VAE_FOLDER = "vae"
# What a user who lacks a piece is told to put in the models dir: the names ComfyUI's guides use.
_SUGGESTED_FILES = {
    "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors",
    "qwen3": "qwen_3_4b.safetensors", "qwen25vl": "qwen_2.5_vl_7b.safetensors",
}
# Where a family's encoder comes in sizes, the file for each size of its transformer (Klein 4B and 9B).
_SUGGESTED_QWEN3 = {2560: "qwen_3_4b.safetensors", 4096: "qwen_3_8b.safetensors"}
# Chroma and Z-Image decode with Flux.1's VAE.
_SUGGESTED_VAE = {
    "flux": "ae.safetensors", "sd3": "sd3_vae.safetensors", "chroma": "ae.safetensors", "zimage": "ae.safetensors",
    "flux2": "flux2-vae.safetensors", "qwenimage": "qwen_image_vae.safetensors",
}
# VAE file names that say which family a VAE was made for (Flux.1's and SD 3's 16-channel VAEs are built alike).
_VAE_NAMES = {
    "flux": ("ae", "flux"), "sd3": ("sd3", "diffusion_pytorch_model"), "chroma": ("ae", "flux", "chroma"),
    "zimage": ("ae", "flux", "z_image", "zimage"), "flux2": ("flux2", "flux-2", "flux_2"), "qwenimage": ("qwen",),
}
# The tensor of each Qwen3-reading transformer whose input width says how wide a Qwen3 it reads, and how many of
# Qwen3's layers it reads side by side (Klein: three). Original and diffusers names.
_QWEN3_INPUTS = {
    "zimage": (("cap_embedder.1.weight",), 1),
    "flux2": (("txt_in.weight", "context_embedder.weight"), 3),
}
_QWEN3_WIDTH = ("embed_tokens.weight", "model.embed_tokens.weight", "token_embd.weight")
# Qwen3's tokenizer: the file that must be there, and where beside a Qwen3 file or folder it is looked for.
_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_FOLDER = "tokenizer"
# Where an all-in-one file (ComfyUI's checkpoint layout, SD 3.5's releases) keeps its other parts.
_BUNDLED_TEXT_ENCODER = "text_encoders.{kind}."
_BUNDLED_VAE = "first_stage_model."
# Most precise first (see the module's docstring); GGUF files after these, largest first.
_PRECISION_ORDER = ("fp16", "bf16", "fp32", "scaled fp8", "fp8")
# Storage types the loaders cast to the model's dtype (safetensors' and GGUF's names); others stay as stored.
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Flux.1 schnell's scheduler (its diffusers folder's scheduler_config.json): no resolution-dependent shift.
_SCHNELL_SCHEDULE = {"shift": 1.0, "use_dynamic_shifting": False}
_GIB = 2**30


@dataclass(frozen=True)
class Piece:
    """One part of a model and where it is read from: a file of its own, or a part of the model file (``bundled``)."""

    role: str  # "transformer", "vae" or a text encoder kind ("clip_l", "clip_g", "t5xxl", "qwen3")
    path: Path
    size: int  # bytes it takes in memory once read: in the model's dtype (a GGUF transformer: quantized)
    origin: str  # "given" (by the user), "bundled" (in the model file) or "found" (in the models dir)
    optional: bool = False  # the model runs without it (SD 3.x's T5)

    @property
    def label(self) -> str:
        return TEXT_ENCODER_LABELS.get(self.role, self.role)


@dataclass(frozen=True)
class Assembly:
    """What a split model is read from, decided from file headers alone (nothing loaded yet)."""

    path: Path
    spec: Family
    transformer: Piece
    text_encoders: dict[str, Piece | None]  # slot kind -> piece; None: an optional one left out
    vae: Piece
    tokenizer: Path | None = None  # the folder with Qwen3's tokenizer (Z-Image); the others' are bundled

    @property
    def pieces(self) -> list[Piece]:
        return [self.transformer, *(p for p in self.text_encoders.values() if p is not None), self.vae]


# -- which file is which --------------------------------------------------------------------------------------


def _headers(path: Path) -> tuple[str, Tensors]:
    """A file's format and, for safetensors and GGUF, its tensors from the header (a pickle is not read: {})."""
    kind = formats.sniff(path)
    return kind, header_tensors(path, kind) if kind in ("safetensors", "gguf") else {}


def text_encoder_kind_of(path: Path) -> str | None:
    """"clip_l", "clip_g", "t5xxl" or "qwen3": what a text encoder file holds, by its tensors, else by its name."""
    from lienzo.models.transformer_files import text_encoder_kind

    _, tensors = _headers(path)
    return text_encoder_kind({k: shape for k, (shape, _, _) in tensors.items()}) or text_encoder_kind_by_name(path.name)


def models_dir_of(path: Path) -> Path | None:
    """The models dir a transformer file lies in, when it is in ComfyUI's ``diffusion_models`` or ``unet`` folder."""
    folder = Path(path).resolve().parent
    return folder.parent if folder.name.lower() in TRANSFORMER_FOLDERS else None


def _weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    return sorted(files, key=lambda p: str(p).lower())


def _text_encoder_folders(models_dir: Path) -> list[Path]:
    return [models_dir / name for name in TEXT_ENCODER_FOLDERS]


def _precision_rank(path: Path) -> tuple:
    """Sort key: most precise first (fp16/bf16, fp32, scaled fp8, fp8, then GGUF largest first)."""
    kind, tensors = _headers(path)
    quantization = weight_format(tensors, gguf=kind == "gguf")
    if quantization in _PRECISION_ORDER:
        return (_PRECISION_ORDER.index(quantization), 0, path.name.lower())
    return (len(_PRECISION_ORDER), -path.stat().st_size, path.name.lower())


def find_text_encoders(models_dir: Path) -> dict[str, list[Path]]:
    """The text encoder files in ``<models>/text_encoders`` and ``<models>/clip`` by kind, most precise first.
    A file that cannot be read or told apart is passed over (said in the debug log)."""
    found: dict[str, list[Path]] = {}
    for folder in _text_encoder_folders(models_dir):
        for path in _weight_files(folder):
            try:
                kind = text_encoder_kind_of(path)
            except ModelFileError as err:
                log.debug("%s: passed over (%s)", path, err)
                continue
            if kind is not None:
                found.setdefault(kind, []).append(path)
    return {kind: sorted(paths, key=_precision_rank) for kind, paths in found.items()}


def _vae_latent_channels(path: Path, spec: Family) -> int | None:
    """The latent channels of a VAE file for ``spec`` (ldm, Wan's or diffusers names), from its decoder's first conv:
    a 2-d one (4 dimensions), or for Qwen-Image a Wan VAE's 3-d one (5 dimensions)."""
    try:
        shapes = {k: shape for k, (shape, _, _) in _headers(path)[1].items()}
    except ModelFileError:
        return None
    dimensions = 5 if spec.vae_class == "AutoencoderKLQwenImage" else 4
    for key in ("decoder.conv_in.weight", _BUNDLED_VAE + "decoder.conv_in.weight", "decoder.conv1.weight"):
        if key in shapes and len(shapes[key]) == dimensions:
            return shapes[key][1]
    return None


def find_vae(models_dir: Path, spec: Family, latent_channels: int | None = None) -> Path | None:
    """A VAE in ``<models>/vae`` with ``latent_channels`` (default: the family's); one whose name says the family first."""
    wanted = latent_channels or spec.latent_channels
    fitting = [p for p in _weight_files(models_dir / VAE_FOLDER) if _vae_latent_channels(p, spec) == wanted]
    named = [p for p in fitting if p.stem.lower().startswith(_VAE_NAMES.get(spec.name, ()))]
    return (named or fitting or [None])[0]


# -- the plan ---------------------------------------------------------------------------------------------------


def plan_assembly(
    path: Path,
    *,
    text_encoders: Sequence[Path] = (),
    vae: Path | None = None,
    t5: bool = True,
    models_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Assembly:
    """Where each part of the transformer model ``path`` comes from (see the module's docstring) and what it
    takes in memory read in ``dtype``, from headers alone. ModelFileError names, in one line, what is missing,
    where it was looked for and how to give it."""
    from lienzo.models.transformer_files import detect_transformer_family

    path = Path(path)
    tensors = header_tensors(path)
    shapes = {k: shape for k, (shape, _, _) in tensors.items()}
    family = detect_transformer_family(shapes)
    if family is None:
        raise ModelFileError(f"model {path.name} is not an SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein or Qwen-Image transformer")
    spec = FAMILIES[family]
    model = f"model {path.name} ({spec.label})"
    # The models dir the file lies in (a ComfyUI tree given by path) first, then the one asked to look in.
    searched = list(dict.fromkeys(d.resolve() for d in (models_dir_of(path), models_dir) if d is not None))
    given, tokenizer_folders = _given_text_encoders(text_encoders, spec)
    check_t5_option(spec, t5, path.name)

    def bundled_size(prefix: str) -> int:
        return loaded_size({key: t for key, t in tensors.items() if key.startswith(prefix)}, dtype)

    def file_size(file: Path) -> int:
        return _size_of(file, dtype)

    found: dict[str, list[Path]] = {}
    for folder in searched:
        for kind, paths in find_text_encoders(folder).items():
            found.setdefault(kind, []).extend(paths)
    width = _qwen3_width_needed(family, shapes)
    if width is not None and found.get("qwen3"):
        fitting = [file for file in found["qwen3"] if _qwen3_width(file) in (width, None)]  # None: a pickle, unread
        if not fitting and "qwen3" not in given:
            widths = ", ".join(f"{file.name} ({_qwen3_width(file)})" for file in found["qwen3"])
            raise ModelFileError(
                f"{model} reads a Qwen3 {width} wide, but the Qwen3 files found are not: {widths}; "
                f"put {_SUGGESTED_QWEN3.get(width, f'a Qwen3 of width {width}')} there or pass --text-encoder PATH"
            )
        found["qwen3"] = fitting
    if width is not None and "qwen3" in given and _qwen3_width(given["qwen3"]) not in (width, None):
        raise ModelFileError(
            f"--text-encoder {given['qwen3'].name}: a Qwen3 {_qwen3_width(given['qwen3'])} wide, but {model} reads one "
            f"{width} wide ({_SUGGESTED_QWEN3.get(width, 'another size')})"
        )
    chosen: dict[str, Piece | None] = {}
    missing: list[TextEncoderSlot] = []
    for slot in spec.text_encoders:
        kind = slot.kind
        inside = bundled_size(_BUNDLED_TEXT_ENCODER.format(kind=kind))
        if kind == "t5xxl" and not t5:
            chosen[kind] = None
            log.info("%s: without its T5-XXL text encoder (--no-t5)", model)
        elif kind in given:
            chosen[kind] = Piece(kind, given[kind], file_size(given[kind]), "given", slot.optional)
        elif inside:
            chosen[kind] = Piece(kind, path, inside, "bundled", slot.optional)
        elif found.get(kind):
            chosen[kind] = Piece(kind, found[kind][0], file_size(found[kind][0]), "found", slot.optional)
        elif slot.optional:
            chosen[kind] = None
            log.info("%s: no %s text encoder (%s) given or found; running without it", model, TEXT_ENCODER_LABELS[kind], kind)
        else:
            missing.append(slot)
    if missing:
        raise ModelFileError(_missing_text_encoders(model, missing, searched, width))

    if vae is not None:
        vae_piece = Piece("vae", Path(vae), _size_of(Path(vae), dtype), "given")
    elif bundled_size(_BUNDLED_VAE):
        vae_piece = Piece("vae", path, bundled_size(_BUNDLED_VAE), "bundled")
    else:
        latents = _vae_latents_needed(spec, shapes)
        found_vae = next((v for v in (find_vae(folder, spec, latents) for folder in searched) if v is not None), None)
        if found_vae is None:
            folders = " or ".join(str(folder / VAE_FOLDER) for folder in searched)
            where = f"none with {latents} latent channels in {folders}" if searched else "none given"
            raise ModelFileError(
                f"{model} needs a VAE: {where}; put {_SUGGESTED_VAE[spec.name]} there or pass --vae PATH"
            )
        vae_piece = Piece("vae", found_vae, file_size(found_vae), "found")

    tokenizer = None
    qwen = next((chosen[kind] for kind in QWEN_KINDS if chosen.get(kind) is not None), None)
    if qwen is not None:
        tokenizer = _find_tokenizer(qwen.path, tokenizer_folders)
    own = {key: t for key, t in tensors.items() if not key.startswith(("text_encoders.", _BUNDLED_VAE))}
    transformer = Piece("transformer", path, loaded_size(own, dtype, quantized=True), "given")
    return Assembly(path=path, spec=spec, transformer=transformer, text_encoders=chosen, vae=vae_piece, tokenizer=tokenizer)


def _vae_latents_needed(spec: Family, shapes: dict) -> int:
    """The latent channels of the VAE a transformer decodes with: the family's, except that Flux.2's network
    takes them in latent_patch x latent_patch patches, and Qwen-Image's in the 2x2 patches its pipeline packs, so
    their input width says them (as for a tiny test model)."""
    from lienzo.models.transformer_files import PREFIX

    patch = 2 if spec.vae_class == "AutoencoderKLQwenImage" else spec.latent_patch
    if patch == 1:
        return spec.latent_channels
    names = [prefix + name for name in ("img_in.weight", "x_embedder.weight") for prefix in ("", PREFIX)]
    shape = next((shapes[name] for name in names if name in shapes), None)
    return spec.latent_channels if shape is None else shape[1] // patch**2


def _qwen3_width_needed(family: str, shapes: dict) -> int | None:
    """How wide a Qwen3 the ``family`` transformer with these tensor shapes reads; None: no Qwen3, or unknown."""
    from lienzo.models.transformer_files import PREFIX

    names, layers = _QWEN3_INPUTS.get(family, ((), 1))
    shape = next((shapes[prefix + name] for name in names for prefix in ("", PREFIX) if prefix + name in shapes), None)
    return None if shape is None else shape[1] // layers


def _qwen3_width(path: Path) -> int | None:
    """A Qwen3 file's (or transformers folder's) hidden width, from its embedding's header or its config."""
    if path.is_dir():
        config = path / "config.json"
        return formats.read_json_file(config).get("hidden_size") if config.is_file() else None
    tensors = _headers(path)[1]
    return next((tensors[name][0][1] for name in _QWEN3_WIDTH if name in tensors), None)


def _tokenizer_places(folder: Path) -> list[Path]:
    """Where a given folder may keep Qwen3's tokenizer: in itself, in its ``tokenizer/`` (a Z-Image or Klein
    diffusers folder), or beside it (a diffusers folder's ``text_encoder/``, next to ``tokenizer/``)."""
    return [folder, folder / _TOKENIZER_FOLDER, folder.parent / _TOKENIZER_FOLDER]


def _find_tokenizer(encoder: Path, given: Sequence[Path]) -> Path | None:
    """The folder with a Qwen text encoder's own tokenizer.json: a given folder first, then beside the encoder's
    file or folder; None: there is none, and the bundled one reads the prompts."""
    beside = _tokenizer_places(encoder) if encoder.is_dir() else [encoder.parent, encoder.parent / _TOKENIZER_FOLDER]
    places = [place for folder in given for place in _tokenizer_places(folder)] + beside
    return next((place for place in places if (place / _TOKENIZER_FILE).is_file()), None)


def loaded_size(tensors: Tensors, dtype: torch.dtype, *, quantized: bool = False) -> int:
    """Bytes ``tensors`` take once read: floating-point ones in ``dtype`` (the loaders cast fp8 and fp16 files
    alike), others as stored. ``quantized``: GGUF's quantized blocks stay so (a GGUF transformer computes
    from them); else they too are expanded to ``dtype`` (a GGUF T5 is)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape, kind, size in tensors.values():
        expanded = kind in _FLOATS or (not quantized and kind.startswith(("Q", "IQ", "TQ")))
        total += math.prod(shape) * itemsize if expanded else size
    return total


def _size_of(path: Path, dtype: torch.dtype) -> int:
    """What a file, or a folder's weight files, take once read in ``dtype``: by their headers (safetensors,
    GGUF), else by their size."""
    files = [f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES] if path.is_dir() else [path]
    total = 0
    for file in files:
        tensors = _headers(file)[1]
        total += loaded_size(tensors, dtype) if tensors else file.stat().st_size
    return total


def _given_text_encoders(paths: Sequence[Path], spec: Family) -> tuple[dict[str, Path], list[Path]]:
    """``--text-encoder`` files by the slot each fills, and the folders given (Qwen3's tokenizer, or a Qwen3
    transformers folder: one with config.json); one line for a path that fits no slot of the family."""
    kinds = {slot.kind for slot in spec.text_encoders}
    qwen = next((kind for kind in QWEN_KINDS if kind in kinds), None)
    given: dict[str, Path] = {}
    folders: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            if qwen is None:
                raise ModelFileError(
                    f"--text-encoder {path.name}: a folder, which lienzo reads only for Qwen3 (Z-Image's, Flux.2 Klein's), "
                    f"Qwen2.5-VL (Qwen-Image's) and their tokenizer; give {spec.label}'s text encoders as files"
                )
            folders.append(path)
            if (path / "config.json").is_file():  # a Qwen saved by transformers, not only a tokenizer
                if qwen in given:
                    raise ModelFileError(f"--text-encoder: {given[qwen].name} and {path.name} are both {qwen}; give one")
                given[qwen] = path
            continue
        formats.sniff(path)  # a clear line for a missing, empty or foreign file
        kind = text_encoder_kind_of(path)
        if kind is None:
            raise ModelFileError(
                f"--text-encoder {path.name}: cannot tell which text encoder it is from its tensors; "
                "name the file clip_l*, clip_g*, t5xxl* or qwen* after what it holds"
            )
        if kind not in kinds:
            takes = ", ".join(slot.kind for slot in spec.text_encoders)
            raise ModelFileError(
                f"--text-encoder {path.name}: a {TEXT_ENCODER_LABELS[kind]} text encoder, which {spec.label} does not use "
                f"(it takes {takes})"
            )
        if kind in given:
            raise ModelFileError(f"--text-encoder: {given[kind].name} and {path.name} are both {kind}; give one")
        given[kind] = path
    return given, folders


def _missing_text_encoders(model: str, slots: list[TextEncoderSlot], searched: list[Path], qwen3_width: int | None) -> str:
    needs = " and ".join(f"a {TEXT_ENCODER_LABELS[s.kind]} text encoder ({s.kind})" for s in slots)
    files = " and ".join(
        _SUGGESTED_QWEN3.get(qwen3_width, _SUGGESTED_FILES[s.kind]) if s.kind == "qwen3" else _SUGGESTED_FILES[s.kind] for s in slots
    )
    if not searched:
        return f"{model} needs {needs}: none given; pass --text-encoder PATH (for example {files})"
    folders = " or ".join(str(folder) for models_dir in searched for folder in _text_encoder_folders(models_dir))
    return f"{model} needs {needs}: none in {folders}; put {files} there or pass --text-encoder PATH"


# -- memory -------------------------------------------------------------------------------------------------


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still take: free CUDA memory, else the RAM the kernel says is available
    (``MemAvailable``; Apple's unified memory counts as RAM); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_memory(
    pieces: Iterable[Piece],
    device: torch.device | str,
    *,
    name: str = "the model",
    low_vram: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Refuse, before any tensor is read, a model whose pieces cannot fit: every model is read into RAM
    first, then moved to a GPU whole, or with ``low_vram`` one part at a time (so there the largest must fit).
    The one-line ModelFileError gives the sizes and what would make it fit (``dtype``: the one read in)."""
    pieces = list(pieces)
    device = torch.device(device)
    total = sum(p.size for p in pieces)
    checks = [(torch.device("cpu"), total)]
    if device.type == "cuda":
        checks.append((device, max(p.size for p in pieces) if low_vram else total))
    for where, needed in checks:
        free = available_memory(where)
        if free is None or needed <= free:
            continue
        parts = ", ".join(f"{p.label} {p.size / _GIB:.1f} GiB" for p in pieces)
        room = f"{free / _GIB:.1f} GiB"
        has = f"the CPU has {room} of RAM available" if where.type == "cpu" else f"{where} has {room} free"
        ways = ["a GGUF file of the transformer (it stays quantized in memory)"]
        if where.type == "cuda" and not low_vram:
            ways.insert(0, "--low-vram")
        if dtype == torch.float32:
            ways.append("--dtype bfloat16")
        if any(p.role == "t5xxl" and p.optional for p in pieces):
            ways.append("--no-t5")
        advice = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"
        raise ModelFileError(f"{name} needs {needed / _GIB:.1f} GiB to load ({parts}) but {has}; try {advice}")


# -- loading ------------------------------------------------------------------------------------------------


def assemble(
    path: Path,
    *,
    text_encoders: Sequence[Path] = (),
    vae: Path | None = None,
    t5: bool = True,
    models_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    low_vram: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """The whole model around the SD 3.x, Flux.1, Chroma, Z-Image or Flux.2 Klein transformer file ``path``, every part named
    as the family's diffusers pipeline names it, with lienzo's bundled tokenizers (Qwen3's: found beside it).
    The other parts are looked for in the models dir the file lies in (the folder above its
    ``diffusion_models``/``unet`` folder), then in ``models_dir``. ``device`` and ``low_vram``: where the
    model will run, for :func:`plan_memory`.
    ``cancel`` is asked between the parts."""
    assembly = plan_assembly(path, text_encoders=text_encoders, vae=vae, t5=t5, models_dir=models_dir, dtype=dtype)
    name = f"model {assembly.path.name} ({assembly.spec.label})"
    plan_memory(assembly.pieces, device, name=name, low_vram=low_vram, dtype=dtype)
    return load_assembly(assembly, dtype=dtype, vae_dtype=vae_dtype, cancel=cancel)


def load_assembly(
    assembly: Assembly,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Read the pieces :func:`plan_assembly` chose."""
    from lienzo.models.tokenizers import bundled_for
    from lienzo.models.transformer_files import load_text_encoder_file, load_transformer_file

    spec, path = assembly.spec, assembly.path
    formats.stop_if_cancelled(cancel)
    _family, network = load_transformer_file(path, dtype=dtype)
    parts: dict = {}
    files: dict[str, str] = {}
    bundled = [kind for kind, piece in assembly.text_encoders.items() if piece is not None and piece.origin == "bundled"]
    if bundled:
        formats.stop_if_cancelled(cancel)
        parts.update(_bundled_text_encoders(path, spec, bundled, dtype))
    for slot in spec.text_encoders:
        piece = assembly.text_encoders[slot.kind]
        if piece is None:
            continue
        if piece.origin != "bundled":
            formats.stop_if_cancelled(cancel)
            projection = slot.model_class == "CLIPTextModelWithProjection"
            causal_lm = slot.model_class == "Qwen3ForCausalLM"
            parts[slot.component] = load_text_encoder_file(
                piece.path, slot.kind, dtype=dtype, projection=projection, causal_lm=causal_lm
            )
            files[slot.component] = piece.path.name
        parts[slot.component] = parts[slot.component].eval()
        if slot.kind in QWEN_KINDS:
            parts[slot.tokenizer] = _qwen_tokenizer(assembly.tokenizer, slot.kind, parts[slot.component], files.get(slot.component, ""))
        else:
            parts[slot.tokenizer] = bundled_for(slot.kind)
    formats.stop_if_cancelled(cancel)
    vae = _load_vae(assembly.vae, spec, vae_dtype_for({}, dtype, vae_dtype))
    schedule = dict(spec.scheduler)
    if spec.distilled_guidance and not getattr(network.config, "guidance_embeds", True):
        schedule.update(_SCHNELL_SCHEDULE)
    return Components(
        unet=None,
        transformer=network.eval(),
        vae=vae.eval(),
        scheduler_config=schedule,
        family=spec.name,
        is_distilled=is_distilled(spec, stem=path.stem),
        text_encoder_files=files,
        name=path.stem,
        source=path,
        vae_name="" if assembly.vae.origin == "bundled" else assembly.vae.path.stem,
        **parts,
    )


def _qwen_tokenizer(folder: Path | None, kind: str, encoder: torch.nn.Module, name: str):
    """Qwen's tokenizer from the folder :func:`plan_assembly` found, else lienzo's; Z-Image and Klein prompt Qwen3
    through its chat template (Qwen-Image's pipeline writes its own)."""
    from transformers import AutoTokenizer

    from lienzo.models.tokenizers import bundled_qwen_tokenizer

    if folder is None:
        tokenizer = bundled_qwen_tokenizer(kind)
        rows = encoder.get_input_embeddings().num_embeddings
        if rows < len(tokenizer):  # not one of Qwen's vocabularies: its ids would index other words, or none
            raise ModelFileError(
                f"text encoder {name or kind} embeds {rows:,} tokens, fewer than Qwen's {len(tokenizer):,}: put its own "
                f"{_TOKENIZER_FILE} beside it or pass --text-encoder FOLDER"
            )
        log.info("text encoder %s: no %s beside it; using lienzo's Qwen tokenizer", name or kind, _TOKENIZER_FILE)
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # the tokenizers library raises a plain Exception for a file it cannot parse
        raise ModelFileError(f"cannot read Qwen3's tokenizer in {folder}: {first_line(err)}") from None
    if kind == "qwen3" and not getattr(tokenizer, "chat_template", None):
        raise ModelFileError(
            f"Qwen3's tokenizer in {folder} has no chat template; "
            "add its tokenizer_config.json (a Z-Image or Klein diffusers folder's tokenizer/ has one)"
        )
    return tokenizer


def _bundled_text_encoders(path: Path, spec: Family, kinds: list[str], dtype: torch.dtype) -> dict:
    """The text encoders of ``kinds`` an all-in-one file carries, reading only their tensors."""
    from safetensors import safe_open

    from lienzo.models.transformer_files import load_text_encoders_from_state_dict

    prefixes = tuple(_BUNDLED_TEXT_ENCODER.format(kind=kind) for kind in kinds)
    with safe_open(path, framework="pt") as f:
        state_dict = {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefixes)}
    loaded = load_text_encoders_from_state_dict(state_dict, spec.name, dtype)
    wanted = {slot.component for slot in spec.text_encoders if slot.kind in kinds}
    if not wanted <= loaded.keys():
        lacking = ", ".join(sorted(wanted - loaded.keys()))
        raise ModelFileError(f"model {path.name}: its bundled text encoders ({lacking}) cannot be read")
    return {component: loaded[component] for component in wanted}


def _load_vae(piece: Piece, spec: Family, dtype: torch.dtype):
    from lienzo.models.transformer_files import load_flow_vae
    from lienzo.models.transformer_loading import diffusers_class

    if piece.origin == "bundled":
        from safetensors import safe_open

        with safe_open(piece.path, framework="pt") as f:
            state_dict = {key.removeprefix(_BUNDLED_VAE): f.get_tensor(key) for key in f.keys() if key.startswith(_BUNDLED_VAE)}
        return load_flow_vae(state_dict, spec.name, dtype=dtype)
    if piece.path.is_dir():
        return diffusers_class(spec.vae_class).from_pretrained(piece.path, local_files_only=True, torch_dtype=dtype)
    return load_flow_vae(piece.path, spec.name, dtype=dtype)


def folder_pieces(folder: Path, spec: Family, *, t5: bool = True, dtype: torch.dtype = torch.float32) -> list[Piece]:
    """The parts of a diffusers folder of a transformer family and what each takes read in ``dtype``, for
    :func:`plan_memory`."""
    parts = [("transformer", "transformer", False), ("vae", "vae", False)]
    parts += [(slot.kind, slot.component, slot.optional) for slot in spec.text_encoders if t5 or slot.kind != "t5xxl"]
    return [
        Piece(role, folder / sub, _size_of(folder / sub, dtype), "bundled", optional)
        for role, sub, optional in parts
        if (folder / sub).is_dir()
    ]


def check_t5_option(spec: Family, t5: bool, model: str) -> None:
    """``t5=False`` (``--no-t5``) is for a family that runs without T5 (SD 3.x); one line for Flux.1."""
    if not t5 and any(slot.kind == "t5xxl" and not slot.optional for slot in spec.text_encoders):
        raise ModelFileError(f"--no-t5: model {model} ({spec.label}) needs its T5-XXL text encoder; only SD 3.x runs without one")
