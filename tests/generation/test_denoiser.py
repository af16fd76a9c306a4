"""The denoiser layers and the loop that drives them: the loop sees only ``denoiser(x, t, step)``, so any
network (a U-Net today, a transformer tomorrow) runs behind it unchanged."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from lienzo.generation.deepcache import DeepCacheUNet
from lienzo.generation.denoiser import Guidance, InpaintChannels, UNetCall, build_denoiser
from lienzo.generation.latents import ImageSchedulers, LatentMask, Start
from lienzo.generation.loop import Interrupted, Stop, denoising_loop
from lienzo.generation.plan import BatchPlan, Canvas
from lienzo.generation.prompts import PromptEmbeddings, PromptSchedule
from lienzo.generation.samplers import resolve_sampler
from tiny_models import build_tiny


class _Recording:
    """A stand-in network: remembers its input and returns a prediction that differs per row."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, t, step):
        self.inputs.append(x)
        return x[:, :4] * torch.arange(1, x.shape[0] + 1, dtype=x.dtype).view(-1, 1, 1, 1)


def test_guidance_around_inpaint_channels_gives_the_model_the_doubled_nine_channel_batch():
    x, extra = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8)
    net = _Recording()
    pred = Guidance(InpaintChannels(net, torch.cat([extra, extra])), 7.5)(x, torch.tensor(10), 0)
    # diffusers' inpainting pipeline: [uncond..., cond...] rows, then the mask and masked latents as channels.
    assert torch.equal(net.inputs[0], torch.cat([torch.cat([x, x]), torch.cat([extra, extra])], dim=1))
    out = net.inputs[0][:, :4] * torch.arange(1, 5, dtype=x.dtype).view(-1, 1, 1, 1)
    uncond, cond = out.chunk(2)
    assert torch.equal(pred, uncond + 7.5 * (cond - uncond))


def _plan(components, **fields) -> BatchPlan:
    dim = components.text_encoder.config.hidden_size
    pooled = torch.zeros(1, 32) if components.family == "sdxl" else None
    text = PromptSchedule.constant(PromptEmbeddings(torch.zeros(1, 77, dim), pooled))
    base = dict(
        canvas=Canvas(64, 64), prompt=text, negative=text, sampler=resolve_sampler("Euler"), schedule="Uniform", steps=3,
        cfg_scale=7.0, denoising_strength=0.75, inpainting_fill="original", fast=False, batch_size=2, first_seed=1,
    )
    return BatchPlan(**{**base, **fields})


@pytest.mark.parametrize("cfg_scale, fast", [(7.0, False), (1.0, True)])
def test_build_denoiser_stacks_only_the_layers_the_plan_needs(cfg_scale, fast):
    sd1 = build_tiny("sd1")
    denoiser = build_denoiser(sd1, _plan(sd1, cfg_scale=cfg_scale, fast=fast), None)
    if cfg_scale > 1:
        assert isinstance(denoiser, Guidance) and denoiser.scale == cfg_scale
        denoiser = denoiser.inner
    assert isinstance(denoiser, UNetCall) and denoiser.embeds.shape[0] == (4 if cfg_scale > 1 else 2)
    assert isinstance(denoiser.unet, DeepCacheUNet) if fast else denoiser.unet is sd1.unet
    assert denoiser.added is None


def test_inpainting_models_get_the_extra_channels_and_sdxl_its_size_conditioning():
    inpainting = build_tiny("sd1", inpainting=True)
    mask = LatentMask(torch.ones(2, 1, 8, 8), torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
    layers = build_denoiser(inpainting, _plan(inpainting), mask).inner
    assert isinstance(layers, InpaintChannels) and layers.extra.shape == (4, 5, 8, 8)
    out = build_denoiser(inpainting, _plan(inpainting), mask)(torch.randn(2, 4, 8, 8), torch.tensor(999), 0)
    assert out.shape == (2, 4, 8, 8)
    sdxl = build_tiny("sdxl")
    call = build_denoiser(sdxl, _plan(sdxl), None).inner
    assert call.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 4


def _schedulers(steps: int = 4) -> ImageSchedulers:
    schedulers = [EulerDiscreteScheduler() for _ in range(2)]
    for s in schedulers:
        s.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    return ImageSchedulers(schedulers, generators, schedulers[0].timesteps)


def test_the_loop_drives_any_callable_and_reports_every_step():
    # A "network" the loop has never heard of: it predicts no noise at all, so Euler's steps move nothing.
    schedulers, reports = _schedulers(), []
    start = Start(torch.ones(2, 4, 8, 8) * schedulers.init_noise_sigma, torch.zeros(2, 4, 8, 8))
    latents = denoising_loop(
        lambda x, t, step: torch.zeros_like(x), schedulers, start, Stop(None, None, None), lambda *a: reports.append(a[:2])
    )
    assert reports == [(1, 4), (2, 4), (3, 4), (4, 4)]
    torch.testing.assert_close(latents, start.latents)


def test_an_interrupt_returns_the_predicted_clean_latents_with_the_unmasked_part_kept():
    schedulers, calls = _schedulers(), []
    original = torch.full((2, 4, 8, 8), 3.0)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1  # repaint the left half
    start = Start(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), LatentMask(mask, original))
    stop = Stop(None, None, lambda: calls.append(1) or len(calls) > 2)
    latents = denoising_loop(lambda x, t, step: torch.zeros_like(x), schedulers, start, stop, None)
    assert stop.stopped_at == 2 and stop.total == 4
    assert torch.equal(latents[..., 4:], original[..., 4:])
    with pytest.raises(Interrupted):  # before the first step there is nothing to show
        denoising_loop(lambda x, t, step: x, _schedulers(), start, Stop(None, None, lambda: True), None)
