"""The denoiser: the network call the denoising loop makes, as a stack of small layers.

As in k-diffusion, the loop sees one callable, ``denoiser(x, t) -> prediction``: the model's output
for the scaled latents ``x`` at timestep ``t``, in the parameterisation its scheduler steps with
(noise, v or, for flow models, velocity). What wraps the network is a layer around that callable,
never a branch in the loop:

- :class:`UNetCall`: a U-Net (or DeepCache's :class:`~lienzo.generation.deepcache.DeepCacheUNet`
  around it) with the batch's text conditioning; another network family brings its own call;
- :class:`InpaintChannels`: the mask and masked-image latents an inpainting model takes as extra input;
- :class:`Guidance`: classifier-free guidance, one model pass over [uncond, cond].
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lienzo.generation.deepcache import DeepCacheUNet
from lienzo.generation.latents import LatentMask
from lienzo.generation.plan import BatchPlan
from lienzo.models.components import Components


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction for scaled latents ``x`` (one row per image) at timestep ``t``."""
        ...


@dataclass(frozen=True)
class UNetCall:
    """A diffusers-style U-Net called with fixed text conditioning, rows ordered [uncond..., cond...]."""

    unet: Any  # UNet2DConditionModel, or DeepCacheUNet around one: both are called the same way
    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None  # SDXL's pooled text and size ids

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.unet(x, t, encoder_hidden_states=self.embeds, added_cond_kwargs=self.added, return_dict=False)[0]


@dataclass(frozen=True)
class InpaintChannels:
    """Inpainting models take 9 channels: the latents, then the mask and the masked image's latents."""

    inner: Denoiser
    extra: torch.Tensor  # mask and masked latents, one row per row the inner denoiser is called with

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([x, self.extra], dim=1), t)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (Ho and Salimans 2022): both predictions from one doubled batch."""

    inner: Denoiser
    scale: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = self.inner(torch.cat([x, x]), t).chunk(2)
        return uncond + self.scale * (cond - uncond)


def build_denoiser(components: Components, plan: BatchPlan, mask: LatentMask | None) -> Denoiser:
    """The denoiser for one batch: a fresh one each batch, as DeepCache's cache must not outlive it."""
    denoiser = _network_call(components, plan)
    if mask is not None and mask.masked_latents is not None:
        extra = torch.cat([mask.mask, mask.masked_latents], dim=1)
        # Guidance doubles the batch before this layer sees it: the extra channels are doubled to match.
        denoiser = InpaintChannels(denoiser, torch.cat([extra, extra]) if plan.guided else extra)
    if plan.guided:
        denoiser = Guidance(denoiser, plan.cfg_scale)
    return denoiser


def _network_call(components: Components, plan: BatchPlan) -> Denoiser:
    """The innermost layer: the family's network with the batch's conditioning; another architecture
    (a transformer family) brings its own call and conditioning here, and the layers above stay."""
    # Fast mode: one full U-Net pass every few steps, the deep features reused in between (DeepCache).
    unet = DeepCacheUNet(components.unet) if plan.fast else components.unet
    return UNetCall(unet, *_unet_conditioning(components, plan))


def _unet_conditioning(components: Components, plan: BatchPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Prompt embeddings for the batch, [uncond..., cond...] as diffusers orders them, and SDXL's
    micro-conditioning: pooled text embeddings and (original size, crop, target size) ids."""
    device, dtype, n = components.execution_device, components.unet.dtype, plan.batch_size
    pos, neg = plan.prompt, plan.negative
    embeds = pos.embeds.repeat(n, 1, 1)
    if plan.guided:
        embeds = torch.cat([neg.embeds.repeat(n, 1, 1), embeds])
    embeds = embeds.to(device=device, dtype=dtype)
    if components.family != "sdxl":
        return embeds, None
    cv = plan.canvas
    time_ids = torch.tensor([[cv.height, cv.width, 0, 0, cv.height, cv.width]], dtype=dtype, device=device)
    pooled = pos.pooled.repeat(n, 1)
    ids = time_ids.repeat(n, 1)
    if plan.guided:
        pooled = torch.cat([neg.pooled.repeat(n, 1), pooled])
        ids = torch.cat([ids, ids])
    return embeds, {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids}
