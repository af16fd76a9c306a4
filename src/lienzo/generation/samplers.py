"""AUTOMATIC1111 sampler and schedule names mapped onto diffusers schedulers.

Users know samplers by A1111's names; diffusers implements them as scheduler classes. This table is
the only place that knows the correspondence. Schedulers are built with ``from_config`` on the
model's own training schedule, so the beta schedule and prediction type always come from the model.
The table is data only: a diffusers class is imported by name when a scheduler is built, so a
request can be validated without importing torch (``lienzo generate --sampler bogus`` fails at once).

Schedule types are A1111 1.10's twelve (ids, labels and its ``SGMUniform`` alias, in any case).
Each runs on what diffusers 0.42 supports natively; "exact" means the noise levels A1111 computes
(within 0.1% at 20 steps on SD's schedule, sigma 0.0292 to 14.61), "near" that they differ as noted.

=================  =======================================================  ======================================
schedule           diffusers                                                how close to A1111's noise levels
=================  =======================================================  ======================================
Automatic          the sampler's own (``Sampler.automatic``)                A1111's default for the sampler
Uniform, Normal    ``timestep_spacing="linspace"`` (t = 999 ... 0)          exact, except near on DPM++ 2M, 2M SDE
                                                                            and UniPC, whose linspace stops one
                                                                            step above t = 0 (as SGM Uniform)
SGM Uniform        ``timestep_spacing="trailing"``                          near: within one training timestep
                                                                            (A1111 steps 999/n, diffusers 1000/n)
Simple             ``timestep_spacing="trailing"``                          exact
DDIM               ``timestep_spacing="leading"``, ``steps_offset=1``       exact when steps divides 1000 (A1111
                                                                            adds a step at the top otherwise);
                                                                            near on DPM++ 2M, 2M SDE and UniPC
                                                                            (their leading steps 1000 // (n + 1))
Karras             ``use_karras_sigmas`` (rho 7), linspace                  exact
Exponential,       ``use_exponential_sigmas``, linspace                     exact (Polyexponential at A1111's
Polyexponential                                                             default rho 1 is Exponential)
Beta               ``use_beta_sigmas`` (alpha = beta = 0.6), linspace       exact at A1111's default 0.6, 0.6
KL Optimal         ``set_timesteps(sigmas=...)``, tan-spaced levels         exact on Euler; near on DPM++ 2M, 2M
                                                                            SDE and Heun (``timesteps=``: whole
                                                                            timesteps, the last step to 0)
Align Your Steps   NVIDIA's SD 1.5 / SDXL tables, from diffusers           as KL Optimal (Euler within 0.6%:
                                                                            the model's sigma_min ends the table)
=================  =======================================================  ======================================

A sampler whose scheduler class cannot run a schedule still accepts it, as A1111 clients send any
of them, and runs the nearest it can (:func:`runs_as`, logged): the sigma-shaped ones (Karras,
Exponential, Polyexponential, Beta, KL Optimal, Align Your Steps) run as Uniform, the closest in log
sigma of the spacings every class has (mean distance to KL Optimal 0.47 against Karras' 0.63 at 20
steps; to Align Your Steps 0.29 against 0.37). Euler a, DDIM and PLMS have no sigma options in
diffusers; DPM++ SDE, DPM2, DPM2 a, LMS and UniPC take no custom list (UniPC only for flow models).
LCM places its own timesteps on its 50-step distillation grid whatever the schedule.
The infotext names the schedule asked for, so an image remakes with the same one.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lienzo.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger(__name__)

# What a diffusers scheduler class can be told about its schedule (Sampler.supports):
SPACING = "spacing"  # timestep_spacing "linspace" / "leading" / "trailing"
SIGMA_KINDS = "sigma kinds"  # use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
SIGMAS = "sigmas"  # set_timesteps(sigmas=[...]): any list of noise levels
TIMESTEPS = "timesteps"  # set_timesteps(timesteps=[...]): any list of training timesteps

_KINDS = frozenset({SPACING, SIGMA_KINDS})


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str  # a diffusers class name; imported when a scheduler is built
    supports: frozenset[str]
    options: dict = field(default_factory=dict)
    # A1111 picks Karras sigmas by default for the DPM family ("Automatic" schedule).
    automatic: str = "Uniform"
    stochastic: bool = False
    paper: str = ""

    @property
    def schedules(self) -> list[str]:
        """Schedule types this scheduler runs as asked; any other runs as its nearest (:func:`runs_as`)."""
        return [label for label, s in SCHEDULES.items() if label == "Automatic" or s.needs & self.supports]


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler(
            "Euler a", "EulerAncestralDiscreteScheduler", frozenset({SPACING}), stochastic=True,
            paper="Karras et al. 2022 (ancestral)",
        ),
        Sampler(
            "Euler", "EulerDiscreteScheduler", _KINDS | {SIGMAS, TIMESTEPS}, paper="Karras et al. 2022, Algorithm 2 (first order)"
        ),
        Sampler("LMS", "LMSDiscreteScheduler", _KINDS, paper="linear multistep, Karras et al. 2022"),
        Sampler("Heun", "HeunDiscreteScheduler", _KINDS | {TIMESTEPS}, paper="Karras et al. 2022, Algorithm 2"),
        Sampler("DPM2", "KDPM2DiscreteScheduler", _KINDS, automatic="Karras", paper="Karras et al. 2022 (DPM-Solver-2)"),
        Sampler(
            "DPM2 a", "KDPM2AncestralDiscreteScheduler", _KINDS, automatic="Karras", stochastic=True,
            paper="Karras et al. 2022 (DPM-Solver-2, ancestral)",
        ),
        Sampler(
            "DPM++ 2M", "DPMSolverMultistepScheduler", _KINDS | {TIMESTEPS}, {"algorithm_type": "dpmsolver++", "solver_order": 2},
            automatic="Karras", paper="Lu et al. 2022, DPM-Solver++ (2M)",
        ),
        Sampler(
            "DPM++ 2M SDE", "DPMSolverMultistepScheduler", _KINDS | {TIMESTEPS},
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, automatic="Karras", stochastic=True,
            paper="Lu et al. 2022, DPM-Solver++ (2M SDE)",
        ),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", _KINDS, automatic="Karras", stochastic=True, paper="Lu et al. 2022"),
        # A1111 runs DDIM, PLMS and UniPC at timesteps 1, 1 + 1000 // steps, ...: the DDIM schedule.
        Sampler("DDIM", "DDIMScheduler", frozenset({SPACING}), automatic="DDIM", paper="Song et al. 2020, DDIM"),
        Sampler(
            "PLMS", "PNDMScheduler", frozenset({SPACING}), {"skip_prk_steps": True}, automatic="DDIM", paper="Liu et al. 2022, PNDM"
        ),
        Sampler("UniPC", "UniPCMultistepScheduler", _KINDS, automatic="DDIM", paper="Zhao et al. 2023, UniPC"),
        Sampler("LCM", "LCMScheduler", frozenset(), stochastic=True, paper="Luo et al. 2023, Latent Consistency Models"),
    )
}

_ALIASES = {name.lower().replace(" ", "").replace("_", ""): name for name in SAMPLERS}
_ALIASES.update({"k_euler_a": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun"})
_ALIASES.update({"k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE"})
_ALIASES.update({"eulerancestral": "Euler a", "euler_ancestral": "Euler a"})


def _kl_optimal(steps: int, sigma_min: float, sigma_max: float, family: str) -> list[float]:
    """Sabour, Fidler and Kreis 2024 ("Align Your Steps", §3.1): arctan(sigma) falls linearly from
    sigma_max's to sigma_min's; ``steps + 1`` levels, the last sigma_min (A1111 stops there, not at 0)."""
    return np.tan(np.linspace(np.arctan(sigma_max), np.arctan(sigma_min), steps + 1)).tolist()


def _align_your_steps(steps: int, sigma_min: float, sigma_max: float, family: str) -> list[float]:
    """Sabour, Fidler and Kreis 2024: NVIDIA's optimised 10-step noise levels for SD 1.5 (any non-SDXL
    model, as A1111 does) or SDXL, then sigma_min, stretched to ``steps`` log-linearly, then 0."""
    from diffusers.schedulers import AysSchedules  # diffusers' copy of NVIDIA's tables; imported with diffusers

    # diffusers ends each table with 0 where A1111 ends it with sigma_min and then appends 0.
    table = AysSchedules["StableDiffusionXLSigmas" if family == "sdxl" else "StableDiffusionSigmas"][:-1] + [sigma_min]
    positions = np.linspace(0, len(table) - 1, steps)
    return [*np.exp(np.interp(positions, np.arange(len(table)), np.log(table))).tolist(), 0.0]


@dataclass(frozen=True)
class Schedule:
    """One of A1111's schedule types: its names, A1111's listing, and how a diffusers scheduler runs it."""

    label: str  # lienzo's name and the infotext's "Schedule type" (A1111's label)
    name: str  # A1111's id, as /sdapi/v1/schedulers lists it
    aliases: tuple[str, ...] = ()
    default_rho: float = -1  # A1111's listing: rho for Karras and Polyexponential, -1 for the rest
    need_inner_model: bool = False  # A1111's listing: it reads the model's own training sigmas
    needs: frozenset[str] = frozenset()  # any one of these capabilities runs it as asked
    options: dict = field(default_factory=dict)  # scheduler config it sets
    sigmas: Callable[[int, float, float, str], list[float]] | None = None  # (steps, sigma_min, sigma_max, family)


_LINSPACE = {"timestep_spacing": "linspace"}  # the sigma kinds span sigma_max..sigma_min of t = 999..0
_CUSTOM = frozenset({SIGMAS, TIMESTEPS})

SCHEDULES: dict[str, Schedule] = {
    s.label: s
    for s in (
        Schedule("Automatic", "automatic"),
        Schedule("Uniform", "uniform", need_inner_model=True, needs=frozenset({SPACING}), options=_LINSPACE),
        Schedule("Karras", "karras", default_rho=7.0, needs=frozenset({SIGMA_KINDS}), options={"use_karras_sigmas": True, **_LINSPACE}),
        Schedule("Exponential", "exponential", needs=frozenset({SIGMA_KINDS}), options={"use_exponential_sigmas": True, **_LINSPACE}),
        Schedule(
            "Polyexponential", "polyexponential", default_rho=1.0, needs=frozenset({SIGMA_KINDS}),
            options={"use_exponential_sigmas": True, **_LINSPACE},
        ),
        Schedule(
            "SGM Uniform", "sgm_uniform", ("SGMUniform",), need_inner_model=True, needs=frozenset({SPACING}),
            options={"timestep_spacing": "trailing"},
        ),
        Schedule("KL Optimal", "kl_optimal", needs=_CUSTOM, sigmas=_kl_optimal),
        Schedule("Align Your Steps", "align_your_steps", needs=_CUSTOM, sigmas=_align_your_steps),
        Schedule("Simple", "simple", need_inner_model=True, needs=frozenset({SPACING}), options={"timestep_spacing": "trailing"}),
        Schedule("Normal", "normal", need_inner_model=True, needs=frozenset({SPACING}), options=_LINSPACE),
        Schedule(
            "DDIM", "ddim", need_inner_model=True, needs=frozenset({SPACING}), options={"timestep_spacing": "leading", "steps_offset": 1}
        ),
        Schedule(
            "Beta", "beta", need_inner_model=True, needs=frozenset({SIGMA_KINDS}), options={"use_beta_sigmas": True, **_LINSPACE},
        ),
    )
}


def _key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


_SCHEDULE_NAMES = {_key(n): s.label for s in SCHEDULES.values() for n in (s.label, s.name, *s.aliases)}


def resolve_sampler(name: str) -> Sampler:
    """Find a sampler by its A1111 name (case and spacing forgiven, k-diffusion names accepted)."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    key = name.lower().replace(" ", "").replace("_", "")
    canonical = _ALIASES.get(name.lower(), _ALIASES.get(key))
    if canonical is None:
        raise InvalidRequestError("sampler", f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[canonical]


def find_schedule(name: str) -> str | None:
    """The schedule's label for an A1111 id, label or alias in any case (``sgm_uniform``, ``SGMUniform``
    → ``SGM Uniform``); None when A1111 has no such schedule."""
    return _SCHEDULE_NAMES.get(_key(name))


def schedule_label(name: str) -> str:
    """:func:`find_schedule`, or an error listing the schedule types."""
    label = find_schedule(name)
    if label is None:
        raise InvalidRequestError("schedule", f"unknown schedule type {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return label


def split_folded_schedule(sampler: str) -> tuple[str, str | None]:
    """A1111 before 1.9 folded the schedule into the sampler's name: "DPM++ 2M Karras" → ("DPM++ 2M",
    "Karras"). A name that is a sampler, or has no schedule suffix, comes back with None."""
    try:
        resolve_sampler(sampler)
        return sampler, None
    except InvalidRequestError:
        pass
    named = [(n, s.label) for s in SCHEDULES.values() if s.label != "Automatic" for n in (s.label, *s.aliases)]
    suffixes = sorted(named, key=lambda pair: -len(pair[0]))  # "SGM Uniform" before "Uniform"
    for suffix, label in suffixes:
        if sampler.lower().endswith(" " + suffix.lower()):
            base = sampler[: -len(suffix)].strip()
            try:
                resolve_sampler(base)
            except InvalidRequestError:
                continue
            return base, label
    return sampler, None


def resolve_schedule(sampler: Sampler, schedule: str) -> str:
    """The schedule type a request names, "Automatic" resolved to what A1111 would use: the infotext's label."""
    label = schedule_label(schedule)
    return sampler.automatic if label == "Automatic" else label


def runs_as(sampler: Sampler, schedule: str) -> str:
    """The schedule ``sampler`` actually runs for ``schedule``: itself where its scheduler class can,
    else Uniform, the nearest every class can (see the module's docstring)."""
    label = resolve_schedule(sampler, schedule)
    return label if SCHEDULES[label].needs & sampler.supports else "Uniform"


def build_scheduler(sampler: Sampler, schedule: str, base_config: dict, *, seed: int | None = None) -> "SchedulerMixin":
    """A fresh scheduler for one image: sampler options + schedule type on the model's training schedule.
    Call :func:`set_timesteps` on it, which also knows the schedules that are lists of noise levels."""
    import diffusers  # here, not at import: validating a request must not cost the seconds torch takes

    asked, ran = resolve_schedule(sampler, schedule), runs_as(sampler, schedule)
    if ran != asked:
        log.info("%s cannot run the %s schedule in diffusers; running %s, the nearest it can", sampler.name, asked, ran)
    options = {**sampler.options, **SCHEDULES[ran].options}
    if sampler.scheduler_class == "DPMSolverSDEScheduler" and seed is not None:
        # Its Brownian tree is seeded once per scheduler; one scheduler per image keeps seed+i exact.
        options["noise_sampler_seed"] = seed
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, sampler.scheduler_class).from_config({**config, **options})


def set_timesteps(
    scheduler: "SchedulerMixin", sampler: Sampler, schedule: str, steps: int, *, device: "torch.device | None" = None, family: str = "sd1"
) -> None:
    """Set ``steps`` timesteps on a scheduler from :func:`build_scheduler`: from its config, or for KL
    Optimal and Align Your Steps from their noise levels (``family`` picks the SD 1.5 or SDXL table)."""
    custom = SCHEDULES[runs_as(sampler, schedule)].sigmas
    if custom is None:
        scheduler.set_timesteps(steps, device=device)
        return
    alphas = scheduler.alphas_cumprod.double().cpu().numpy()
    trained = np.sqrt((1 - alphas) / alphas)  # noise level of each training timestep, rising
    sigmas = custom(steps, float(trained[0]), float(trained[-1]), family)
    if SIGMAS in sampler.supports:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        return
    # The timestep of each level (log sigma is nearly linear in t), rounded as DPM-Solver rounds them;
    # levels within one timestep of each other merge rather than repeat a timestep (a zero-length step).
    timesteps = np.interp(np.log(sigmas[:-1]), np.log(trained), np.arange(len(trained))).round()
    scheduler.set_timesteps(timesteps=sorted({int(t) for t in timesteps}, reverse=True), device=device)
