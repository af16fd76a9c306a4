"""What is in the models folder: checkpoints, VAEs, LoRAs, with A1111 short hashes.

Hashing a 2-7 GB checkpoint takes seconds to minutes, so hashes (and the architecture read from the
file) are cached in ``<data dir>/cache/models.json``, keyed by path and invalidated by size + mtime.
"""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lienzo.errors import ModelFileError
from lienzo.images.io import write_atomic
from lienzo.models import formats

log = logging.getLogger(__name__)

# The model shipped inside the package (src/lienzo/weights/), used when no model is named.
EMBEDDED_NAME = "lienzo-mini"
EMBEDDED = Path(__file__).resolve().parents[1] / "weights" / EMBEDDED_NAME


def embedded_model() -> Path | None:
    """The shipped default model's folder, if this install has it."""
    return EMBEDDED if (EMBEDDED / "model_index.json").is_file() else None


WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# A1111's layout: LoRAs live in <models>/Lora (some tools say "loras"); they are never checkpoints.
LORA_FOLDERS = ("lora", "loras")
LORA_SHORT_HASH = 12  # A1111 writes the first 12 hex digits in "Lora hashes"


@dataclass
class ModelEntry:
    name: str
    path: Path
    architecture: str
    size_bytes: int
    short_hash: str
    sha256: str  # of the file; of a folder, over its files' hashes

    @property
    def is_checkpoint(self) -> bool:
        """A whole model that can generate: "SD 1.x", "SDXL inpainting", "SD (diffusers)", ..."""
        return self.architecture.startswith("SD")


@dataclass
class LoraEntry:
    name: str  # the file stem, as <lora:NAME:1> names it
    path: Path
    size_bytes: int
    short_hash: str


def sha256_file(path: Path, chunk: int = 1 << 24, *, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            digest.update(block)
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


def _shapes(path: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes: from the safetensors header alone, or by a weights-only load of a .ckpt."""
    if kind == "safetensors":
        return {k: shape for k, (shape, _) in formats.read_header(path).items()}
    return {k: tuple(v.shape) for k, v in formats.load_state_dict(path).items() if hasattr(v, "shape")}


def describe(path: Path) -> str:
    """A short human name for what a file or folder holds, judged by its content."""
    try:
        kind = formats.sniff(path)
        if kind == "diffusers-folder":
            index = json.loads((path / "model_index.json").read_text())
            return "SDXL (diffusers)" if "text_encoder_2" in index else "SD (diffusers)"
        shapes = _shapes(path, kind)
    except ModelFileError as err:
        return f"unreadable: {err}"
    try:
        arch = formats.detect_architecture(shapes)
    except ModelFileError:
        keys = shapes.keys()
        if any("lora_" in k for k in keys):
            return "LoRA"
        if any(k.startswith(("encoder.down", "first_stage_model.encoder", "decoder.up")) for k in keys):
            return "VAE"
        return "not a checkpoint"
    return _FAMILY_NAMES[arch.family] + (" inpainting" if arch.inpainting else "")


# The size each family was trained at, which single-file checkpoints don't state (SD 2.x: the 768-v models).
_NATIVE_SIDES = {"SD 1.x": 512, "SD 2.x": 768, "SDXL": 1024}


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
        skip = [*found, *self._lora_dirs()]
        for p in self.models_dir.rglob("*"):
            if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and not any(p.is_relative_to(d) for d in skip):
                found.append(p)
        return sorted(found, key=lambda p: str(p).lower())

    def entry(self, path: Path) -> ModelEntry:
        """Describe one model, from the cache when the file is unchanged."""
        path = Path(path).resolve()
        files = _folder_files(path) if path.is_dir() else [path]
        stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        cache = self._load_cache()
        cached = cache.get(str(path))
        if cached is None or cached["stamp"] != stamp:
            if path.is_dir():
                # A folder's hash: sha256 over its files' hashes, so any changed weight changes it.
                joined = "".join(f"{f.relative_to(path)}:{sha256_file(f)}\n" for f in files)
                digest = hashlib.sha256(joined.encode()).hexdigest()
            else:
                digest = sha256_file(path)
            cached = {"stamp": stamp, "sha256": digest, "architecture": describe(path)}
            cache[str(path)] = cached
            self._save_cache()
        try:
            name = str(path.relative_to(self.models_dir.resolve()))
        except ValueError:
            name = path.name
        name = name.removesuffix(path.suffix) if path.is_file() else name
        size = sum(s for _, s, _ in stamp)
        return ModelEntry(name, path, cached["architecture"], size, cached["sha256"][:10], cached["sha256"])

    def scan(self) -> list[ModelEntry]:
        return [self.entry(p) for p in self.candidates()]

    def checkpoints(self) -> list[ModelEntry]:
        """What can generate: lienzo's own model first (when this install ships it), then the
        models dir's checkpoints (not its VAEs or unknown files)."""
        embedded = embedded_model()
        own = [self.entry(embedded)] if embedded is not None else []
        return own + [e for e in self.scan() if e.is_checkpoint]

    def resolve(self, name_or_path: str | Path) -> Path:
        """A path as given, else a model in the models dir by name, file name or short hash."""
        given = Path(name_or_path).expanduser()
        if given.exists():
            return given
        wanted = str(name_or_path).lower()
        candidates = self.candidates()
        for p in candidates:
            rel = str(p.relative_to(self.models_dir)).lower()
            if wanted in (rel, rel.removesuffix(p.suffix.lower()), p.name.lower(), p.stem.lower()):
                return p
        for p in candidates:
            if self.entry(p).short_hash == wanted:
                return p
        embedded = embedded_model()
        if embedded is not None and wanted == EMBEDDED_NAME:
            return embedded
        names = ", ".join(self.entry(p).name for p in candidates) or f"none: the models dir {self.models_dir} is empty"
        raise ModelFileError(f"model: no model named {name_or_path!r}; available: {names}")

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
        path = path.resolve()
        stat = path.stat()
        stamp = [[str(path), stat.st_size, stat.st_mtime_ns]]
        # Its own cache key: a LoRA's hash is the "addnet" hash, not the checkpoints' whole-file sha256.
        key = f"lora:{path}"
        cache = self._load_cache()
        cached = cache.get(key)
        if cached is None or cached["stamp"] != stamp:
            cached = {"stamp": stamp, "hash": lora_hash(path)}
            cache[key] = cached
            self._save_cache()
        return LoraEntry(path.stem, path, stat.st_size, cached["hash"][:LORA_SHORT_HASH])

    def resolve_lora(self, name_or_path: str | Path) -> Path:
        """A LoRA file by path, else by stem, file name or path inside the LoRA folder (``styles/film``)."""
        given = Path(name_or_path).expanduser()
        if given.is_file():
            return given
        wanted = str(name_or_path).lower()
        files = self._lora_files()
        for folder, p in files:
            inside = p.relative_to(folder).with_suffix("").as_posix().lower()
            if wanted in (p.stem.lower(), p.name.lower(), inside):
                return p
        names = ", ".join(p.stem for _, p in files) or f"none: put LoRA files in {self.models_dir / 'Lora'}"
        raise ModelFileError(f"lora: no LoRA named {str(name_or_path)!r}; available: {names}")

    def as_dict(self, entry: ModelEntry) -> dict:
        return {**asdict(entry), "path": str(entry.path)}
