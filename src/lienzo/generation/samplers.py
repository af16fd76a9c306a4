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

Flow-matching models (SD 3.x, Flux.1; :func:`is_flow` tells them by their scheduler config) predict a
velocity along noise levels sigma = t from 1 to 0, shifted towards high noise: by a fixed ``shift``
(SD 3), or by Flux's ``mu``, which grows with the image's size (:func:`flux_mu`). The same names run
them on diffusers' flow schedulers (``Sampler.flow``), built on the model's config as above:

============  ==========================================================================================
sampler       on a flow model
============  ==========================================================================================
Euler         ``FlowMatchEulerDiscreteScheduler``: what diffusers' SD 3 and Flux pipelines run
Euler a       the same with ``stochastic_sampling``, diffusers' only flow ancestral: each step predicts
              the clean image and noises it afresh to the next level. It is LCM's step, and more noise
              than k-diffusion's Euler a on flow models (eta 1 keeps part of the deterministic step)
Heun          ``FlowMatchHeunDiscreteScheduler``; it has no dynamic shifting, so on Flux ``exp(mu)`` is
              its fixed shift, the same curve (diffusers' DPM-Solver does the same)
DPM++ 2M,     ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``, ``prediction_type="flow_prediction"``
DPM++ 2M SDE  and the model's shift as ``flow_shift`` (Flux: ``mu``, dynamic shifting, as its pipeline)
UniPC         ``UniPCMultistepScheduler``, likewise
LCM           ``FlowMatchLCMScheduler``, for models distilled to it
============  ==========================================================================================

LMS, DPM2, DPM2 a, DPM++ SDE, DDIM and PLMS have no flow form in diffusers: a flow model refuses them
(:func:`flow_samplers` lists those it runs). Schedules on a flow model are levels of unshifted time t,
which the scheduler then shifts, under ComfyUI's and Forge's names. sigma_min, the lowest training
level, is t = 0.001 on Flux; on SD 3 it is that shifted once more (diffusers shifts a fixed-shift
model's training levels before it shifts the schedule).

==================  ====================================================================================
schedule            on a flow model
==================  ====================================================================================
Automatic           Simple
Simple              the family's diffusers pipeline, bit for bit: Flux passes t = 1, 1 - 1/n, ... 1/n
                    (ComfyUI's simple), SD 3 calls ``set_timesteps(n)``: Normal's levels. On Flux, DPM++
                    and UniPC run their own flow levels, as FluxPipeline does (Simple's within 0.001 of
                    t); on SD 3 they cannot run Normal's and run their own, SGM Uniform's, as its pipeline
Normal, Uniform     the scheduler's own ``set_timesteps(n)``: n levels of t from 1 to sigma_min (ComfyUI's
                    normal); on Flux it ends near 0, where Simple ends at 1/n
SGM Uniform         Normal's range in n + 1 levels, less the last (ComfyUI's sgm_uniform): Flux's Simple
                    within 0.001; DPM++ and UniPC run their own flow levels, the same within 0.003
Karras,             ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` between
Exponential,        Normal's first and last shifted levels: on Euler, Euler a and LCM only (DPM-Solver's
Polyexponential,    and UniPC's would take SD's noise levels, not the flow's)
Beta
DDIM, KL Optimal,   Simple: diffusers has no flow form of them (DDIM's leading spacing is Simple's levels
Align Your Steps    one step lower; the other two are a formula and tables for SD's noise levels)
==================  ====================================================================================

Any other schedule a flow sampler cannot run runs as Simple, and where it cannot run Simple's levels
either, as its own: Heun on Flux (it takes no list of levels) as Normal, DPM++ and UniPC on SD 3 as
SGM Uniform (:func:`runs_as`, given the model's config).
"""

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lienzo.errors import InvalidRequestError
from lienzo.models.families import FAMILIES

if TYPE_CHECKING:
    import torch
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger(__name__)

# What a diffusers scheduler class can be told about its schedule (Sampler.supports):
SPACING = "spacing"  # timestep_spacing "linspace" / "leading" / "trailing"
SIGMA_KINDS = "sigma kinds"  # use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
SIGMAS = "sigmas"  # set_timesteps(sigmas=[...]): any list of noise levels
TIMESTEPS = "timesteps"  # set_timesteps(timesteps=[...]): any list of training timesteps

# Only flow schedulers (Sampler.flow): which levels of unshifted t their own ``set_timesteps(n)`` runs.
OWN_LINSPACE = "own linspace"  # n levels from t = 1 to sigma_min: Normal
OWN_TRAILING = "own trailing"  # flow sigmas, n + 1 levels from t = 1 to about 0, less the last: SGM Uniform

_KINDS = frozenset({SPACING, SIGMA_KINDS})


@dataclass(frozen=True)
class FlowVariant:
    """How a sampler runs on a flow-matching model: the diffusers class, its options, and what it can
    be told of the schedule (as ``Sampler.supports``; ``sigmas`` are levels of t before the shift)."""

    scheduler_class: str
    supports: frozenset[str]
    options: dict = field(default_factory=dict)

    @property
    def shift_key(self) -> str:
        """The config key the model's fixed shift goes to: DPM-Solver and UniPC call it ``flow_shift``."""
        return "flow_shift" if self.options.get("use_flow_sigmas") else "shift"


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
    flow: FlowVariant | None = None  # on flow-matching models; None: they refuse it

    @property
    def schedules(self) -> list[str]:
        """Schedule types this scheduler runs as asked; any other runs as its nearest (:func:`runs_as`)."""
        return [label for label, s in SCHEDULES.items() if label == "Automatic" or s.needs & self.supports]

    def schedules_on(self, config: Mapping | None = None) -> list[str]:
        """:attr:`schedules` on the model whose scheduler config this is: for a flow model, those its flow
        variant runs as asked (none where it has none)."""
        if not is_flow(config):
            return self.schedules
        if self.flow is None:
            return []
        return [label for label in SCHEDULES if label == "Automatic" or runs_as(self, label, config) == label]


# The flow variants' shared parts: FlowMatch Euler and LCM take every kind of list; the multistep
# solvers run flow sigmas of their own, integrating the velocity as a prediction of the flow.
_FLOW_MATCH = frozenset({SIGMAS, SIGMA_KINDS, OWN_LINSPACE})
_FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler(
            "Euler a", "EulerAncestralDiscreteScheduler", frozenset({SPACING}), stochastic=True,
            paper="Karras et al. 2022 (ancestral)",
            flow=FlowVariant("FlowMatchEulerDiscreteScheduler", _FLOW_MATCH, {"stochastic_sampling": True}),
        ),
        Sampler(
            "Euler", "EulerDiscreteScheduler", _KINDS | {SIGMAS, TIMESTEPS}, paper="Karras et al. 2022, Algorithm 2 (first order)",
            flow=FlowVariant("FlowMatchEulerDiscreteScheduler", _FLOW_MATCH),
        ),
        Sampler("LMS", "LMSDiscreteScheduler", _KINDS, paper="linear multistep, Karras et al. 2022"),
        Sampler(
            "Heun", "HeunDiscreteScheduler", _KINDS | {TIMESTEPS}, paper="Karras et al. 2022, Algorithm 2",
            flow=FlowVariant("FlowMatchHeunDiscreteScheduler", frozenset({OWN_LINSPACE})),
        ),
        Sampler("DPM2", "KDPM2DiscreteScheduler", _KINDS, automatic="Karras", paper="Karras et al. 2022 (DPM-Solver-2)"),
        Sampler(
            "DPM2 a", "KDPM2AncestralDiscreteScheduler", _KINDS, automatic="Karras", stochastic=True,
            paper="Karras et al. 2022 (DPM-Solver-2, ancestral)",
        ),
        Sampler(
            "DPM++ 2M", "DPMSolverMultistepScheduler", _KINDS | {TIMESTEPS}, _DPMPP_2M,
            automatic="Karras", paper="Lu et al. 2022, DPM-Solver++ (2M)",
            flow=FlowVariant("DPMSolverMultistepScheduler", frozenset({OWN_TRAILING}), {**_DPMPP_2M, **_FLOW_SIGMAS}),
        ),
        Sampler(
            "DPM++ 2M SDE", "DPMSolverMultistepScheduler", _KINDS | {TIMESTEPS}, _DPMPP_2M_SDE, automatic="Karras", stochastic=True,
            paper="Lu et al. 2022, DPM-Solver++ (2M SDE)",
            flow=FlowVariant("DPMSolverMultistepScheduler", frozenset({OWN_TRAILING}), {**_DPMPP_2M_SDE, **_FLOW_SIGMAS}),
        ),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", _KINDS, automatic="Karras", stochastic=True, paper="Lu et al. 2022"),
        # A1111 runs DDIM, PLMS and UniPC at timesteps 1, 1 + 1000 // steps, ...: the DDIM schedule.
        Sampler("DDIM", "DDIMScheduler", frozenset({SPACING}), automatic="DDIM", paper="Song et al. 2020, DDIM"),
        Sampler(
            "PLMS", "PNDMScheduler", frozenset({SPACING}), {"skip_prk_steps": True}, automatic="DDIM", paper="Liu et al. 2022, PNDM"
        ),
        Sampler(
            "UniPC", "UniPCMultistepScheduler", _KINDS, automatic="DDIM", paper="Zhao et al. 2023, UniPC",
            # UniPC would take a list of levels too, but the pipelines run its own flow sigmas (FluxPipeline drops its list).
            flow=FlowVariant("UniPCMultistepScheduler", frozenset({OWN_TRAILING}), _FLOW_SIGMAS),
        ),
        Sampler(
            "LCM", "LCMScheduler", frozenset(), stochastic=True, paper="Luo et al. 2023, Latent Consistency Models",
            flow=FlowVariant("FlowMatchLCMScheduler", _FLOW_MATCH),
        ),
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
    table = AysSchedules["StableDiffusionXLSigmas" if family in ("sdxl", "sdxl_refiner") else "StableDiffusionSigmas"][:-1] + [sigma_min]
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
    # On flow models: any one of these capabilities of a FlowVariant runs it as asked; none, it runs as Simple.
    flow_needs: frozenset[str] = frozenset()


_LINSPACE = {"timestep_spacing": "linspace"}  # the sigma kinds span sigma_max..sigma_min of t = 999..0
_CUSTOM = frozenset({SIGMAS, TIMESTEPS})
_FLOW_KINDS = frozenset({SIGMA_KINDS})
_FLOW_NORMAL = frozenset({OWN_LINSPACE})
# A list of levels, or flow sigmas of the scheduler's own: the same within 0.003 of t.
_FLOW_TRAILING = frozenset({SIGMAS, OWN_TRAILING})

SCHEDULES: dict[str, Schedule] = {
    s.label: s
    for s in (
        Schedule("Automatic", "automatic"),
        Schedule(
            "Uniform", "uniform", need_inner_model=True, needs=frozenset({SPACING}), options=_LINSPACE, flow_needs=_FLOW_NORMAL
        ),
        Schedule(
            "Karras", "karras", default_rho=7.0, needs=frozenset({SIGMA_KINDS}), options={"use_karras_sigmas": True, **_LINSPACE},
            flow_needs=_FLOW_KINDS,
        ),
        Schedule(
            "Exponential", "exponential", needs=frozenset({SIGMA_KINDS}), options={"use_exponential_sigmas": True, **_LINSPACE},
            flow_needs=_FLOW_KINDS,
        ),
        Schedule(
            "Polyexponential", "polyexponential", default_rho=1.0, needs=frozenset({SIGMA_KINDS}),
            options={"use_exponential_sigmas": True, **_LINSPACE}, flow_needs=_FLOW_KINDS,
        ),
        Schedule(
            "SGM Uniform", "sgm_uniform", ("SGMUniform",), need_inner_model=True, needs=frozenset({SPACING}),
            options={"timestep_spacing": "trailing"}, flow_needs=_FLOW_TRAILING,
        ),
        Schedule("KL Optimal", "kl_optimal", needs=_CUSTOM, sigmas=_kl_optimal),
        Schedule("Align Your Steps", "align_your_steps", needs=_CUSTOM, sigmas=_align_your_steps),
        # On flow models with a fixed shift (SD 3) Simple is Normal's levels: the pipeline calls set_timesteps(n).
        Schedule(
            "Simple", "simple", need_inner_model=True, needs=frozenset({SPACING}), options={"timestep_spacing": "trailing"},
            flow_needs=_FLOW_TRAILING,
        ),
        Schedule("Normal", "normal", need_inner_model=True, needs=frozenset({SPACING}), options=_LINSPACE, flow_needs=_FLOW_NORMAL),
        Schedule(
            "DDIM", "ddim", need_inner_model=True, needs=frozenset({SPACING}), options={"timestep_spacing": "leading", "steps_offset": 1}
        ),
        Schedule(
            "Beta", "beta", need_inner_model=True, needs=frozenset({SIGMA_KINDS}), options={"use_beta_sigmas": True, **_LINSPACE},
            flow_needs=_FLOW_KINDS,
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


def is_flow(config: Mapping | None) -> bool:
    """Whether a model's scheduler config is a flow-matching one (SD 3.x, Flux.1): diffusers' FlowMatch
    classes, or the flow sigmas of DPM-Solver and UniPC. A model's ``shift`` alone does not say it."""
    if not config:
        return False
    return str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))


def flow_samplers() -> list[str]:
    """The samplers that run on flow-matching models, in the table's order."""
    return [s.name for s in SAMPLERS.values() if s.flow is not None]


def flux_mu(image_seq_len: int, config: Mapping) -> float:
    """Flux's dynamic shift for an image of ``image_seq_len`` 2x2 latent patches ((h / 2) * (w / 2) of
    the latents), from the scheduler config's sequence lengths and shifts, as FluxPipeline computes it."""
    # Here, not at import: the pipeline's module imports transformers.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FluxPipeline's defaults for a config that lacks them (SD 3's pipeline has max_shift 1.16).
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def _flow_variant(sampler: Sampler) -> FlowVariant:
    if sampler.flow is None:
        raise InvalidRequestError(
            "sampler",
            f"{sampler.name} does not run on flow-matching models (SD 3.x, Flux.1); choose one of: {', '.join(flow_samplers())}",
        )
    return sampler.flow


def resolve_schedule(sampler: Sampler, schedule: str, config: Mapping | None = None) -> str:
    """The schedule type a request names, "Automatic" resolved to what A1111 would use: the infotext's label.
    On a flow model (``config``, the model's scheduler config) "Automatic" is Simple, the family's own."""
    label = schedule_label(schedule)
    if label != "Automatic":
        return label
    return "Simple" if is_flow(config) else sampler.automatic


def runs_as(sampler: Sampler, schedule: str, config: Mapping | None = None) -> str:
    """The schedule ``sampler`` actually runs for ``schedule``: itself where its scheduler class can,
    else Uniform, the nearest every class can (see the module's docstring). On a flow model (``config``)
    the nearest is Simple, or for a class that takes no levels on Flux, Normal; a sampler with no flow
    variant raises InvalidRequestError."""
    label = resolve_schedule(sampler, schedule, config)
    if not is_flow(config):
        return label if SCHEDULES[label].needs & sampler.supports else "Uniform"
    supports = _flow_variant(sampler).supports
    dynamic = bool(config.get("use_dynamic_shifting"))
    for candidate in (label, "Simple"):
        if _flow_needs(candidate, dynamic) & supports:
            return candidate
    # Simple's levels are beyond it (Heun on Flux; DPM++ and UniPC on SD 3): it runs its own.
    return "Normal" if OWN_LINSPACE in supports else "SGM Uniform"


def _flow_needs(label: str, dynamic: bool) -> frozenset[str]:
    # Simple is the family's pipeline: Flux's list of levels, or SD 3's set_timesteps(n), Normal's levels.
    return _FLOW_NORMAL if label == "Simple" and not dynamic else SCHEDULES[label].flow_needs


def build_scheduler(sampler: Sampler, schedule: str, base_config: dict, *, seed: int | None = None) -> "SchedulerMixin":
    """A fresh scheduler for one image: sampler options + schedule type on the model's training schedule.
    Call :func:`set_timesteps` on it, which also knows the schedules that are lists of noise levels."""
    import diffusers  # here, not at import: validating a request must not cost the seconds torch takes

    asked, ran = resolve_schedule(sampler, schedule, base_config), runs_as(sampler, schedule, base_config)
    if ran != asked:
        log.info("%s cannot run the %s schedule in diffusers; running %s, the nearest it can", sampler.name, asked, ran)
    if is_flow(base_config):
        variant = _flow_variant(sampler)
        return _build_flow(getattr(diffusers, variant.scheduler_class), variant, ran, base_config)
    options = {**sampler.options, **SCHEDULES[ran].options}
    if sampler.scheduler_class == "DPMSolverSDEScheduler" and seed is not None:
        # Its Brownian tree is seeded once per scheduler; one scheduler per image keeps seed+i exact.
        options["noise_sampler_seed"] = seed
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, sampler.scheduler_class).from_config({**config, **options})


def _build_flow(cls: type, variant: FlowVariant, ran: str, base_config: Mapping) -> "SchedulerMixin":
    """A flow scheduler: the variant's options, the model's shift, and the schedule's sigma kind."""
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    options = dict(variant.options)
    if SCHEDULES[ran].flow_needs == _FLOW_KINDS:
        # Only the kind: SD's timestep spacing means nothing to these classes.
        options.update({k: v for k, v in SCHEDULES[ran].options.items() if k.startswith("use_")})
    if variant.shift_key != "shift":
        options[variant.shift_key] = config.get("shift", 1.0)
    mu_as_shift = config.get("use_dynamic_shifting") and "use_dynamic_shifting" not in accepted
    if mu_as_shift:
        # FlowMatch Heun has no dynamic shifting: set_timesteps gives it mu's shift as a fixed one. Built
        # unshifted, its lowest level is t = 0.001, as FlowMatch Euler's is with dynamic shifting.
        options["shift"] = 1.0
    # Only what the class takes: from_config warns of every other key, on every image.
    scheduler = cls.from_config({k: v for k, v in {**config, **options}.items() if k in accepted})
    if mu_as_shift:
        # Kept in its config, so that set_timesteps asks for mu as for the other classes.
        scheduler.register_to_config(use_dynamic_shifting=True, time_shift_type=config.get("time_shift_type", "exponential"))
    return scheduler


def _set_flow_timesteps(
    scheduler: "SchedulerMixin", variant: FlowVariant, ran: str, steps: int, device, mu: float | None, even: bool
) -> None:
    """A flow scheduler's levels for the schedule it runs, called as the family's diffusers pipeline calls it
    (``even``: it asks for levels evenly spaced from 1 to 1 / steps even at a fixed shift, as Z-Image's does)."""
    config = scheduler.config
    kwargs: dict = {"device": device}
    dynamic = bool(config.get("use_dynamic_shifting"))
    if dynamic:
        if mu is None:
            raise ValueError(f"{type(scheduler).__name__} shifts by the image's size (Flux): pass mu, see flux_mu()")
        if "mu" in inspect.signature(scheduler.set_timesteps).parameters:
            kwargs["mu"] = mu
        else:
            # Shifting by mu is a fixed shift of exp(mu) ("exponential"), or mu ("linear"): the same curve.
            scheduler.register_to_config(shift=mu if config.get("time_shift_type") == "linear" else math.exp(mu))
    levels = None
    if SIGMAS in variant.supports:
        if ran == "Simple" and (dynamic or even):
            levels = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's (and ZImagePipeline's), to the bit
        elif ran == "SGM Uniform":
            levels = np.linspace(scheduler.sigma_max, scheduler.sigma_min, steps + 1)[:-1]
    if levels is None:
        scheduler.set_timesteps(steps, **kwargs)
    else:
        scheduler.set_timesteps(sigmas=levels, **kwargs)


def set_timesteps(
    scheduler: "SchedulerMixin",
    sampler: Sampler,
    schedule: str,
    steps: int,
    *,
    device: "torch.device | None" = None,
    family: str = "sd1",
    mu: float | None = None,
) -> None:
    """Set ``steps`` timesteps on a scheduler from :func:`build_scheduler`: from its config, or for KL
    Optimal and Align Your Steps from their noise levels (``family`` picks the SD 1.5 or SDXL table).
    A flow scheduler with dynamic shifting (Flux) needs ``mu``, :func:`flux_mu` of the image's size."""
    # A scheduler's config has no _class_name: its class says whether it is a flow one.
    config = {"_class_name": type(scheduler).__name__, **scheduler.config}
    if is_flow(config):
        variant = _flow_variant(sampler)
        even = FAMILIES[family].even_sigmas
        _set_flow_timesteps(scheduler, variant, runs_as(sampler, schedule, config), steps, device, mu, even)
        return
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
