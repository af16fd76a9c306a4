"""ControlNet and T2I-Adapter as part of the denoiser: what the U-Net call adds to its blocks at each step.

A :class:`Control` is a prepared unit (its network, its control map, the request's unit). For one pass of one
batch, :func:`control_stack` turns the units into a :class:`ControlStack` at the pass's size; the
:class:`~lienzo.generation.denoiser.UNetCall` asks it, at every step, for the residuals to add (diffusers'
``down_block_additional_residuals`` / ``mid_block_additional_residual`` for ControlNets,
``down_intrablock_additional_residuals`` for T2I-Adapters), so the loop and the layers above it do not change.

The maths is diffusers' networks; what lienzo adds is sd-webui-controlnet's schedule and modes, which its
API and infotext promise: a unit steers the steps whose share done lies in [guidance_start, guidance_end];
"My prompt is more important" scales the i-th of the N residuals by ``0.825 ** (12 - i)`` (the soft injection
of the original ControlNet's guess mode), and "ControlNet is more important" does that and steers only the
conditional rows (the unconditional ones get none), so guidance pushes toward the control.

IP-Adapter units (image prompts) steer through the U-Net's cross-attention instead: for a step where one is
active, :func:`image_prompts` puts diffusers' IP-Adapter attention processors and image projection into the
U-Net for that one call, with each unit's weight as its processor scale (0 outside its window), and gives the
U-Net the picture's CLIP embeddings in ``added_cond_kwargs["image_embeds"]`` (zeros, or the all-zero
picture's, for the unconditional rows, as diffusers' pipelines). Afterwards the U-Net's own processors go back:
the loaded U-Net is never left changed, whatever the call raised, and a step with no active image prompt
runs the plain U-Net.

Flux.1 ControlNets (diffusers' ``FluxControlNetModel``) are a row of the same stack: :meth:`ControlStack.encoded`
gives each its map as ``FluxControlNetPipeline`` does (normalised to [-1, 1], VAE-encoded, shifted and scaled,
packed into 2x2 patches), and :meth:`ControlStack.flux_samples` runs, at each step, every active unit on the
transformer's own inputs and sums their block samples, each times its weight, as ``FluxMultiControlNetModel``
does. A Union ControlNet is told which kind of map it reads (``controlnet_mode``) from the unit's preprocessor.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lienzo.generation.canvas import ResizeMode, resize_image
from lienzo.generation.control_unit import ControlUnit

_RESIZE = {"Just Resize": ResizeMode.JUST_RESIZE, "Crop and Resize": ResizeMode.CROP_AND_RESIZE, "Resize and Fill": ResizeMode.RESIZE_AND_FILL}
# The original ControlNet's guess-mode decay, which the extension applies for its two "more important" modes.
_SOFT_DECAY = 0.825
# The control types InstantX's Flux.1 Union ControlNet (and Shakker-Labs' Union Pro) were trained with: 0 canny,
# 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality. lienzo's edge modules draw canny-like line maps.
UNION_MODES = {
    "canny": 0, "hed": 0, "lineart": 0, "lineart_coarse": 0, "lineart_standard": 0, "scribble_xdog": 0, "threshold": 0,
    "invert": 0, "tile_resample": 1, "blur_gaussian": 3,
}
# FluxControlNetPipeline's default guidance_scale: what a guidance-embedding ControlNet reads beside a model
# (schnell) that takes none.
_PIPELINE_GUIDANCE = 3.5


@dataclass(frozen=True)
class Control:
    """One unit, prepared: its loaded network and its control map (the preprocessor's output)."""

    unit: ControlUnit
    model: Any  # diffusers ControlNetModel or T2IAdapter, or an IP-Adapter (lienzo.control.ip_adapter.IPAdapter)
    map: Image.Image  # an IP-Adapter unit's: the picture it encoded
    image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # IP-Adapter: the picture's (cond, uncond) CLIP embeddings

    @property
    def is_ip_adapter(self) -> bool:
        return self.image_embeds is not None

    @property
    def is_flux(self) -> bool:
        """A Flux.1 ControlNet (FluxControlNetModel: block samples added to Flux.1's transformer blocks)."""
        return hasattr(self.model, "controlnet_x_embedder")

    @property
    def is_adapter(self) -> bool:
        """A T2I-Adapter (features added inside the U-Net's encoder)."""
        return not self.is_ip_adapter and not self.is_flux and not hasattr(self.model, "controlnet_cond_embedding")


def control_image(control: Control, width: int, height: int, device, dtype) -> torch.Tensor:
    """The unit's map fitted to ``width`` x ``height`` by its resize mode, as a 1 x 3 x H x W tensor in [0, 1]
    (what diffusers' ControlNet pipelines feed: no normalisation to [-1, 1]). An inpaint map is RGBA, its
    masked part transparent: there the hint is -1, as the inpaint ControlNet was trained."""
    mode = "RGBA" if control.map.mode == "RGBA" else "RGB"
    fitted = resize_image(control.map.convert(mode), width, height, _RESIZE[control.unit.resize_mode])
    pixels = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).view(height, width, len(mode))
    hint = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255
    if mode == "RGBA":
        hint = torch.where(hint[:, 3:] < 0.5, -1.0, hint[:, :3])
    return hint.to(device=device, dtype=dtype)


