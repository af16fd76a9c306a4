"""The two training objectives as modules, so accelerate's DDP wrapper sees one ``forward`` per step.

- :class:`AutoencoderLoss`: reconstruction + KL (Kingma & Welling 2014), plus the VGG16 perceptual
  loss the seed system used (Johnson et al. 2016) when VGG16 weights are given.
- :class:`DenoiserLoss`: the latent diffusion objective (Ho et al. 2020; Rombach et al. 2022), epsilon
  or v-prediction (Salimans & Ho 2022), optional Min-SNR weighting (Hang et al. 2023).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import Tensor, nn
from transformers import CLIPTextModel

from lienzo.errors import ModelFileError
from lienzo.models.formats import load_state_dict

# torchvision's VGG16 ``features`` layout: channels per conv, "M" a 2x2 max-pool. Built here because
# VGG16's feature stack is 13 convolutions, and torchvision's wheels are pinned to one exact torch build.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Feature taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices into ``features``), as LPIPS uses.
_TAPS = (3, 8, 15, 22, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptual(nn.Module):
    """Mean squared distance between VGG16 features of two images in [-1, 1], summed over five depths."""

    def __init__(self, weights: Path):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for spec in _VGG16:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, spec, 3, padding=1), nn.ReLU(inplace=False)]
                channels = spec
        self.features = nn.Sequential(*layers)
        self.features.load_state_dict(_vgg_state(weights))
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x = torch.cat([a, b])
        x = ((x + 1) / 2 - self.mean) / self.std
        loss = x.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                fa, fb = x.chunk(2)
                loss = loss + F.mse_loss(fa, fb)
            if i == _TAPS[-1]:
                break
        return loss


def _vgg_state(path: Path) -> dict[str, Tensor]:
    """``features.*`` tensors from a torchvision VGG16 file (.safetensors, or .pth loaded weights-only)."""
    try:
        state = load_state_dict(path)
    except ModelFileError as err:
        raise ModelFileError(f"perceptual_weights: {err}") from None
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ModelFileError(f"perceptual_weights: {path} has no VGG16 'features.*' tensors")
    return features


class AutoencoderLoss(nn.Module):
    """The VAE stage: ``loss = recon + kl_weight * KL + perceptual_weight * VGG``, per pixel.

    The KL is summed over latent elements and divided by the pixel count, which keeps the ratio of
    the ldm recipe (summed reconstruction, KL weight 1e-6) while the reconstruction is a mean.
    """

    def __init__(self, vae: AutoencoderKL, *, recon: str, kl_weight: float, perceptual: VGGPerceptual | None, perceptual_weight: float):
        super().__init__()
        self.vae = vae
        self.perceptual = perceptual
        self.recon, self.kl_weight, self.perceptual_weight = recon, kl_weight, perceptual_weight

    def forward(self, pixels: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, dict[str, Tensor]]:
        posterior = self.vae.encode(pixels).latent_dist
        decoded = self.vae.decode(posterior.sample(generators)).sample
        recon = F.l1_loss(decoded, pixels) if self.recon == "l1" else F.mse_loss(decoded, pixels)
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = recon + self.kl_weight * kl
        parts = {"recon": recon.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(decoded, pixels)
            loss = loss + self.perceptual_weight * perceptual
            parts["perceptual"] = perceptual.detach()
        return loss, parts


class DenoiserLoss(nn.Module):
    """The UNet stage: noise clean latents to a random timestep and regress the noise (or velocity)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, noise: DDPMScheduler, *, snr_gamma: float):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.noise, self.snr_gamma = noise, snr_gamma

    def forward(self, latents: Tensor, input_ids: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder.training):
            text = self.text_encoder(input_ids, return_dict=False)[0]
        noisy = self.noise.add_noise(latents, noise, timesteps)
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma > 0:
            snr = compute_snr(self.noise, timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma) / snr
            if self.noise.config.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
            per_sample = per_sample * weight
        loss = per_sample.mean()
        return loss, {"mse": loss.detach()}
