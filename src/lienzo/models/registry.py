"""What is in the models folder: checkpoints, VAEs, LoRAs, with A1111 short hashes.

Hashing a 2-7 GB checkpoint takes seconds to minutes, so hashes (and the architecture read from the
file) are cached in ``<data dir>/cache/models.json``, keyed by path and invalidated by size + mtime.
"""

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lienzo.errors import ModelFileError
from lienzo.files import write_atomic
from lienzo.models import formats
from lienzo.models.families import FAMILIES, is_distilled
from lienzo.models.paths import check_model_path

log = logging.getLogger(__name__)

# An A1111 checkpoint title, "name.safetensors [hash]"; clients send the hash short (10) or whole (64).
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")

# The model shipped inside the package (src/lienzo/weights/), used when no model is named.
EMBEDDED_NAME = "lienzo-mini"
EMBEDDED = Path(__file__).resolve().parents[1] / "weights" / EMBEDDED_NAME


def embedded_model() -> Path | None:
    """The shipped default model's folder, if this install has it."""
    return EMBEDDED if (EMBEDDED / "model_index.json").is_file() else None


WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf"}
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
# What the architecture column calls a model that can generate: its family's label, with what it adds
# ("SDXL inpainting", "Flux.1 schnell", "Z-Image (diffusers)"), or "SD (diffusers)" for a U-Net folder.
_CHECKPOINT_PREFIXES = ("SD", *(family.label for family in FAMILIES.values()))
# ComfyUI's folders for the text encoders of a split model (lienzo.models.assembly reads them).
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")
TEXT_ENCODER_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL", "qwen3": "Qwen3", "qwen25vl": "Qwen2.5-VL"}
# Raised when describe() or weight_format() learn something new: cached descriptions are made again, hashes kept.
_DESCRIPTION_VERSION = 5
# A1111's layout: LoRAs live in <models>/Lora (some tools say "loras"); they are never checkpoints.
LORA_FOLDERS = ("lora", "loras")
LORA_SHORT_HASH = 12  # A1111 writes the first 12 hex digits in "Lora hashes"
# Textual-inversion embeddings live in <models>/embeddings (lienzo.models.embeddings); never checkpoints either.
EMBEDDINGS_FOLDER = "embeddings"
EMBEDDING_SHORT_HASH = 12  # A1111's Embedding.shorthash, what "TI hashes" writes: sha256[0:12]


@dataclass
class ModelEntry:
    name: str
    path: Path
    architecture: str
    size_bytes: int
    short_hash: str
    sha256: str  # of the file; of a folder, over its files' hashes ("" when it could not be read)
    error: str | None = None  # why it cannot be read; architecture is then "unreadable: <error>"
    quantization: str = ""  # how its weights are stored: "fp16", "bf16", "scaled fp8", "GGUF Q8_0", ... ("": unknown)

    @property
    def is_checkpoint(self) -> bool:
        """A model that can generate: "SD 1.x", "SDXL inpainting", "SD (diffusers)", "SD 3.x", "Flux.1 schnell", ...;
        a transformer file alone counts too (its text encoders and VAE are found beside it: lienzo.models.assembly)."""
        return self.architecture.startswith(_CHECKPOINT_PREFIXES)

    @property
    def file_name(self) -> str:
        """The name with the file's extension; a folder (diffusers) has none."""
        return self.name + (self.path.suffix if self.path.is_file() else "")

    @property
    def title(self) -> str:
        """``file name [short hash]``: how AUTOMATIC1111 lists a checkpoint, and what its clients send back to pick one."""
        return f"{self.file_name} [{self.short_hash}]"

    @property
    def flat_name(self) -> str:
        """The name with its folders joined by ``_`` (A1111's ``model_name``)."""
        return self.name.replace("/", "_").replace("\\", "_")


@dataclass
class LoraEntry:
    name: str  # the file stem, as <lora:NAME:1> names it
    path: Path
    size_bytes: int
    short_hash: str


