"""What an image says about how it was made, whichever tool made it, in lienzo's vocabulary.

AUTOMATIC1111, Forge, SD.Next and lienzo write an infotext (PNG ``parameters`` chunk or EXIF
UserComment); InvokeAI a JSON object in the ``invokeai_metadata`` chunk; ComfyUI its node graph, in
API form, in ``prompt``; NovelAI a JSON object in ``Comment``. Each reader turns its format into an
:class:`~lienzo.images.metadata.Infotext` with A1111's keys, so the gallery stores one shape and
remakes every image through :func:`~lienzo.generation.infotext.fields_from_infotext`.
"""

import io
import json
import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lienzo.errors import ImageFileError, LienzoError
from lienzo.generation.infotext import fields_from_infotext
from lienzo.images.metadata import Infotext, format_infotext, parameters_from, parse_infotext, replace_lone_surrogates

log = logging.getLogger(__name__)

# Other tools' sampler names (k-diffusion's, as ComfyUI, InvokeAI and NovelAI spell them) → A1111's.
_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS",
    "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM",
    "plms": "PLMS", "pndm": "PLMS", "uni_pc": "UniPC", "unipc": "UniPC", "lcm": "LCM",
}
# ComfyUI's scheduler and NovelAI's noise_schedule names → A1111 schedule types ("normal" is A1111's Automatic).
_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}
# Text-encoder inputs that hold a prompt in a ComfyUI graph (CLIPTextEncode; CLIPTextEncodeSDXL's first).
_COMFY_TEXT_KEYS = ("text", "text_g")
_COMFY_MODEL_KEYS = ("ckpt_name", "unet_name")


@dataclass(frozen=True)
class ImageMeta:
    """An image's size and generation parameters: the values the gallery filters and shows, the
    infotext, and ``parameters``, the request fields that remake it (prompt, steps, sampler, model, ...).
    An image that carries none has an empty prompt and no parameters."""

    width: int
    height: int
    infotext: str = ""  # A1111's layout; written from the tool's own fields when it wrote none
    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    model_hash: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    mode: str | None = None  # txt2img, img2img, inpaint or outpaint, as far as the parameters tell
    parameters: dict = field(default_factory=dict)


