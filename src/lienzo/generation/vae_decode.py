"""Latents to pixels: the one VAE decode every image goes through.

Two things happen here that a bare ``vae.decode`` does not do:

* **No NaN, no black image.** A VAE in fp16 (the SD 1.5 and, above all, the SDXL VAE) can overflow
  to NaN or inf, which the image processor turns into a black picture: the most reported AUTOMATIC1111
  problem. A half-precision decode whose result is not finite is done again with the VAE in fp32, and
  the VAE stays in fp32 from then on (A1111's automatic ``--no-half-vae``), with one warning.
* **Tiles for large images.** Above :data:`AUTO_TILE_PIXELS` (or always, with tiling ``on``) the VAE
  decodes overlapping tiles of its native size and blends their seams (diffusers' ``tiled_decode``),
  which bounds its memory and the cost of its attention layer, quadratic in the latent's area.
  (Not to be confused with a request's ``tiling``, seamless textures: such a job decodes whole, see
  :func:`lienzo.generation.latents.decode`, as a tile with circular padding would wrap onto itself.)
"""

import logging

import torch
from diffusers import AutoencoderKL

from lienzo.models.components import TILING_CHOICES, has_frames, vae_scale_factor

log = logging.getLogger(__name__)

# Images larger than 1024 x 1024 are decoded in tiles when tiling is "auto": SDXL's own size (and all
# of SD 1.x/2.x's usual sizes) decode whole, as diffusers' pipelines do; a 2048 x 2048 image decodes
# in tiles. diffusers tiles only latents wider or taller than the VAE's native tile (512 px for SD 1.x).
AUTO_TILE_PIXELS = 1024 * 1024

_HALF = (torch.float16, torch.bfloat16)


def wants_tiling(vae: AutoencoderKL, latents: torch.Tensor, tiling: str = "auto") -> bool:
    """Whether ``latents`` are decoded in tiles: ``on``, ``off``, or ``auto`` (above :data:`AUTO_TILE_PIXELS`)."""
    if tiling not in TILING_CHOICES:
        raise ValueError(f"vae_tiling: choose one of {', '.join(TILING_CHOICES)}; got {tiling!r}")
    if tiling != "auto":
        return tiling == "on"
    scale = vae_scale_factor(vae)
    return latents.shape[-2] * latents.shape[-1] * scale * scale > AUTO_TILE_PIXELS


def latent_space(vae: AutoencoderKL, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """How the loop's latents are made of the VAE's (N x C x h x w, Flux.2's in their 2x2 patches): ``(vae - mean) *
    scale``, undone as ``loop / scale + mean`` (each family's pipeline's arithmetic); float32, one value a channel."""
    config = vae.config
    if config.get("latents_mean") is not None:  # Wan-style VAEs (Qwen-Image): per-channel statistics in the config
        mean, scale = torch.tensor(config.latents_mean), 1.0 / torch.tensor(config.latents_std)
    elif hasattr(vae, "bn"):  # Flux.2: the batch norm's running statistics of the patched latents
        mean, scale = vae.bn.running_mean, 1.0 / torch.sqrt(vae.bn.running_var + config.batch_norm_eps)
    else:  # one scaling factor, after a shift (SD 3.x, Flux.1) or none
        mean, scale = torch.tensor(config.get("shift_factor") or 0.0), torch.tensor(config.scaling_factor)
    return tuple(t.reshape(1, -1, 1, 1).to(device, torch.float32) for t in (mean, scale))


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, *, tiling: str = "auto") -> torch.Tensor:
    """Decode the VAE's own ``latents`` (:func:`latent_space` undone) to float32 images in [-1, 1], N x 3 x H x W.

    A half-precision VAE whose output has NaN or inf is upcast to fp32 for good and the batch decoded again.
    """
    tiled = wants_tiling(vae, latents, tiling)
    decoded = _decode(vae, latents, tiled)
    if vae.dtype in _HALF and not torch.isfinite(decoded).all():
        if not torch.isfinite(latents).all():
            # Nothing the VAE can fix: the denoiser itself overflowed.
            log.warning("the latents to decode hold NaN or inf (the U-Net overflowed in %s); try dtype float32", latents.dtype)
            return decoded.float()
        log.warning(
            "the VAE produced NaN or inf in %s (black image); decoding again in float32, and keeping the VAE "
            "in float32 from now on (set vae_dtype float32 to start there)", str(vae.dtype).removeprefix("torch."),
        )
        vae.to(torch.float32)
        decoded = _decode(vae, latents, tiled)
    return decoded.float()


def _decode(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    """One ``vae.decode`` with tiling switched as asked for this call, then back to the VAE's own setting."""
    before = vae.use_tiling  # the VAE's own setting, which its encodes follow
    vae.use_tiling = tiled
    try:
        with torch.no_grad():
            if has_frames(vae):
                return vae.decode(latents.to(vae.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    finally:
        vae.use_tiling = before
