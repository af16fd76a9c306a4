"""Interrupt (A1111's): the job stops, keeps its finished images and finishes the one in progress from
the clean image its last step predicted."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from lienzo.generation import engine
from lienzo.generation.latents import denoised_estimate
from lienzo.generation.request import build_request
from lienzo.generation.samplers import SAMPLERS
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _interrupt_after(steps: int):
    """An interrupt check that turns true once ``steps`` steps are done."""
    done = []

    def progress(p: engine.Progress) -> None:
        done.append(p.step)

    return progress, lambda: len(done) >= steps


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_keeps_the_image_in_progress(sd1, sampler):
    request = build_request(prompt="a fox", sampler=sampler, steps=6, width=64, height=64, seed=3, batch_size=2, batch_count=3)
    seen = []  # second-order samplers take more than one model step per sampling step
    result = engine.generate(sd1, request, progress=seen.append, interrupt=lambda: bool(seen) and seen[-1].batch == 1 and seen[-1].step == 2)
    assert result.interrupted
    assert [image.seed for image in result.images] == [3, 4, 5, 6]  # batch 2 never starts
    for image in result.images:
        assert np.isfinite(image.pixels).all() and image.image.size == (64, 64)
    label = f"at step 2 of {seen[-1].total_steps}"
    assert [image.parameters.get("Interrupted") for image in result.images] == [None, None, label, label]
    assert parse_infotext(result.images[2].infotext).params["Interrupted"] == label


def test_the_kept_image_is_the_prediction_not_the_noisy_state(sd1):
    """Euler's latents mid-way are the clean image plus sigma times noise; what is kept is the clean
    estimate, so it differs from decoding the noisy latents and is far less noisy."""
    request = build_request(prompt="a fox", sampler="Euler", steps=10, width=64, height=64, seed=9)
    states = []
    progress, interrupt = _interrupt_after(2)
    result = engine.generate(sd1, request, progress=lambda p: (states.append(p.latents), progress(p)), interrupt=interrupt)
    noisy = sd1.vae.decode(states[-1] / sd1.vae.config.scaling_factor).sample
    noisy = ((noisy / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)).detach().numpy()
    assert np.abs(result.images[0].pixels - noisy).mean() > 0.01


def test_interrupt_before_the_first_step_makes_nothing(sd1):
    request = build_request(prompt="a fox", steps=4, width=64, height=64, seed=1)
    result = engine.generate(sd1, request, interrupt=lambda: True)
    assert result.interrupted and result.images == []


def test_inpainting_keeps_the_unmasked_pixels_when_interrupted(sd1):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    request = build_request(prompt="a fox", steps=6, seed=2, init_image=image, mask=mask, mask_blur=0)
    progress, interrupt = _interrupt_after(2)
    result = engine.generate(sd1, request, progress=progress, interrupt=interrupt)
    kept = np.asarray(result.images[0].image)[:, 40:]
    assert (kept == (200, 40, 40)).all()


@pytest.mark.parametrize(
    ("scheduler_class", "options"),
    [(PNDMScheduler, {"skip_prk_steps": True}), (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"})],
)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoised_estimate_matches_ddim_where_the_scheduler_gives_none(sd1, scheduler_class, options, prediction):
    """PNDM returns no clean estimate and DPM++ keeps it internally: both must agree with DDIM's own
    ``pred_original_sample`` at the same timestep."""
    config = {**sd1.scheduler_config, "prediction_type": prediction}
    generator = torch.Generator().manual_seed(0)
    sample, pred = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    ddim = DDIMScheduler.from_config(config)
    other = scheduler_class.from_config({**config, **options})
    ddim.set_timesteps(10)
    other.set_timesteps(10)
    t = other.timesteps[0]
    expected = ddim.step(pred, t, sample).pred_original_sample
    output = other.step(pred, t, sample)
    assert not hasattr(output, "pred_original_sample")
    torch.testing.assert_close(denoised_estimate(other, output, sample, pred, t), expected, rtol=1e-4, atol=1e-4)
