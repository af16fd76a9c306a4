"""The infotext's generation keys, written and read through the field table: what an image says about
how it was made (the request's fields, the model's, the run's), and the request fields that remake it
(``lienzo generate --from``, the gallery, the A1111 API's png-info). The layout itself (lines, quoting)
is ``images.metadata``'s."""

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lienzo import __version__
from lienzo.errors import LienzoError
from lienzo.generation.fields import InfotextKey, Row
from lienzo.generation.lora_tags import extract_lora_tags, lora_tag
from lienzo.generation.request import GenerationRequest, table
from lienzo.generation.samplers import split_folded_schedule
from lienzo.generation.wildcards import is_dynamic
from lienzo.images.metadata import Infotext, parse_infotext, read_parameters

if TYPE_CHECKING:  # the CLI reads infotexts (--from) before it imports torch
    from lienzo.models.components import Components


def _keys() -> Iterator[tuple[InfotextKey, list[Row]]]:
    """Each infotext key of the table with the rows that carry it, in the order of their first field."""
    keys: dict[int, tuple[InfotextKey, list[Row]]] = {}
    for row in table():
        if row.spec.infotext is not None:
            keys.setdefault(id(row.spec.infotext), (row.spec.infotext, []))[1].append(row)
    yield from keys.values()


def request_params(request: GenerationRequest, resolved: dict[str, Any]) -> dict[str, object]:
    """The infotext pairs of ``request``'s fields, in the table's order, with ``resolved`` (what the run
    decided: seed, size, sampler, schedule) over the request's values. A key is written in its fields'
    modes: always when it says so, else when its value is not the default."""
    mode = request.mode
    values = {**dict(request), **resolved}
    params: dict[str, object] = {}
    for key, rows in _keys():
        if mode not in rows[0].spec.modes or (key.when is not None and not key.when(request)):
            continue
        given = [values[row.name] for row in rows]
        if not key.always and given == [row.spec.default_for(mode, row.default) for row in rows]:
            continue
        text = key.write(*given)
        if isinstance(text, dict):
            params.update(text)
        elif text is not None:
            params[key.key] = text
    return params


def fields_from_infotext(info: Infotext, mode: str = "txt2img") -> dict:
    """Request fields for ``mode`` (plus ``model``: hash or name) from a parsed infotext; absent keys are
    left out. Raises LienzoError for a value that cannot be what its key promises."""
    fields: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, rows in _keys():
        if key.matches is not None:
            text = {k: v for k, v in info.params.items() if key.matches(k)} or None
        else:
            text = info.params.get(key.key)
        if text is None or mode not in rows[0].spec.modes:
            continue
        value = key.read(text)
        fields.update(key.implies)
        fields.update(zip((row.name for row in rows), value if len(rows) > 1 else (value,), strict=True))
    fields["model"] = info.model_hash or info.model
    if fields.get("sampler") and "schedule" not in fields:
        fields["sampler"], fields["schedule"] = split_folded_schedule(fields["sampler"])
    return {k: v for k, v in fields.items() if v is not None}


def fields_from_image(path: Path, mode: str = "txt2img") -> dict:
    """Request fields (plus ``model``: hash or name) from an image's A1111 infotext."""
    text = read_parameters(path)
    if text is None:
        raise LienzoError(f"from: {path} carries no generation parameters to remake it from")
    return fields_from_infotext(parse_infotext(text), mode)


def infotext_prompt(request: GenerationRequest, prompt: str | None = None) -> str:
    """The prompt as given (or an image's resolved ``prompt``), plus a tag for each LoRA the request
    applies that it does not show, so A1111 and --from can remake it."""
    prompt = request.prompt if prompt is None else prompt
    tagged = {name for name, _ in extract_lora_tags(prompt)[1]}
    extra = [lora_tag(lora.name, lora.weight) for lora in request.requested_loras() if lora.name not in tagged]
    return " ".join([prompt, *extra]) if extra else prompt


def with_templates(params: dict, request: GenerationRequest) -> dict:
    """sd-dynamic-prompts' record of the templates, before ``Version``: only a record (``--from`` reads the prompt)."""
    templates = {"Template": request.prompt if is_dynamic(request.prompt) else None}
    templates["Negative Template"] = request.negative_prompt if is_dynamic(request.negative_prompt) else None
    keys = list(params)
    at = keys.index("Version") if "Version" in keys else len(keys)
    return {k: params[k] for k in keys[:at]} | {k: v for k, v in templates.items() if v is not None} | {k: params[k] for k in keys[at:]}


def image_params(components: "Components", req: GenerationRequest, resolved: dict, safety: str | None = None) -> dict:
    """The infotext fields of one image, in A1111's order: the request's (from the field table, with
    what the run ``resolved``: seeds, size, sampler, schedule), the model's after ``Size``, the loaded VAE and
    LoRAs before ``Fast``."""
    params = request_params(req, resolved)
    model = {"Model hash": components.short_hash or None, "Model": components.name or None}
    loaded: dict[str, object] = {}
    if components.vae_name:
        loaded["VAE"] = components.vae_name
    # Forge's record of the separate text-encoder (and VAE) files a model was assembled from.
    for number, file in enumerate(components.text_encoder_files.values(), start=1):
        loaded[f"Module {number}"] = Path(file).stem
    # A1111's form: "name: short hash, ..."; its reader splits on those characters, so names lose them.
    hashes = [f"{lora.name.replace(':', '').replace(',', '')}: {lora.short_hash}" for lora in components.loras.active if lora.short_hash]
    if hashes:
        loaded["Lora hashes"] = ", ".join(hashes)
    # The textual-inversion embeddings the prompts use (prompts imports torch: only once a model is loaded).
    from lienzo.generation.prompts import ti_hashes

    if embeddings := ti_hashes(components, [extract_lora_tags(req.prompt)[0], req.negative_prompt]):
        loaded["TI hashes"] = embeddings
    keys = list(params)
    at = keys.index("Fast") if "Fast" in keys else len(keys)
    ordered = {k: params[k] for k in keys[: keys.index("Size") + 1]} | model
    ordered |= {k: params[k] for k in keys[keys.index("Size") + 1 : at]} | loaded | {k: params[k] for k in keys[at:]}
    if components.speed.int8:  # a load-time switch, so only a record: --from does not turn it on
        ordered["Int8"] = "U-Net linear layers"
    if components.speed.fp8:  # a load-time switch too: a record of what the weights were
        ordered["FP8 weights"] = ", ".join(components.speed.fp8)
    if safety:
        ordered["Safety filter"] = safety
    ordered["Version"] = f"lienzo {__version__}"
    return ordered
