"""Textual-inversion embeddings as AUTOMATIC1111 has them: a file in the models dir's ``embeddings`` folder
(sub-folders too) whose name, written in a prompt, stands for the vectors learnt in its place.

The formats people have (A1111's ``create_embedding_from_data`` reads the same ones):

- A1111 ``.pt``: ``{"string_to_param": {"*": (vectors, width)}, "name", "step", "sd_checkpoint",
  "sd_checkpoint_name", "string_to_token"}``: tensors, dicts, ints and strings, which ``torch.load``'s
  weights-only unpickler reads as they are (no allow-listing needed);
- diffusers ``.bin`` (``learned_embeds.bin``) and ``.safetensors`` with ``emb_params``: one tensor under one key,
  (width,) or (vectors, width);
- SDXL ``.safetensors``: ``clip_l`` (vectors, 768) for the first text encoder and ``clip_g`` (vectors, 1280) for the second;
- A1111's PNG embeddings: the ``.pt`` dict as base64 JSON in the image's ``sd-ti-embedding`` text chunk (tensors
  as ``{"TORCHTENSOR": nested lists}``). Those hidden in the pixels (A1111's ``extract_image_data_embed``) are not read.

Every file is read weights-only; a pickle that needs code is refused. The name is the file's stem (a PNG's is the one
it carries), and A1111's short hash is the first 12 hex digits of the file's sha256 (``Embedding.set_hash``).

The embeddings a model can use hang on its first text encoder (:func:`model_embeddings`), so that one model's never
reach another's prompts; an embedding of another width than the model's encoders is *skipped* for it, as A1111
skips it, and listed as such. :mod:`lienzo.generation.prompts` replaces a trigger's tokens with the vectors.
"""

import base64
import binascii
import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lienzo.errors import ModelFileError
from lienzo.models import formats
from lienzo.models.components import Components
from lienzo.models.families import FAMILIES
from lienzo.models.registry import EMBEDDING_SHORT_HASH, EMBEDDINGS_FOLDER, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "EMBEDDINGS_FOLDER", "Embedding", "ModelEmbeddings", "current_embeddings", "model_embeddings", "read_embedding",
    "refresh_embeddings",
]

