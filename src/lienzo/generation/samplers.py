"""AUTOMATIC1111 sampler and schedule names mapped onto diffusers schedulers.

Users know samplers by A1111's names; diffusers implements them as scheduler classes. This table is
the only place that knows the correspondence. Schedulers are built with ``from_config`` on the
model's own training schedule, so the beta schedule and prediction type always come from the model.
"""

import inspect
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lienzo.errors import InvalidRequestError


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: type[SchedulerMixin]
    options: dict = field(default_factory=dict)
    # A1111 picks Karras sigmas by default for the DPM family ("Automatic" schedule).
    automatic: str = "Uniform"
    stochastic: bool = False
    paper: str = ""

    @property
    def schedules(self) -> list[str]:
        """Schedule types this scheduler can run."""
        params = inspect.signature(self.scheduler_class.__init__).parameters
        names = ["Automatic", "Uniform"]
        if "use_karras_sigmas" in params:
            names.append("Karras")
        if "use_exponential_sigmas" in params:
            names.append("Exponential")
        names.append("SGM Uniform")
        return names


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler a", EulerAncestralDiscreteScheduler, stochastic=True, paper="Karras et al. 2022 (ancestral)"),
        Sampler("Euler", EulerDiscreteScheduler, paper="Karras et al. 2022, Algorithm 2 (first order)"),
        Sampler("LMS", LMSDiscreteScheduler, paper="linear multistep, Karras et al. 2022"),
        Sampler("Heun", HeunDiscreteScheduler, paper="Karras et al. 2022, Algorithm 2"),
        Sampler("DPM2", KDPM2DiscreteScheduler, automatic="Karras", paper="Karras et al. 2022 (DPM-Solver-2)"),
        Sampler(
            "DPM2 a", KDPM2AncestralDiscreteScheduler, automatic="Karras", stochastic=True,
            paper="Karras et al. 2022 (DPM-Solver-2, ancestral)",
        ),
        Sampler(
            "DPM++ 2M", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
            automatic="Karras", paper="Lu et al. 2022, DPM-Solver++ (2M)",
        ),
        Sampler(
            "DPM++ 2M SDE", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            automatic="Karras", stochastic=True, paper="Lu et al. 2022, DPM-Solver++ (2M SDE)",
        ),
        Sampler("DPM++ SDE", DPMSolverSDEScheduler, automatic="Karras", stochastic=True, paper="Lu et al. 2022"),
        Sampler("DDIM", DDIMScheduler, paper="Song et al. 2020, DDIM"),
        Sampler("PLMS", PNDMScheduler, {"skip_prk_steps": True}, paper="Liu et al. 2022, PNDM"),
        Sampler("UniPC", UniPCMultistepScheduler, paper="Zhao et al. 2023, UniPC"),
        Sampler("LCM", LCMScheduler, stochastic=True, paper="Luo et al. 2023, Latent Consistency Models"),
    )
}

SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]

_ALIASES = {name.lower().replace(" ", "").replace("_", ""): name for name in SAMPLERS}
_ALIASES.update({"k_euler_a": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun"})
_ALIASES.update({"k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE"})
_ALIASES.update({"eulerancestral": "Euler a", "euler_ancestral": "Euler a"})


def resolve_sampler(name: str) -> Sampler:
    """Find a sampler by its A1111 name (case and spacing forgiven, k-diffusion names accepted)."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    key = name.lower().replace(" ", "").replace("_", "")
    canonical = _ALIASES.get(name.lower(), _ALIASES.get(key))
    if canonical is None:
        raise InvalidRequestError("sampler", f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[canonical]


def resolve_schedule(sampler: Sampler, schedule: str) -> str:
    """The concrete schedule type a request runs with ("Automatic" resolved to what A1111 would use)."""
    matches = [s for s in SCHEDULES if s.lower() == schedule.lower()]
    if not matches:
        raise InvalidRequestError("schedule", f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    schedule = matches[0]
    if schedule == "Automatic":
        return sampler.automatic
    if schedule not in sampler.schedules:
        allowed = ", ".join(sampler.schedules)
        raise InvalidRequestError("schedule", f"sampler {sampler.name!r} cannot use the {schedule} schedule; choose one of: {allowed}")
    return schedule


def build_scheduler(sampler: Sampler, schedule: str, base_config: dict, *, seed: int | None = None) -> SchedulerMixin:
    """A fresh scheduler for one image: sampler options + schedule type on the model's training schedule."""
    options = dict(sampler.options)
    schedule = resolve_schedule(sampler, schedule)
    if schedule == "Karras":
        options["use_karras_sigmas"] = True
    elif schedule == "Exponential":
        options["use_exponential_sigmas"] = True
    elif schedule == "SGM Uniform":
        options["timestep_spacing"] = "trailing"
    if sampler.scheduler_class is DPMSolverSDEScheduler and seed is not None:
        # Its Brownian tree is seeded once per scheduler; one scheduler per image keeps seed+i exact.
        options["noise_sampler_seed"] = seed
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return sampler.scheduler_class.from_config({**config, **options})
