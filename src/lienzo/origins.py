"""The facts a saved image states about its origin (:mod:`lienzo.images.provenance` writes them): the
model's and each active LoRA's hashes, and what a lienzo-trained model or LoRA says about its training
data. Reading a manifest or hashing a file is done once per file version (size and mtime), not per image.
"""

import functools
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lienzo.errors import DatasetError
from lienzo.images.provenance import LORA_MANIFEST_KEY, MANIFEST_NAME, LoraInfo, ModelInfo, Provenance, TrainingData
from lienzo.models import formats
from lienzo.models.registry import lora_hash
from lienzo.training.manifest import read_manifest

if TYPE_CHECKING:  # Components imports diffusers; listing models (training_data_for) should not
    from lienzo.models.components import Components

log = logging.getLogger(__name__)


def provenance_for(components: "Components") -> Provenance:
    """The provenance of images made with loaded ``components`` (:func:`load_model` sets their hashes),
    after the LoRAs are applied. Reading a manifest or hashing a LoRA is done once per file version, not per image."""
    model = ModelInfo(components.name, components.sha256 or None, components.short_hash or None, components.family)
    loras = tuple(_lora_info(lora.name, lora.weight, lora.file) for lora in components.loras.active)
    training = training_data_for(components.source) if components.source is not None else None
    return Provenance(model, loras, training)


def training_data_for(model: Path) -> TrainingData | None:
    """What a model states about its training data: a lienzo-trained folder's dataset manifest."""
    model = Path(model)
    return _training_data(model / MANIFEST_NAME) if model.is_dir() else None


def _lora_info(name: str, weight: float, file: Path | None) -> LoraInfo:
    """One active LoRA with its full hash and, for one lienzo trained, its dataset manifest's hash."""
    full, trained = _lora_hashes(*_stamped(file)) if file is not None and file.is_file() else (None, None)
    return LoraInfo(name, float(weight), full, trained)


def _stamped(path: Path) -> tuple[str, int, int]:
    """A path with its size and mtime: a cache key that changes when the file does."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _lora_hashes(path: str, _size: int, _mtime_ns: int) -> tuple[str, str | None]:
    trained = formats.read_metadata(Path(path)).get(LORA_MANIFEST_KEY) if formats.sniff(Path(path)) == "safetensors" else None
    return lora_hash(Path(path)), trained or None


def _training_data(manifest: Path) -> TrainingData | None:
    if not manifest.is_file():
        return None
    return _read_training_data(*_stamped(manifest))


@functools.lru_cache(maxsize=16)
def _read_training_data(path: str, _size: int, _mtime_ns: int) -> TrainingData | None:
    """The manifest's hash (of its bytes, as the trainer's ``write_manifest`` reports it), licence,
    source and image count. A manifest that cannot be read leaves the record without training data
    (logged): saving an image must not fail over it."""
    try:
        manifest = read_manifest(Path(path))
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (DatasetError, OSError) as err:
        log.warning("provenance: leaving out the training data: %s", err)
        return None
    return TrainingData(digest, manifest["licence"], manifest["source"], int(manifest["counts"]["images"]))
