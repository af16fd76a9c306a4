"""What is in the models folder: checkpoints, VAEs, LoRAs, with A1111 short hashes.

Hashing a 2-7 GB checkpoint takes seconds to minutes, so hashes (and the architecture read from the
file) are cached in ``<data dir>/cache/models.json``, keyed by path and invalidated by size + mtime.
"""

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lienzo.errors import ModelFileError
from lienzo.files import write_atomic
from lienzo.models import formats
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
    sha256: str  # of the file; of a folder, over its files' hashes ("" when it could not be read)
    error: str | None = None  # why it cannot be read; architecture is then "unreadable: <error>"

    @property
    def is_checkpoint(self) -> bool:
        """A whole model that can generate: "SD 1.x", "SDXL inpainting", "SD (diffusers)", ..."""
        return self.architecture.startswith("SD")

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


def _shapes(path: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes: from the safetensors header alone, or by a weights-only load of a .ckpt."""
    if kind == "safetensors":
        return {k: shape for k, (shape, _) in formats.read_header(path).items()}
    return {k: tuple(v.shape) for k, v in formats.load_state_dict(path).items() if hasattr(v, "shape")}


UNREADABLE = "unreadable: "


def describe(path: Path) -> str:
    """A short human name for what a file or folder holds, judged by its content."""
    try:
        kind = formats.sniff(path)
        if kind == "diffusers-folder":
            index = formats.read_model_index(path)
            return "SDXL (diffusers)" if "text_encoder_2" in index else "SD (diffusers)"
        shapes = _shapes(path, kind)
    except ModelFileError as err:
        return f"{UNREADABLE}{err}"
    except OSError as err:
        return f"{UNREADABLE}cannot read {path.name}: {err.strerror or err}"
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
            fresh = cached is None or cached["stamp"] != stamp
            if fresh:
                if path.is_dir():
                    # A folder's hash: sha256 over its files' hashes, so any changed weight changes it.
                    joined = "".join(f"{f.relative_to(path)}:{sha256_file(f, cancel=cancel)}\n" for f in files)
                    digest = hashlib.sha256(joined.encode()).hexdigest()
                else:
                    digest = sha256_file(path, cancel=cancel)
                cached = {"stamp": stamp, "sha256": digest, "architecture": describe(path)}
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
        return ModelEntry(name, path, architecture, size, cached["sha256"][:10], cached["sha256"], error)

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