@dataclass
class EmbeddingEntry:
    name: str  # the file stem: the word a prompt triggers it with
    path: Path
    size_bytes: int
    short_hash: str  # of the whole file


def sha256_file(path: Path, chunk: int = 1 << 24, *, offset: int = 0, cancel: Callable[[], bool] | None = None) -> str:
    """The file's sha256 from ``offset`` on; ``cancel`` is asked between 16 MB blocks (a 7 GB checkpoint
    takes a while)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            digest.update(block)
            formats.stop_if_cancelled(cancel)
    return digest.hexdigest()


def lora_hash(path: Path) -> str:
    """A LoRA's hash as A1111 shows it: the ``sshs_model_hash`` its trainer stored, else for safetensors the
    sha256 of the tensor data after the 8-byte length and JSON header (kohya's "addnet" hash, so editing
    metadata keeps the hash), else the sha256 of the whole file."""
    path = Path(path)
    if formats.sniff(path) != "safetensors":
        return sha256_file(path)
    stored = formats.read_metadata(path).get("sshs_model_hash")
    if stored:
        return stored
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    return sha256_file(path, offset=8 + header_length)


def _folder_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# name -> (shape in torch's order, storage type such as "F16", "F8_E4M3" or GGUF's "Q8_0", size in bytes)
Tensors = dict[str, tuple[tuple[int, ...], str, int]]


def header_tensors(path: Path, kind: str | None = None) -> Tensors:
    """Every tensor's shape, storage type and size, read from a safetensors or GGUF header alone (no tensor
    data); a ``.ckpt`` is loaded, weights only, to see them."""
    path = Path(path)
    kind = kind or formats.sniff(path)
    if kind == "safetensors":
        return {
            k: (shape, dtype, math.prod(shape) * formats._DTYPE_BITS[dtype] // 8)
            for k, (shape, dtype) in formats.read_header(path).items()
        }
    if kind == "gguf":
        return _gguf_tensors(path)
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
        for k, v in formats.load_state_dict(path).items()
        if hasattr(v, "shape")
    }


def _gguf_tensors(path: Path) -> Tensors:
    """A GGUF file's tensors, each sized by its quantization's blocks (``Q8_0``: 34 bytes per 32 weights)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = {}
    for name, (shape, kind) in formats.read_gguf_header(path).items():
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        tensors[name] = (shape, kind, math.prod(shape) // block * block_bytes)
    return tensors


# Storage types as people name them (safetensors' and torch's spellings); GGUF's keep their own ("Q8_0", "Q4_K").
_PRECISIONS = {
    "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8", "F8_E5M2": "fp8",
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}


def weight_format(tensors: Tensors, *, gguf: bool = False) -> str:
    """How most of the weights' bytes are stored: "fp16", "bf16", "fp32", "fp8", "scaled fp8" (fp8 with
    scales beside, ComfyUI's ``*_scaled`` files) or "GGUF Q8_0" (GGUF: its main quantization); "" for no tensors."""
    totals: dict[str, int] = {}
    for _, dtype, size in tensors.values():
        totals[dtype] = totals.get(dtype, 0) + size
    if not totals:
        return ""
    main = max(totals, key=totals.get)
    if gguf:
        return f"GGUF {main}"
    name = _PRECISIONS.get(main, main.lower())
    scaled = any(k == "scaled_fp8" or k.endswith((".scale_weight", ".weight_scale")) for k in tensors)
    return f"scaled {name}" if name == "fp8" and scaled else name


UNREADABLE = "unreadable: "


def describe(path: Path) -> str:
    """A short human name for what a file or folder holds, judged by its content."""
    return examine(path)[0]


def examine(path: Path) -> tuple[str, str]:
    """What a file or folder holds (:func:`describe`) and how its weights are stored (:func:`weight_format`)."""
    path = Path(path)
    try:
        kind = formats.sniff(path)
        if kind == "diffusers-folder":
            return _describe_folder(path), _folder_format(path)
        tensors = header_tensors(path, kind)
    except ModelFileError as err:
        return f"{UNREADABLE}{err}", ""
    except OSError as err:
        return f"{UNREADABLE}cannot read {path.name}: {err.strerror or err}", ""
    shapes = {k: shape for k, (shape, _, _) in tensors.items()}
    return _describe_tensors(path, shapes), weight_format(tensors, gguf=kind == "gguf")


def _describe_folder(path: Path) -> str:
    from lienzo.models.transformer_loading import transformer_family

    index = formats.read_model_index(path)
    spec = transformer_family(index)
    if spec is None:
        if formats.is_refiner_index(index):
            return "SDXL refiner (diffusers)"
        return "SDXL (diffusers)" if "text_encoder_2" in index else "SD (diffusers)"
    config_file = path / "transformer" / "config.json"
    config = formats.read_json_file(config_file) if config_file.is_file() else {}
    schnell = spec.distilled_guidance and config.get("guidance_embeds") is False
    base = is_distilled(spec, index=index) is False
    return f"{spec.label}{' schnell' if schnell else ''}{' base' if base else ''} (diffusers)"


def _folder_format(path: Path) -> str:
    """The weight format of a diffusers folder's safetensors files, together."""
    tensors: Tensors = {}
    for file in _folder_files(path):
        if file.suffix == ".safetensors":
            relative = file.relative_to(path).as_posix()
            tensors.update({f"{relative}:{k}": v for k, v in header_tensors(file, "safetensors").items()})
    return weight_format(tensors)


def _describe_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    try:
        arch = formats.detect_architecture(shapes)
    except ModelFileError:
        pass
    else:
        return _FAMILY_NAMES[arch.family] + (" inpainting" if arch.inpainting else "")
    from lienzo.models.transformer_files import detect_transformer_family, text_encoder_kind

    family = detect_transformer_family(shapes)
    if family is not None:
        base = is_distilled(FAMILIES[family], stem=path.stem) is False
        return FAMILIES[family].label + (" schnell" if is_schnell(family, shapes) else "") + (" base" if base else "")
    kind = text_encoder_kind(shapes) or (text_encoder_kind_by_name(path.name) if in_text_encoder_folder(path) else None)
    if kind is not None:
        return f"text encoder ({TEXT_ENCODER_LABELS[kind]})"
    keys = shapes.keys()
    if any("lora_" in k for k in keys):
        return "LoRA"
    if any(k.startswith(("encoder.down", "first_stage_model.encoder", "decoder.up")) for k in keys):
        return "VAE"
    return "not a checkpoint"


def is_schnell(family: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A Flux.1 network without the distilled-guidance input (schnell), in any key naming."""
    return family == "flux" and not any("guidance_in." in k or "guidance_embedder." in k for k in shapes)


def text_encoder_kind_by_name(name: str) -> str | None:
    """The text encoder ComfyUI's file names say a file is: ``clip_l*``, ``clip_g*``, ``t5*``, ``*t5xxl*``,
    ``qwen_2.5_vl*`` (Qwen-Image's) or another ``qwen*``."""
    name = name.lower()
    if name.startswith("clip_l"):
        return "clip_l"
    if name.startswith("clip_g"):
        return "clip_g"
    if name.startswith("t5") or "t5xxl" in name:
        return "t5xxl"
    if name.startswith(("qwen_2.5_vl", "qwen2.5-vl", "qwen2_5_vl")):  # qwen_2.5_vl_7b.safetensors, Qwen-Image's
        return "qwen25vl"
    if name.startswith("qwen"):  # qwen_3_4b.safetensors, Z-Image's and Flux.2 Klein's
        return "qwen3"
    return None


def in_text_encoder_folder(path: Path) -> bool:
    """Whether ``path`` lies in a folder ComfyUI keeps text encoders in (``text_encoders``, ``clip``)."""
    return any(part.lower() in TEXT_ENCODER_FOLDERS for part in Path(path).parent.parts)


# The size each family was trained at, which single-file checkpoints don't state (SD 2.x: the 768-v models).
_NATIVE_SIDES = {"SD 1.x": 512, "SD 2.x": 768, "SDXL": 1024, "SDXL refiner": 1024}


def native_size(entry: ModelEntry) -> int | None:
    """The side, in pixels, a model draws best at: from a diffusers folder's UNet and VAE configs,
    else by architecture; ``None`` when neither tells."""
    if entry.path.is_dir():
        try:
            unet = json.loads((entry.path / "unet" / "config.json").read_text())
            vae = json.loads((entry.path / "vae" / "config.json").read_text())
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return _NATIVE_SIDES.get(entry.architecture.removesuffix(" inpainting"))


class Registry:
    """Scans ``models_dir`` (recursively) and resolves ``--model`` names to paths."""

    def __init__(self, models_dir: Path, cache_dir: Path):
        self.models_dir = Path(models_dir)
        self.cache_file = Path(cache_dir) / "models.json"
        self._cache: dict | None = None

    def _load_cache(self) -> dict:
        if self._cache is None:
            try:
                self._cache = json.loads(self.cache_file.read_text())
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def _save_cache(self) -> None:
        write_atomic(self.cache_file, lambda file: file.write(json.dumps(self._cache).encode()))

    def candidates(self) -> list[Path]:
        """Weight files and diffusers folders under the models dir, in name order."""
        if not self.models_dir.is_dir():
            return []
        found = [p.parent for p in self.models_dir.rglob("model_index.json")]
        skip = [*found, *self._lora_dirs(), self.models_dir / EMBEDDINGS_FOLDER]
        for p in self.models_dir.rglob("*"):
            if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and not any(p.is_relative_to(d) for d in skip):
                found.append(p)
        return sorted(found, key=lambda p: str(p).lower())

    def entry(self, path: Path, *, cancel: Callable[[], bool] | None = None) -> ModelEntry:
        """Describe one model, from the cache when the file is unchanged. One that cannot be read is
        described all the same, with ``error`` saying why, so that one damaged file hides no other model.
        A device, FIFO or folder that is not a model is never opened nor hashed. ``cancel`` is asked while
        hashing."""
        path = Path(path).resolve()
        try:
            name = str(path.relative_to(self.models_dir.resolve()))
        except ValueError:
            name = path.name
        name = name.removesuffix(path.suffix) if path.is_file() else name
        cache = self._load_cache()
        try:
            check_model_path(path, field=None)
            files = _folder_files(path) if path.is_dir() else [path]
            stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
            cached = cache.get(str(path))
            rehash = cached is None or cached["stamp"] != stamp
            fresh = rehash or cached.get("version") != _DESCRIPTION_VERSION
            if rehash:
                if path.is_dir():
                    # A folder's hash: sha256 over its files' hashes, so any changed weight changes it.
                    joined = "".join(f"{f.relative_to(path)}:{sha256_file(f, cancel=cancel)}\n" for f in files)
                    digest = hashlib.sha256(joined.encode()).hexdigest()
                else:
                    digest = sha256_file(path, cancel=cancel)
                cached = {"stamp": stamp, "sha256": digest}
            if fresh:  # an unchanged file described by an older lienzo keeps its hash
                architecture, quantization = examine(path)
                cached = {**cached, "architecture": architecture, "quantization": quantization, "version": _DESCRIPTION_VERSION}
        except ModelFileError as err:
            return ModelEntry(name, path, f"{UNREADABLE}{err}", 0, "", "", error=str(err))
        except OSError as err:
            reason = f"cannot read {path}: {err.strerror or err}"
            return ModelEntry(name, path, f"{UNREADABLE}{reason}", 0, "", "", error=reason)
        if fresh:
            cache[str(path)] = cached
            self._save_cache()
        size = sum(s for _, s, _ in stamp)
        architecture = cached["architecture"]
        error = architecture.removeprefix(UNREADABLE) if architecture.startswith(UNREADABLE) else None
        sha256 = cached["sha256"]
        return ModelEntry(name, path, architecture, size, sha256[:10], sha256, error, cached.get("quantization", ""))

    def scan(self) -> list[ModelEntry]:
        return [self.entry(p) for p in self.candidates()]

    def checkpoints(self, *, unreadable: bool = False, also: Path | None = None) -> list[ModelEntry]:
        """What can generate: lienzo's own model first (when this install ships it), then the
        models dir's checkpoints (not its VAEs or unknown files). With ``unreadable``, also the files
        that cannot be read (``error`` says why), for listings that tell a user why a model is missing.
        ``also``: a model outside the models dir to list last (the one ``lienzo serve --model`` named)."""
        embedded = embedded_model()
        own = [self.entry(embedded)] if embedded is not None else []
        entries = [e for e in own + self.scan() if e.is_checkpoint or (unreadable and e.error)]
        if also is not None and all(e.path != also for e in entries):
            entries.append(self.entry(also))
        return entries

    def checkpoint_by_title(self, title: str, *, also: Path | None = None) -> ModelEntry | None:
        """The checkpoint an AUTOMATIC1111 client names: by title (``ModelEntry.title``), the title's
        name or hash, file name, name, A1111 model_name or short hash, in any case; None when none is.
        ``also`` as for :meth:`checkpoints`."""
        wanted = title.strip()
        keys = {wanted.lower()}
        match = _TITLE.match(wanted)
        if match:
            keys |= {match["name"].lower(), match["hash"].lower()[:10]}
        for entry in self.checkpoints(also=also):
            aliases = {entry.title, entry.file_name, entry.name, entry.flat_name, entry.short_hash, entry.path.name}
            if keys & {alias.lower() for alias in aliases}:
                return entry
        return None

    def resolve(self, name_or_path: str | Path, *, allow_paths: bool = True, field: str = "model") -> Path:
        """A model in the models dir by name, file name, short hash or path inside it; errors name ``field``.

        ``allow_paths`` (a local user: the CLI, the Python API) also takes any path to a file or model
        folder. A remote caller (every HTTP door) passes False: then a path must lead, symlinks followed,
        into the models dir (or be the shipped model's), so no client makes the server read /etc/passwd,
        hash a home directory or block on /dev/zero. Either way only a regular file or a folder with
        model_index.json or config.json is returned.
        """
        text = str(name_or_path)
        if allow_paths:
            given = Path(text).expanduser()
            if _exists(given):
                return check_model_path(given, field)
        else:
            inside = _within(self.models_dir / text, [self.models_dir])
            if inside is not None and _exists(inside):
                return check_model_path(inside, field)
        wanted = text.lower()
        candidates = self.candidates()
        for p in candidates:
            rel = p.relative_to(self.models_dir).as_posix().lower()
            if wanted in (rel, rel.removesuffix(p.suffix.lower()), p.name.lower(), p.stem.lower()):
                return p
        for p in candidates:
            if self.entry(p).short_hash == wanted:
                return p
        embedded = embedded_model()
        if embedded is not None and (wanted == EMBEDDED_NAME or _within(Path(text), [embedded]) == embedded.resolve()):
            return embedded
        names = ", ".join(self.entry(p).name for p in candidates) or f"none: the models dir {self.models_dir} is empty"
        if not allow_paths and _looks_like_a_path(text):
            raise ModelFileError(
                f"{field}: {text!r} is not in the models dir {self.models_dir}; "
                f"this server loads only the models there: {names}"
            )
        raise ModelFileError(f"{field}: no model named {text!r}; available: {names}")

    def _lora_dirs(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return [d for d in self.models_dir.iterdir() if d.is_dir() and d.name.lower() in LORA_FOLDERS]

    def _lora_files(self) -> list[tuple[Path, Path]]:
        """(LoRA folder, file) pairs, in file-stem order."""
        pairs = [(d, p) for d in self._lora_dirs() for p in d.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
        return sorted(pairs, key=lambda pair: (pair[1].stem.lower(), str(pair[1]).lower()))

    def loras(self) -> list[LoraEntry]:
        """LoRA files in ``<models>/Lora`` or ``<models>/loras`` (sub-folders too), in name order, with A1111 hashes."""
        return [self._lora_entry(p) for _, p in self._lora_files()]

    def _lora_entry(self, path: Path) -> LoraEntry:
        # Its own cache key: a LoRA's hash is the "addnet" hash, not the checkpoints' whole-file sha256.
        path, size, digest = self._hashed(path, "lora", lora_hash)
        return LoraEntry(path.stem, path, size, digest[:LORA_SHORT_HASH])

    def _hashed(self, path: Path, kind: str, hasher: Callable[[Path], str]) -> tuple[Path, int, str]:
        """The resolved path, size and ``hasher``'s hash of a file, the hash cached under ``kind`` until the file changes."""
        path = path.resolve()
        stat = path.stat()
        stamp = [[str(path), stat.st_size, stat.st_mtime_ns]]
        key = f"{kind}:{path}"
        cache = self._load_cache()
        cached = cache.get(key)
        if cached is None or cached["stamp"] != stamp:
            cached = {"stamp": stamp, "hash": hasher(path)}
            cache[key] = cached
            self._save_cache()
        return path, stat.st_size, cached["hash"]

    def embeddings(self) -> list[EmbeddingEntry]:
        """Files in ``<models>/embeddings`` (sub-folders too) that may be textual-inversion embeddings, in name order,
        with A1111's short hash (of the whole file, cached as a checkpoint's is). Their contents are
        ``lienzo.models.embeddings``' to read."""
        from lienzo.models.embeddings import embedding_files  # here: that module imports this one

        files = sorted(embedding_files(self.models_dir / EMBEDDINGS_FOLDER), key=lambda p: (p.stem.lower(), str(p).lower()))
        return [self._embedding_entry(p) for p in files]

    def _embedding_entry(self, path: Path) -> EmbeddingEntry:
        path, size, digest = self._hashed(path, "embedding", sha256_file)
        return EmbeddingEntry(path.stem, path, size, digest[:EMBEDDING_SHORT_HASH])

    def resolve_lora(self, name_or_path: str | Path, *, allow_paths: bool = True, field: str = "lora") -> Path:
        """A LoRA file by stem, file name or path inside the LoRA folder (``styles/film``); errors name ``field``.

        ``allow_paths`` (a local user) also takes the path of any regular file. A remote caller passes
        False: then a path counts only when it leads, symlinks followed, to a file the LoRA folders list.
        """
        text = str(name_or_path)
        if allow_paths:
            given = Path(text).expanduser()
            if _is_file(given):
                return given
        files = self._lora_files()
        wanted = text.lower()
        for folder, p in files:
            inside = p.relative_to(folder).as_posix().lower()
            if wanted in (p.stem.lower(), p.name.lower(), inside, inside.removesuffix(p.suffix.lower())):
                return p
        if not allow_paths:
            target = _within(self.models_dir / text, [folder for folder, _ in files])
            for _, p in files:
                if target is not None and p.resolve() == target:
                    return p
        names = ", ".join(p.stem for _, p in files) or f"none: put LoRA files in {self.models_dir / 'Lora'}"
        if not allow_paths and _looks_like_a_path(text):
            raise ModelFileError(
                f"{field}: {text!r} is not in the models dir's LoRA folder; this server applies only the LoRAs there: {names}"
            )
        raise ModelFileError(f"{field}: no LoRA named {text!r}; available: {names}")

    def as_dict(self, entry: ModelEntry) -> dict:
        return {**asdict(entry), "path": str(entry.path)}


def _exists(path: Path) -> bool:
    """``path.exists()``, False for names no file can have (a NUL byte, too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _within(path: Path, roots: list[Path]) -> Path | None:
    """``path`` with symlinks and ``..`` resolved, when that lies inside one of ``roots`` (resolved too);
    else None. Only ``lstat``/``readlink`` are used: nothing is opened."""
    try:
        resolved = path.resolve()
        return resolved if any(resolved.is_relative_to(root.resolve()) for root in roots) else None
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
        return None


def _looks_like_a_path(text: str) -> bool:
    path = Path(text)
    return path.is_absolute() or ".." in path.parts or text.startswith("~")
