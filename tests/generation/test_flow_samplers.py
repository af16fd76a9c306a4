"""Samplers and schedules on flow-matching models (SD 3.x, Flux.1): the A1111 names run on diffusers'
flow schedulers, Simple is what diffusers' own pipelines run, and samplers with no flow form are refused."""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps as flux_retrieve_timesteps
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps as sd3_retrieve_timesteps

from lienzo.errors import InvalidRequestError
from lienzo.generation.samplers import (
    OWN_LINSPACE,
    OWN_TRAILING,
    SAMPLERS,
    SCHEDULES,
    SIGMA_KINDS,
    SIGMAS,
    build_scheduler,
    flow_samplers,
    flux_mu,
    is_flow,
    resolve_sampler,
    resolve_schedule,
    runs_as,
    set_timesteps,
)
from lienzo.models.families import FAMILIES
from lienzo.models.single_file_layout import scheduler_config_for

SD3 = FAMILIES["sd3"].scheduler
FLUX = FAMILIES["flux"].scheduler
CPU = torch.device("cpu")
# Image sequence lengths, (h / 16) * (w / 16) for an image of h x w: 1024², 512², 768 x 1344.
SEQ_LENS = [4096, 1024, 48 * 84]


def _mu(seq_len: int) -> float:
    """mu as FluxPipeline computes it, from diffusers' own function."""
    return calculate_shift(
        seq_len, FLUX.get("base_image_seq_len", 256), FLUX.get("max_image_seq_len", 4096), FLUX.get("base_shift", 0.5),
        FLUX.get("max_shift", 1.15),
    )


def _ours(sampler: str, schedule: str, config: dict, steps: int, mu: float | None = None):
    s = resolve_sampler(sampler)
    scheduler = build_scheduler(s, schedule, config, seed=1)
    set_timesteps(scheduler, s, schedule, steps, device=CPU, family="flux" if config is FLUX else "sd3", mu=mu)
    return scheduler


def _pipeline_scheduler(config: dict):
    """The scheduler a diffusers pipeline loads from this config."""
    return getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.mark.parametrize("steps", [4, 20, 28])
@pytest.mark.parametrize("schedule", ["Simple", "Automatic"])
def test_simple_on_sd3_is_stable_diffusion_3_pipelines_to_the_bit(steps, schedule):
    reference = _pipeline_scheduler(SD3)
    timesteps, _ = sd3_retrieve_timesteps(reference, steps, CPU, sigmas=None)  # as StableDiffusion3Pipeline calls it
    ours = _ours("Euler", schedule, SD3, steps)
    assert type(ours) is type(reference)
    assert torch.equal(ours.timesteps, timesteps) and torch.equal(ours.sigmas, reference.sigmas)


@pytest.mark.parametrize("steps", [4, 20, 28])
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_simple_on_flux_is_flux_pipelines_to_the_bit(steps, seq_len):
    assert flux_mu(seq_len, FLUX) == _mu(seq_len)
    reference = _pipeline_scheduler(FLUX)
    sigmas = np.linspace(1.0, 1 / steps, steps)  # as FluxPipeline calls it
    timesteps, _ = flux_retrieve_timesteps(reference, steps, CPU, sigmas=sigmas, mu=_mu(seq_len))
    for schedule in ("Simple", "Automatic"):
        ours = _ours("Euler", schedule, FLUX, steps, mu=flux_mu(seq_len, FLUX))
        assert torch.equal(ours.timesteps, timesteps) and torch.equal(ours.sigmas, reference.sigmas), schedule


def test_dpm_solver_and_unipc_on_flux_run_as_flux_pipeline_runs_them():
    """FluxPipeline drops its list of levels for schedulers with flow sigmas of their own and passes mu."""
    mu = flux_mu(4096, FLUX)
    for sampler, cls in (("DPM++ 2M", "DPMSolverMultistepScheduler"), ("UniPC", "UniPCMultistepScheduler")):
        options = {**SAMPLERS[sampler].flow.options, "flow_shift": FLUX["shift"]}
        reference = getattr(diffusers, cls).from_config({**FLUX, **options})
        timesteps, _ = flux_retrieve_timesteps(reference, 20, CPU, sigmas=None, mu=mu)
        ours = _ours(sampler, "Simple", FLUX, 20, mu=mu)
        assert torch.equal(ours.timesteps, timesteps) and torch.equal(ours.sigmas, reference.sigmas), sampler