def _scales(unit: ControlUnit, count: int) -> list[float]:
    if unit.control_mode == "Balanced":
        return [unit.weight] * count
    return [unit.weight * _SOFT_DECAY ** float(12 - i) for i in range(count)]


@dataclass(frozen=True)
class _Prepared:
    control: Control
    image: torch.Tensor | None  # ControlNets: 1 x 3 x H x W
    features: tuple[torch.Tensor, ...] = ()  # T2I-Adapters: computed once a pass, 1 x C x h x w each
    cond: torch.Tensor | None = None  # Flux.1 ControlNets: the packed map latents (1 x tokens x C), see encoded


@dataclass(frozen=True)
class ImagePrompts:
    """A pass's IP-Adapter units, and the diffusers pieces that apply them all at once: per cross-attention layer
    one processor holding every unit's key/value projections (those of the loaded adapters, shared, not copied),
    and the image projection of every unit, in the units' order."""

    controls: tuple[Control, ...]
    processors: dict[str, Any]
    projection: Any  # diffusers' MultiIPAdapterImageProjection


@dataclass(frozen=True)
class ControlStack:
    """Every unit of one pass, at its size: the residuals they add at a step, summed over the active units."""

    units: tuple[_Prepared, ...]
    total: int  # the pass's steps: a unit's window is a share of them
    prompts: ImagePrompts | None = None  # the IP-Adapter units (see image_prompts)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, step: int, embeds: torch.Tensor, added: dict | None, uncond_rows: int) -> dict:
        """Keyword arguments for the U-Net call: the residuals of the units active at ``step``, for rows laid out as
        [``uncond_rows`` unconditional rows, then the conditional ones]; {} when none is active."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        intra: list[torch.Tensor] | None = None
        for prepared in self.units:
            unit = prepared.control.unit
            if not unit.active(step, self.total):
                continue
            # "ControlNet is more important": the unconditional rows get nothing, so they need no pass.
            skip = uncond_rows if unit.control_mode == "ControlNet is more important" else 0
            if prepared.control.is_adapter:
                feats = [f * s for f, s in zip(prepared.features, _scales(unit, len(prepared.features)), strict=True)]
                feats = [_rows(f.expand(x.shape[0] - skip, -1, -1, -1), skip) for f in feats]
                intra = feats if intra is None else [a + b for a, b in zip(intra, feats, strict=True)]
                continue
            unit_down, unit_mid = self._controlnet(prepared, x[skip:], t, embeds[skip:], _added_rows(added, skip))
            scales = _scales(unit, len(unit_down) + 1)
            unit_down = [_rows(d * s, skip) for d, s in zip(unit_down, scales, strict=False)]
            unit_mid = _rows(unit_mid * scales[-1], skip)
            down = unit_down if down is None else [a + b for a, b in zip(down, unit_down, strict=True)]
            mid = unit_mid if mid is None else mid + unit_mid
        found: dict = {}
        if down is not None:
            found |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if intra is not None:
            found["down_intrablock_additional_residuals"] = intra
        return found

    def encoded(self, vae) -> "ControlStack":
        """The stack with each Flux.1 unit's map as FluxControlNetPipeline feeds it: [-1, 1] pixels, VAE-encoded (the
        posterior's mean: the map is a condition, not noise to draw), shifted, scaled and packed. (ControlNets with
        their own hint encoder, XLabs' design, read pixels instead; the loader refuses them.)"""
        from diffusers import FluxPipeline  # its packing helper

        units = []
        for prepared in self.units:
            if not prepared.control.is_flux:
                units.append(prepared)
                continue
            with torch.no_grad():
                latents = vae.encode(prepared.image.to(vae.dtype) * 2 - 1).latent_dist.mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            n, channels, h, w = latents.shape
            units.append(_Prepared(prepared.control, prepared.image, cond=FluxPipeline._pack_latents(latents, n, channels, h, w)))
        return ControlStack(tuple(units), self.total, self.prompts)

    def flux_samples(self, packed: torch.Tensor, step: int, uncond_rows: int, depth: tuple[int, int], **inputs) -> dict:
        """Keyword arguments for Flux.1's transformer at ``step``: every active unit's block samples (each run on the
        transformer's ``packed`` latents and ``inputs``: timestep, text, pooled vector, ids, guidance), times its
        weight, summed; {} when none is active. ``depth``: the transformer's (double, single) block counts; each
        unit's samples are spread over them as the transformer would spread its own (so units of different depths
        add up), and "ControlNet is more important" leaves the first ``uncond_rows`` rows without."""
        sums: list[list[torch.Tensor] | None] = [None, None]
        for prepared in self.units:
            unit = prepared.control.unit
            if not prepared.control.is_flux or not unit.active(step, self.total):
                continue
            skip = uncond_rows if unit.control_mode == "ControlNet is more important" else 0
            for index, samples in enumerate(_flux_controlnet(prepared, packed[skip:], skip, inputs)):
                if samples is None:
                    continue
                spread = [_rows(sample, skip) for sample in _spread(samples, depth[index])]
                sums[index] = spread if sums[index] is None else [a + b for a, b in zip(sums[index], spread, strict=True)]
        if sums == [None, None]:
            return {}
        return {"controlnet_block_samples": sums[0], "controlnet_single_block_samples": sums[1]}

    @staticmethod
    def _controlnet(prepared: _Prepared, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None):
        model = prepared.control.model
        # An inpainting U-Net's extra channels are not the ControlNet's (it was trained beside a 4-channel U-Net).
        sample = x[:, : model.config.in_channels].to(model.dtype)
        cond = prepared.image.expand(x.shape[0], -1, -1, -1)
        with torch.no_grad():
            down, mid = model(
                sample, t, encoder_hidden_states=embeds.to(model.dtype), controlnet_cond=cond, conditioning_scale=1.0,
                added_cond_kwargs=added, return_dict=False,
            )
        return list(down), mid