def read_meta(source: str | PathLike | bytes) -> ImageMeta:
    """What the image at ``source`` (a path, or a file's bytes) says about how it was made.
    Raises ImageFileError when it cannot be read as an image."""
    what = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            size, chunks, text = image.size, dict(image.info), parameters_from(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ImageFileError(f"image: cannot read {what}: {err}") from None
    if text is not None:
        return meta_from_infotext(parse_infotext(text), size, text)
    for reader in (_invokeai, _comfyui, _novelai):
        info = reader(chunks)
        if info is not None:
            return meta_from_infotext(info, size)
    return ImageMeta(*size)


def meta_from_infotext(info: Infotext, size: tuple[int, int], text: str | None = None) -> ImageMeta:
    """``info`` as gallery values, for an image of ``size``. ``text`` is the infotext as the image
    holds it; None writes one from ``info`` (for the formats that are not A1111's)."""
    # A file's metadata may hold anything. A JSON escape such as "\ud800" reads as a lone surrogate,
    # which nothing downstream can write (SQLite, JSON answers): shown as U+FFFD, the rest is kept.
    clean = replace_lone_surrogates
    info = Infotext(clean(info.prompt), clean(info.negative_prompt), {clean(key): clean(value) for key, value in info.params.items()})
    text = None if text is None else clean(text)
    mode = _mode(info.params)
    try:
        # A hires-fix pass's denoising strength is not the image's: txt2img takes none.
        fields = fields_from_infotext(info, mode or "txt2img")
    except LienzoError as err:
        # A value that cannot be what its key promises ("Steps: many"): keep the prompts and the text.
        log.warning("ignoring unreadable generation parameters: %s", err)
        info, mode = Infotext(info.prompt, info.negative_prompt), None
        fields = fields_from_infotext(info)
    for key, value in list(fields.items()):
        # SQLite integers are 64-bit; ComfyUI's seeds go up to 2**64 - 1, and any file can claim more.
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            log.warning("ignoring %s = %d: beyond the 64-bit integers the gallery stores", key, value)
            del fields[key]
    return ImageMeta(
        *size,
        infotext=format_infotext(info.prompt, info.negative_prompt, info.params) if text is None else text,
        prompt=info.prompt,
        negative_prompt=info.negative_prompt,
        model=info.model,
        model_hash=info.model_hash,
        seed=fields.get("seed"),
        steps=fields.get("steps"),
        cfg_scale=fields.get("cfg_scale"),
        sampler=fields.get("sampler"),
        schedule=fields.get("schedule"),
        mode=mode,
        parameters=fields,
    )


def _mode(params: dict[str, str]) -> str | None:
    """The mode the keys lienzo and A1111 write for it point to; None with no parameters at all."""
    if not params:
        return None
    if "Outpaint" in params:
        return "outpaint"
    if "Mask blur" in params:
        return "inpaint"
    if "Denoising strength" in params and "Hires upscale" not in params:
        return "img2img"
    return "txt2img"


def _invokeai(chunks: dict) -> Infotext | None:
    """InvokeAI 3 and later: ``invokeai_metadata`` (``positive_prompt``, ``scheduler``, ``model.name``, ...)."""
    data = _json(chunks.get("invokeai_metadata"))
    if data is None:
        return None
    model = data.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("model_name")
    sampler, schedule = _sampler(data.get("scheduler"))
    clip_skip = _int(data.get("clip_skip"))
    img2img = str(data.get("generation_mode", "txt2img")).removeprefix("sdxl_") != "txt2img"
    params = {
        "Steps": _int(data.get("steps")),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": _number(data.get("cfg_scale")),
        "Seed": _int(data.get("seed")),
        "Size": _size(data.get("width"), data.get("height")),
        "Model": model if isinstance(model, str) else None,
        "Denoising strength": _number(data.get("strength")) if img2img else None,
        # InvokeAI counts the layers skipped (0: none); A1111 counts from 1 (1: none).
        "Clip skip": clip_skip + 1 if clip_skip else None,
    }
    return Infotext(_text(data.get("positive_prompt")), _text(data.get("negative_prompt")), _pairs(params))


def _comfyui(chunks: dict) -> Infotext | None:
    """ComfyUI: the first sampler node (one with ``positive`` and ``negative`` inputs) in the ``prompt``
    graph, its prompts from the text encoders those inputs lead to, its model from the loader."""
    graph = _json(chunks.get("prompt"))
    if graph is None:
        return None
    nodes = {str(key): node["inputs"] for key, node in graph.items() if isinstance(node, dict) and isinstance(node.get("inputs"), dict)}
    sampler_node = next((inputs for inputs in nodes.values() if {"positive", "negative"} <= inputs.keys()), None)
    if sampler_node is None:
        return None

    def upstream(start, keys: tuple[str, ...], kind: type) -> object:
        """The first value of one of ``keys`` (of type ``kind``) on the nodes ``start`` leads to, breadth first."""
        queue, seen = [start], set()
        while queue:
            link = queue.pop(0)
            if not _is_link(link) or str(link[0]) in seen:
                continue
            seen.add(str(link[0]))
            inputs = nodes.get(str(link[0]), {})
            for key in keys:
                if isinstance(inputs.get(key), kind) and not isinstance(inputs[key], bool):
                    return inputs[key]
            queue.extend(value for value in inputs.values() if _is_link(value))
        return None

    sampler, _ = _sampler(sampler_node.get("sampler_name"))
    model = upstream(sampler_node.get("model"), _COMFY_MODEL_KEYS, str)
    denoise = _number(sampler_node.get("denoise"))
    params = {
        "Steps": _int(sampler_node.get("steps")),
        "Sampler": sampler,
        "Schedule type": _SCHEDULES.get(str(sampler_node.get("scheduler"))),
        "CFG scale": _number(sampler_node.get("cfg")),
        "Seed": _int(sampler_node.get("seed", sampler_node.get("noise_seed"))),
        "Size": _size(upstream(sampler_node.get("latent_image"), ("width",), int), upstream(sampler_node.get("latent_image"), ("height",), int)),
        "Model": Path(model.replace("\\", "/")).stem if model else None,
        "Denoising strength": denoise if denoise is not None and denoise < 1 else None,
    }
    positive = upstream(sampler_node.get("positive"), _COMFY_TEXT_KEYS, str)
    negative = upstream(sampler_node.get("negative"), _COMFY_TEXT_KEYS, str)
    return Infotext(_text(positive), _text(negative), _pairs(params))


def _novelai(chunks: dict) -> Infotext | None:
    """NovelAI: ``Comment`` holds ``prompt``, ``uc`` (the negative prompt), ``steps``, ``scale``, ``seed``,
    ``sampler``; ``Source`` names the model."""
    data = _json(chunks.get("Comment"))
    if data is None or "prompt" not in data or ("uc" not in data and chunks.get("Software") != "NovelAI"):
        return None
    sampler, schedule = _sampler(data.get("sampler"))
    params = {
        "Steps": _int(data.get("steps")),
        "Sampler": sampler,
        "Schedule type": schedule or _SCHEDULES.get(str(data.get("noise_schedule"))),
        "CFG scale": _number(data.get("scale")),
        "Seed": _int(data.get("seed")),
        "Size": _size(data.get("width"), data.get("height")),
        "Model": _text(chunks.get("Source")) or None,
    }
    return Infotext(_text(data.get("prompt")), _text(data.get("uc")), _pairs(params))


def _sampler(name: object) -> tuple[str | None, str | None]:
    """(A1111 sampler, schedule) for another tool's name: ``k_euler_ancestral`` → Euler a; InvokeAI's
    ``_k`` suffix means the Karras schedule. A name lienzo does not know is kept as written."""
    if not isinstance(name, str) or not name:
        return None, None
    key = name.lower().removeprefix("k_")
    if key.endswith("_k") and key.removesuffix("_k") in _SAMPLERS:
        return _SAMPLERS[key.removesuffix("_k")], "Karras"
    return _SAMPLERS.get(key, name), None


def _pairs(params: dict[str, object]) -> dict[str, str]:
    """Infotext pairs as A1111 writes them: strings, numbers without a needless ``.0``, absent ones left out."""
    return {key: f"{value:g}" if isinstance(value, float) else str(value) for key, value in params.items() if value is not None}


def _json(value: object) -> dict | None:
    if not isinstance(value, (str, bytes)):
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _is_link(value: object) -> bool:
    """A ComfyUI input wired to another node: ``[node_id, output_index]``."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and isinstance(value[1], int)


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size(width: object, height: object) -> str | None:
    w, h = _int(width), _int(height)
    return f"{w}x{h}" if w and h else None