def test_the_flow_variants_are_diffusers_flow_schedulers():
    assert flow_samplers() == ["Euler a", "Euler", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM"]
    classes = {name: type(build_scheduler(SAMPLERS[name], "Simple", SD3)).__name__ for name in flow_samplers()}
    assert classes == {
        "Euler a": "FlowMatchEulerDiscreteScheduler", "Euler": "FlowMatchEulerDiscreteScheduler",
        "Heun": "FlowMatchHeunDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE": "DPMSolverMultistepScheduler", "UniPC": "UniPCMultistepScheduler", "LCM": "FlowMatchLCMScheduler",
    }
    euler_a = build_scheduler(SAMPLERS["Euler a"], "Simple", SD3)
    assert euler_a.config.stochastic_sampling and euler_a.config.shift == 3.0
    dpm = build_scheduler(SAMPLERS["DPM++ 2M SDE"], "Simple", SD3)
    assert dpm.config.use_flow_sigmas and dpm.config.prediction_type == "flow_prediction" and dpm.config.flow_shift == 3.0
    assert dpm.config.algorithm_type == "sde-dpmsolver++"


def test_declared_flow_capabilities_match_the_diffusers_classes():
    """The table is data, so lienzo can validate without diffusers; this keeps its flow side honest."""
    for name in flow_samplers():
        variant = SAMPLERS[name].flow
        cls = getattr(diffusers, variant.scheduler_class)
        init = inspect.signature(cls.__init__).parameters
        step = inspect.signature(cls.set_timesteps).parameters
        assert set(variant.options) <= set(init), name
        assert (SIGMA_KINDS in variant.supports) == ("use_karras_sigmas" in init and variant.scheduler_class.startswith("FlowMatch"))
        assert SIGMAS not in variant.supports or "sigmas" in step, name
        assert (OWN_TRAILING in variant.supports) == bool(variant.options.get("use_flow_sigmas")), name
        assert (OWN_LINSPACE in variant.supports) == variant.scheduler_class.startswith("FlowMatch"), name


def test_a_sampler_without_a_flow_form_is_refused_naming_the_ones_that_run():
    refused = [name for name in SAMPLERS if name not in flow_samplers()]
    assert refused == ["LMS", "DPM2", "DPM2 a", "DPM++ SDE", "DDIM", "PLMS"]
    for name in refused:
        for config in (SD3, FLUX):
            with pytest.raises(InvalidRequestError) as err:
                build_scheduler(SAMPLERS[name], "Automatic", config)
            assert err.value.field == "sampler"
            assert name in str(err.value) and "Euler a, Euler, Heun, DPM++ 2M" in str(err.value)
        assert SAMPLERS[name].schedules_on(FLUX) == []


def test_what_each_schedule_runs_as_on_flow_models():
    euler, heun, dpm = SAMPLERS["Euler"], SAMPLERS["Heun"], SAMPLERS["DPM++ 2M"]
    assert resolve_schedule(dpm, "Automatic", FLUX) == "Simple" and resolve_schedule(dpm, "Automatic") == "Karras"
    for config in (SD3, FLUX):
        assert euler.schedules_on(config) == [label for label in SCHEDULES if label not in ("KL Optimal", "Align Your Steps", "DDIM")]
        for label in ("KL Optimal", "Align Your Steps", "DDIM"):
            assert runs_as(euler, label, config) == "Simple"
        assert runs_as(dpm, "Karras", FLUX) == "Simple" and runs_as(dpm, "SGM Uniform", config) == "SGM Uniform"
    # Heun takes no list of levels: on Flux its own linspace (Normal) is the nearest to Simple's.
    assert runs_as(heun, "Simple", FLUX) == "Normal" and runs_as(heun, "Simple", SD3) == "Simple"
    # SD 3's Simple is its pipeline's linspace, which DPM-Solver's flow sigmas are not: it runs its own.
    assert runs_as(dpm, "Simple", SD3) == "SGM Uniform" and runs_as(dpm, "Simple", FLUX) == "Simple"
    # Without a flow config nothing changes.
    assert runs_as(euler, "Automatic") == "Uniform" and runs_as(SAMPLERS["DDIM"], "Automatic") == "DDIM"


def _unshift(sigmas: torch.Tensor, mu: float) -> np.ndarray:
    """t before Flux's dynamic shift (the inverse of exp(mu) / (exp(mu) + 1 / t - 1))."""
    s = sigmas[:-1].double().numpy()
    return s / (s + np.exp(mu) * (1 - s))


def test_each_schedule_runs_its_own_levels_on_flux():
    mu, n = flux_mu(4096, FLUX), 20
    runs = {label: _ours("Euler", label, FLUX, n, mu=mu).sigmas for label in SCHEDULES if label != "Automatic"}
    assert np.allclose(_unshift(runs["Simple"], mu), np.linspace(1, 1 / n, n), atol=1e-6)
    assert np.allclose(_unshift(runs["Normal"], mu), np.linspace(1, 0.001, n), atol=1e-6)  # to the lowest training level
    assert np.allclose(_unshift(runs["SGM Uniform"], mu), np.linspace(1, 0.001, n + 1)[:-1], atol=1e-6)
    assert np.allclose(_unshift(runs["SGM Uniform"], mu), _unshift(runs["Simple"], mu), atol=1e-3)
    top, bottom = float(runs["Normal"][0]), float(runs["Normal"][-2])
    ramp = np.linspace(0, 1, n)
    karras = (top ** (1 / 7) + ramp * (bottom ** (1 / 7) - top ** (1 / 7))) ** 7
    assert np.allclose(runs["Karras"][:-1], karras, rtol=1e-5) and runs["Karras"][-1] == 0
    assert np.allclose(runs["Exponential"][:-1], np.geomspace(top, bottom, n), rtol=1e-5)
    assert torch.equal(runs["Polyexponential"], runs["Exponential"]) and torch.equal(runs["Uniform"], runs["Normal"])
    for label in ("KL Optimal", "Align Your Steps", "DDIM"):
        assert torch.equal(runs[label], runs["Simple"]), label
    distinct = ["Simple", "Normal", "SGM Uniform", "Karras", "Exponential", "Beta"]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert not torch.equal(runs[a], runs[b]), (a, b)


def test_heun_on_flux_shifts_by_mu_as_euler_does():
    mu = flux_mu(1024, FLUX)
    heun, euler = _ours("Heun", "Normal", FLUX, 8, mu=mu), _ours("Euler", "Normal", FLUX, 8, mu=mu)
    assert heun.config.shift == pytest.approx(np.exp(mu))
    # Heun steps each level twice: its levels, once each, are Euler's.
    assert torch.allclose(heun.sigmas.unique_consecutive(), euler.sigmas, atol=1e-6)


def test_dynamic_shifting_needs_mu():
    for sampler in flow_samplers():
        s = SAMPLERS[sampler]
        with pytest.raises(ValueError, match="mu"):
            set_timesteps(build_scheduler(s, "Simple", FLUX), s, "Simple", 4)


def _step_three_times(scheduler, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 16, 8, 8, generator=generator)
    takes = inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps[:3]:
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        velocity = torch.randn(model_input.shape, generator=generator) - model_input  # noise minus an image
        kwargs = {"generator": generator} if "generator" in takes else {}
        sample = scheduler.step(velocity, t, sample, **kwargs).prev_sample
    return sample


@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
@pytest.mark.parametrize("sampler", flow_samplers())
def test_every_flow_sampler_runs_every_schedule(sampler, config):
    mu = flux_mu(1024, config) if config.get("use_dynamic_shifting") else None
    for schedule in SCHEDULES:
        scheduler = _ours(sampler, schedule, config, 6, mu=mu)
        assert len(scheduler.timesteps) >= 6, schedule
        sigmas = scheduler.sigmas
        assert torch.isfinite(sigmas).all() and sigmas.max() <= 1 and sigmas[-1] == 0, schedule
        assert torch.isfinite(_step_three_times(scheduler)).all(), schedule


@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
@pytest.mark.parametrize("sampler", flow_samplers())
def test_a_perfect_velocity_lands_every_flow_sampler_on_its_image(sampler, config):
    """A model that knows the one image answers x's own velocity (x - image) / sigma: every sampler and
    schedule must end on that image, which checks that each class reads the output as a flow."""
    mu = flux_mu(1024, config) if config.get("use_dynamic_shifting") else None
    image = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for schedule in SCHEDULES:
        scheduler = _ours(sampler, schedule, config, 8, mu=mu)
        generator = torch.Generator().manual_seed(1)
        sample = torch.randn(image.shape, generator=generator)
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for i, t in enumerate(scheduler.timesteps):
            # The level the sample is at: DPM-Solver's and UniPC's timesteps are rounded, Heun's list is doubled.
            sigma = float(scheduler.sigmas[i]) if scheduler.order == 1 else float(t) / 1000
            sample = scheduler.step((sample - image) / sigma, t, sample, **kwargs).prev_sample
        assert torch.allclose(sample, image, atol=1e-5), schedule


def test_stochastic_flow_samplers_repeat_with_the_same_seed():
    for sampler in ("Euler a", "DPM++ 2M SDE", "LCM"):
        first, again = (_step_three_times(_ours(sampler, "Simple", SD3, 6)) for _ in range(2))
        assert torch.equal(first, again), sampler
        assert not torch.equal(first, _step_three_times(_ours(sampler, "Simple", SD3, 6), seed=1)), sampler
    assert not torch.equal(_step_three_times(_ours("Euler a", "Simple", SD3, 6)), _step_three_times(_ours("Euler", "Simple", SD3, 6)))


def test_sd_configs_are_not_flow_and_build_as_before():
    sd = scheduler_config_for("epsilon")
    assert not is_flow(sd) and not is_flow(None) and not is_flow({"shift": 3.0})
    assert is_flow(SD3) and is_flow(FLUX) and is_flow({"use_flow_sigmas": True})
    for name, sampler in SAMPLERS.items():
        assert type(build_scheduler(sampler, "Automatic", sd)).__name__ == sampler.scheduler_class, name
    assert SAMPLERS["Euler"].schedules_on(sd) == SAMPLERS["Euler"].schedules