EMBEDDING_SUFFIXES = {".pt", ".bin", ".safetensors", ".png"}
# A trigger's vectors go into one 75-token chunk (lienzo.generation.prompts.CHUNK_TOKENS); more cannot be placed.
MAX_VECTORS = 75
_PNG_KEY = "sd-ti-embedding"


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: ``vectors`` is (count, width) float32 per text encoder it is for, one for SD 1.x/2.x,
    (clip_l, clip_g) for SDXL; ``step``, ``sd_checkpoint`` and ``sd_checkpoint_name`` are what A1111's trainer wrote."""

    name: str
    vectors: tuple[Tensor, ...]
    file: Path
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        """How many tokens it takes in a prompt: one per vector."""
        return self.vectors[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(vectors.shape[-1] for vectors in self.vectors)

    @property
    def shape(self) -> int:
        """A1111's ``shape``: the width of a vector, summed over the encoders (2048 for an SDXL pair)."""
        return sum(self.widths)

    @property
    def short_hash(self) -> str:
        return self.sha256[:EMBEDDING_SHORT_HASH]

    def describe(self) -> dict:
        """The fields A1111's ``/sdapi/v1/embeddings`` gives each embedding."""
        return {
            "step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape, "vectors": self.count,
        }


def read_embedding(path: Path) -> Embedding | None:
    """The embedding in ``path``; None for a PNG that carries none (a picture beside them, a ``.preview.png``).
    ModelFileError, naming the file, for one that cannot be read or is no embedding."""
    path = Path(path)
    name = path.stem
    if path.suffix.lower() == ".png":
        data = _png_data(path)
        if data is None:
            return None
        name = str(data.get("name") or name)
    elif path.suffix.lower() == ".safetensors":
        try:
            data = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ModelFileError(f"embedding {path.name}: cannot read it: {err}") from err
    else:
        data = _load_pickle(path)
    return Embedding(
        name, _vectors(data, path), path, sha256_file(path),
        step=_plain(data.get("step"), int), sd_checkpoint=_plain(data.get("sd_checkpoint"), str),
        sd_checkpoint_name=_plain(data.get("sd_checkpoint_name"), str),
    )


def _load_pickle(path: Path) -> dict:
    return formats.load_pickle_dict(path, "embedding")


def _png_data(path: Path) -> dict | None:
    """The embedding dict of an A1111 PNG embedding's text chunk. Written by hand: no library reads A1111's
    JSON (its own encoder turns tensors into ``{"TORCHTENSOR": lists}``); json.loads runs no code."""
    if path.name.lower().endswith(".preview.png"):
        return None
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(_PNG_KEY)
    except (UnidentifiedImageError, OSError) as err:
        raise ModelFileError(f"embedding {path.name}: cannot read the image: {err}") from err
    if text is None:
        return None
    try:
        data = json.loads(base64.b64decode(text), object_hook=_tensor_hook)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ModelFileError(f"embedding {path.name}: its {_PNG_KEY} text is not A1111's base64 JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelFileError(f"embedding {path.name}: its {_PNG_KEY} text holds no dictionary")
    return data


def _tensor_hook(obj: dict) -> object:
    return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32) if "TORCHTENSOR" in obj else obj


def _vectors(data: dict, path: Path) -> tuple[Tensor, ...]:
    """The (count, width) vectors per text encoder, in A1111's order of trying the layouts."""
    if "string_to_param" in data:  # A1111's own
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelFileError(f"embedding {path.name}: its string_to_param must hold one term, it holds {_count(params)}")
        tensors = tuple(params.values())
    elif "clip_l" in data and "clip_g" in data:  # SDXL's: one set per text encoder
        tensors = (data["clip_l"], data["clip_g"])
    elif len(data) == 1:  # diffusers' {token: tensor}, emb_params
        tensors = tuple(data.values())
    else:
        raise ModelFileError(
            f"embedding {path.name} is not a textual-inversion embedding: expected string_to_param (A1111), one tensor "
            f"(diffusers, emb_params) or clip_l and clip_g (SDXL); its keys are {', '.join(map(str, list(data)[:8]))}"
        )
    vectors = tuple(_matrix(tensor, path) for tensor in tensors)
    if len({v.shape[0] for v in vectors}) != 1:
        raise ModelFileError(f"embedding {path.name}: clip_l and clip_g hold different numbers of vectors")
    return vectors


def _matrix(tensor: object, path: Path) -> Tensor:
    if not isinstance(tensor, Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
        what = f"a tensor of shape {list(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ModelFileError(f"embedding {path.name}: expected vectors (count, width) or one (width,), found {what}")
    return tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float32)


def _count(value: object) -> int:
    return len(value) if isinstance(value, dict) else 0


def _plain(value: object, kind: type) -> object:
    """A trainer's note as the API gives it, or None (old files store other things there)."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def embedding_files(directory: Path) -> list[Path]:
    """The files under ``directory`` (sub-folders too) that may hold embeddings, empty ones left out as A1111
    leaves them, in path order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = (p for p in directory.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file())
    return sorted((p for p in files if p.stat().st_size > 0), key=lambda p: str(p).lower())


@dataclass
class ModelEmbeddings:
    """The embeddings of one model, by name: ``loaded`` fit its text encoders, ``skipped`` do not (another width,
    or a family without CLIP-style prompts). ``stamp`` is what they were read from: (path, size, mtime) of each
    file, so that a folder changed on disk is read again."""

    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    stamp: tuple = ()
    # tokenizer -> {first token id: [(a name's token ids, its embedding)], longest first}: see trigger_at.
    _triggers: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def trigger_at(self, tokenizer, ids: list[int], position: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's tokens start at ``ids[position]``, and how many tokens that name is; the
        longest name wins, as in A1111's ``find_embedding_at_position``; (None, 0) for none."""
        for name_ids, embedding in self._lookup(tokenizer).get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None, 0

    def _lookup(self, tokenizer) -> dict[int, list[tuple[tuple[int, ...], Embedding]]]:
        lookup = self._triggers.get(tokenizer)
        if lookup is None:
            names = list(self.loaded)
            # A1111 matches the name as the tokenizer splits it: spaces, dashes and case count as in the prompt.
            ids = tokenizer(names, add_special_tokens=False, truncation=False, verbose=False).input_ids if names else []
            lookup = {}
            for name_ids, name in zip(ids, names):
                if name_ids:
                    lookup.setdefault(name_ids[0], []).append((tuple(name_ids), self.loaded[name]))
            for matches in lookup.values():
                matches.sort(key=lambda match: len(match[0]), reverse=True)
            self._triggers[tokenizer] = lookup
        return lookup


# The first text encoder of each model -> its embeddings. Weak: a model let go takes its embeddings with it.
_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelEmbeddings]" = weakref.WeakKeyDictionary()
# The model refreshed last and its folder: the one a process generates with (a server's current model: every job
# refreshes the model it runs on), which A1111's /sdapi/v1/embeddings reports on.
_current: tuple["weakref.ref[Components]", Path] | None = None


def model_embeddings(components: Components) -> ModelEmbeddings:
    """The embeddings :func:`refresh_embeddings` read for this model; none before it ran."""
    return _MODELS.get(components.text_encoder) or ModelEmbeddings()


def encoder_widths(components: Components) -> tuple[int, ...] | None:
    """The token-embedding width of each CLIP text encoder an embedding's vectors go to (SDXL: CLIP-L's, then
    bigG's); None for the transformer families, whose prompts take no embeddings (A1111 has none for them)."""
    if FAMILIES[components.family].is_transformer:
        return None
    encoders = [components.text_encoder, *([components.text_encoder_2] if components.family == "sdxl" else [])]
    return tuple(encoder.get_input_embeddings().embedding_dim for encoder in encoders)


def refresh_embeddings(components: Components, directory: Path, *, force: bool = False) -> ModelEmbeddings:
    """Read ``directory``'s embeddings for this model, unless they were read already and no file has changed
    since (``force``: read them all the same). A file that cannot be read is left out with a warning, as A1111
    leaves it, so that one damaged file stops no generation; so is one that does not fit the model."""
    _remember(components, directory)
    files = embedding_files(directory)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    known = _MODELS.get(components.text_encoder)
    if known is not None and known.stamp == stamp and not force:
        return known
    widths = encoder_widths(components)
    found = ModelEmbeddings(stamp=stamp)
    for path in files:
        try:
            embedding = read_embedding(path)
        except ModelFileError as err:
            log.warning("textual inversion: %s; skipped", err)
            continue
        if embedding is None:
            continue
        if embedding.name in found.loaded or embedding.name in found.skipped:
            log.warning("textual inversion: %s is a second embedding named %r; the first is kept", path, embedding.name)
            continue
        why = _misfit(embedding, widths)
        if why is None:
            found.loaded[embedding.name] = embedding
        else:
            log.warning("textual inversion: embedding %r skipped for this model: %s", embedding.name, why)
            found.skipped[embedding.name] = embedding
    _MODELS[components.text_encoder] = found
    return found


def _remember(components: Components, directory: Path) -> None:
    global _current
    _current = (weakref.ref(components), Path(directory))


def current_embeddings(*, refresh: bool = False) -> ModelEmbeddings | None:
    """The embeddings of the model refreshed last (see :func:`refresh_embeddings`), read again from its folder
    first with ``refresh`` (A1111's refresh-embeddings); None while no model has generated (or it was let go)."""
    components = _current[0]() if _current is not None else None
    if components is None:
        return None
    if refresh:
        return refresh_embeddings(components, _current[1], force=True)
    return model_embeddings(components)


def _misfit(embedding: Embedding, widths: tuple[int, ...] | None) -> str | None:
    """Why ``embedding`` cannot go into encoders of ``widths``, or None when it can."""
    if widths is None:
        return "this model's family reads no textual-inversion embeddings (SD 1.x, 2.x and SDXL do)"
    if embedding.widths != widths:
        return f"its vectors are {'+'.join(map(str, embedding.widths))} wide, this model's text encoders take {'+'.join(map(str, widths))}"
    if embedding.count > MAX_VECTORS:
        return f"it has {embedding.count} vectors, more than the {MAX_VECTORS} tokens of a prompt chunk"
    return None
