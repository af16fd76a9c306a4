"""Turn the parameters stored in an image back into request fields, so the image can be remade."""

from pathlib import Path

from lienzo.errors import LienzoError
from lienzo.generation.samplers import split_folded_schedule
from lienzo.images.metadata import Infotext, parse_infotext, read_parameters


def fields_from_image(path: Path) -> dict:
    """Request fields (plus ``model``: hash or name) from an image's A1111 infotext."""
    text = read_parameters(path)
    if text is None:
        raise LienzoError(f"from: {path} carries no generation parameters to remake it from")
    return fields_from_infotext(parse_infotext(text))


def fields_from_infotext(info: Infotext) -> dict:
    """Request fields (plus ``model``: hash or name) from a parsed infotext; absent keys are left out.
    ``denoising_strength`` is there for images that had an input image (img2img, inpaint, outpaint)."""
    fields = {
        "prompt": info.prompt,
        "negative_prompt": info.negative_prompt,
        "steps": info.steps,
        "cfg_scale": info.cfg_scale,
        "seed": info.seed,
        "width": info.width,
        "height": info.height,
        "clip_skip": info.clip_skip,
        "denoising_strength": info.denoising_strength,
        "sampler": info.sampler,
        "schedule": info.schedule_type,
        "model": info.model_hash or info.model,
        "fast": _fast(info),
    }
    if info.sampler and info.schedule_type is None:
        fields["sampler"], fields["schedule"] = split_folded_schedule(info.sampler)
    return {k: v for k, v in fields.items() if v is not None}


def _fast(info: Infotext) -> bool | None:
    """``Fast: DeepCache 3`` → True; absent → None (normal mode). Another interval would remake a
    different image, so it is refused rather than remade with this version's."""
    value = info.params.get("Fast")
    if value is None:
        return None
    # Imported for fast images only: deepcache imports torch, and `lienzo generate --from` validates before torch.
    from lienzo.generation.deepcache import INTERVAL, fast_label, interval_from_label

    if interval_from_label(value) != INTERVAL:
        raise LienzoError(f"infotext 'Fast' must be {fast_label()!r}, the fast mode this lienzo remakes, got {value!r}")
    return True