def _flux_controlnet(prepared: _Prepared, packed: torch.Tensor, skip: int, inputs: dict):
    """One Flux.1 unit's (double, single) block samples for the rows after the first ``skip``, times its weight."""
    model, unit = prepared.control.model, prepared.control.unit
    rows = packed.shape[0]
    guidance = inputs["guidance"]
    if not model.config.guidance_embeds:
        guidance = None
    elif guidance is None:
        guidance = torch.full((rows,), _PIPELINE_GUIDANCE, device=packed.device)
    else:
        guidance = guidance[skip:]
    mode = None
    if model.union:
        mode = torch.full((rows, 1), UNION_MODES[unit.module], dtype=torch.long, device=packed.device)
    with torch.no_grad():
        return model(
            hidden_states=packed.to(model.dtype), controlnet_cond=prepared.cond.to(model.dtype).expand(rows, *prepared.cond.shape[1:]),
            controlnet_mode=mode, conditioning_scale=unit.weight, timestep=inputs["timestep"][skip:], guidance=guidance,
            pooled_projections=inputs["pooled_projections"][skip:], encoder_hidden_states=inputs["encoder_hidden_states"][skip:],
            txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], return_dict=False,
        )


def _spread(samples: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """One sample per transformer block, chosen as FluxTransformer2DModel chooses among fewer: block i takes sample
    i // ceil(blocks / count)."""
    interval = math.ceil(blocks / len(samples))
    return [samples[i // interval] for i in range(blocks)]


def _rows(residual: torch.Tensor, skip: int) -> torch.Tensor:
    """``residual`` after ``skip`` rows of zeros (the unconditional rows a unit leaves alone)."""
    if not skip:
        return residual
    return torch.cat([residual.new_zeros((skip, *residual.shape[1:])), residual])


def _added_rows(added: dict | None, skip: int) -> dict | None:
    return None if added is None or not skip else {k: v[skip:] for k, v in added.items()}


def control_stack(controls: tuple[Control, ...], width: int, height: int, total: int, device, dtype) -> ControlStack | None:
    """The units at one pass's size (``width`` x ``height`` pixels, ``total`` steps); None without units."""
    if not controls:
        return None
    prepared = []
    for control in controls:
        if control.is_ip_adapter:
            continue
        image = control_image(control, width, height, device, control.model.dtype if hasattr(control.model, "dtype") else dtype)
        if control.is_adapter:
            with torch.no_grad():
                features = tuple(control.model(image))
            prepared.append(_Prepared(control, None, features))
        else:
            prepared.append(_Prepared(control, image))
    return ControlStack(tuple(prepared), total, _image_prompts(tuple(c for c in controls if c.is_ip_adapter)))


def _image_prompts(controls: tuple[Control, ...]) -> ImagePrompts | None:
    """diffusers' IP-Adapter processors for several adapters at once (what ``_load_ip_adapter_weights`` builds
    from a list of files), made from the loaded adapters' one-adapter processors without loading anything again."""
    if not controls:
        return None
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    adapters = [control.model for control in controls]
    processors = {}
    for name, first in adapters[0].processors.items():
        # Made empty (no adapters, so no fresh weights), then given the loaded adapters' projections.
        combined = type(first)(first.hidden_size, first.cross_attention_dim, num_tokens=[], scale=[])
        combined.num_tokens = [n for adapter in adapters for n in adapter.processors[name].num_tokens]
        combined.to_k_ip = torch.nn.ModuleList([adapter.processors[name].to_k_ip[0] for adapter in adapters])
        combined.to_v_ip = torch.nn.ModuleList([adapter.processors[name].to_v_ip[0] for adapter in adapters])
        processors[name] = combined
    return ImagePrompts(controls, processors, MultiIPAdapterImageProjection([adapter.projection for adapter in adapters]))


@contextmanager
def image_prompts(stack: ControlStack | None, unet, step: int, rows: int, uncond_rows: int, added: dict | None) -> Iterator[dict | None]:
    """Around one U-Net call: ``unet`` (a UNet2DConditionModel) with the stack's IP-Adapter units applied at ``step``,
    and the ``added_cond_kwargs`` to call it with (``added`` plus the units' ``image_embeds`` for ``rows`` rows, the
    first ``uncond_rows`` unconditional). Without an active unit the U-Net is left alone and ``added`` comes back."""
    prompts = stack.prompts if stack is not None else None
    scales = [] if prompts is None else [c.unit.weight if c.unit.active(step, stack.total) else 0.0 for c in prompts.controls]
    if not any(scales):
        yield added
        return
    for processor in prompts.processors.values():
        processor.scale = list(scales)  # diffusers skips an adapter whose scale is 0
    embeds = [_embed_rows(control.image_embeds, rows, uncond_rows) for control in prompts.controls]
    # Only the cross-attention layers change, each found by its path: the U-Net's set_attn_processor walks every
    # module, and twice a call cost SDXL 28 ms a step on a busy CPU where these 70 layers cost 2.4 ms.
    layers = [(unet.get_submodule(name.removesuffix(".processor")), processor) for name, processor in prompts.processors.items()]
    saved = [layer.processor for layer, _ in layers]
    saved_projection, saved_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    try:
        for layer, processor in layers:
            layer.set_processor(processor)
        unet.encoder_hid_proj = prompts.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        yield {**(added or {}), "image_embeds": embeds}
    finally:
        # Deleted first, so that None is a plain attribute again rather than an empty module slot.
        del unet.encoder_hid_proj
        unet.encoder_hid_proj = saved_projection
        unet.config.encoder_hid_dim_type = saved_type
        for (layer, _), processor in zip(layers, saved, strict=True):
            layer.set_processor(processor)


def _embed_rows(embeds: tuple[torch.Tensor, torch.Tensor], rows: int, uncond_rows: int) -> torch.Tensor:
    """One unit's embeddings for the call's rows, as diffusers lays them out: rows x 1 picture x (tokens x) width."""
    cond, uncond = (e.unsqueeze(0) for e in embeds)
    return torch.cat([uncond.expand(uncond_rows, *uncond.shape[1:]), cond.expand(rows - uncond_rows, *cond.shape[1:])])
