"""Schedule types: every one AUTOMATIC1111 1.10 lists is accepted by every door, runs the noise levels
it names where diffusers can (the nearest where it cannot), and comes back from the infotext."""

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lienzo.generation import engine
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import build_request
from lienzo.generation.samplers import (
    SAMPLERS,
    SCHEDULES,
    build_scheduler,
    resolve_sampler,
    resolve_schedule,
    runs_as,
    set_timesteps,
    split_folded_schedule,
)
from lienzo.images.metadata import format_infotext, parse_infotext
from lienzo.models.single_file_layout import scheduler_config_for
from lienzo.server.app import create_app
from lienzo.server.routes.a1111.translate import sampler_and_schedule
from lienzo.settings import Settings
from tiny_models import build_tiny

# AUTOMATIC1111 1.10's modules/sd_schedulers.py: id -> (label, aliases).
A1111_SCHEDULERS = {
    "automatic": ("Automatic", []), "uniform": ("Uniform", []), "karras": ("Karras", []),
    "exponential": ("Exponential", []), "polyexponential": ("Polyexponential", []),
    "sgm_uniform": ("SGM Uniform", ["SGMUniform"]), "kl_optimal": ("KL Optimal", []),
    "align_your_steps": ("Align Your Steps", []), "simple": ("Simple", []), "normal": ("Normal", []),
    "ddim": ("DDIM", []), "beta": ("Beta", []),
}
SPELLINGS = [
    (spelling, label)
    for name, (label, aliases) in A1111_SCHEDULERS.items()
    for written in (name, label, *aliases)
    for spelling in (written, written.lower(), written.upper())
]
BASE = scheduler_config_for("epsilon")
SIGMA_MIN, SIGMA_MAX = 0.029167, 14.614641  # SD's training noise levels at t = 0 and t = 999


def _sigmas(sampler: str, schedule: str, steps: int = 20, family: str = "sd1") -> np.ndarray:
    s = resolve_sampler(sampler)
    scheduler = build_scheduler(s, schedule, BASE)
    set_timesteps(scheduler, s, schedule, steps, family=family)
    return scheduler.sigmas.numpy().astype(np.float64)


def _timesteps(sampler: str, schedule: str, steps: int = 20) -> list[float]:
    s = resolve_sampler(sampler)
    scheduler = build_scheduler(s, schedule, BASE)
    set_timesteps(scheduler, s, schedule, steps)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize(("spelling", "label"), SPELLINGS)
def test_every_a1111_id_label_and_alias_in_any_case_is_accepted(spelling, label):
    assert build_request(schedule=spelling).schedule == label
    assert sampler_and_schedule("Euler a", spelling) == ("Euler a", label)


def test_every_sampler_takes_every_schedule_and_runs_one_it_can():
    for sampler in SAMPLERS.values():
        for label in SCHEDULES:
            asked, ran = resolve_schedule(sampler, label), runs_as(sampler, label)
            # Uniform is the nearest of every schedule a class cannot run (see samplers.py's docstring).
            assert ran == (asked if asked in sampler.schedules else "Uniform"), (sampler.name, label)


def test_old_folded_sampler_names_split_with_aliases_too():
    assert split_folded_schedule("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_folded_schedule("DPM++ 2M SGMUniform") == ("DPM++ 2M", "SGM Uniform")
    assert split_folded_schedule("Euler a Align Your Steps") == ("Euler a", "Align Your Steps")
    assert split_folded_schedule("DPM++ 2M SDE") == ("DPM++ 2M SDE", None)
    assert sampler_and_schedule("DPM++ 2M Exponential", "beta") == ("DPM++ 2M", "Beta")  # the explicit one wins


def test_declared_capabilities_match_the_diffusers_classes():
    """The table is data, so lienzo can validate without diffusers; this keeps it honest."""
    import inspect

    import diffusers

    for sampler in SAMPLERS.values():
        cls = getattr(diffusers, sampler.scheduler_class)
        init = inspect.signature(cls.__init__).parameters
        step = inspect.signature(cls.set_timesteps).parameters
        assert ("sigma kinds" in sampler.supports) == ("use_karras_sigmas" in init), sampler.name
        assert ("spacing" in sampler.supports) == ("timestep_spacing" in inspect.getsource(cls.set_timesteps)), sampler.name
        assert "timesteps" not in sampler.supports or "timesteps" in step, sampler.name
        assert "sigmas" not in sampler.supports or "sigmas" in step, sampler.name


def test_each_schedule_runs_its_own_noise_levels():
    runs = {label: _sigmas("Euler", label) for label in SCHEDULES if label != "Automatic"}
    # A1111's normal and uniform are the same levels; so are polyexponential (rho 1) and exponential,
    # and diffusers' trailing spacing serves simple and sgm_uniform alike.
    same = [("Normal", "Uniform"), ("Polyexponential", "Exponential"), ("Simple", "SGM Uniform")]
    for a, b in same:
        assert np.allclose(runs.pop(a), runs[b]), (a, b)
    labels = list(runs)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert runs[a].shape != runs[b].shape or not np.allclose(runs[a], runs[b], rtol=1e-3), (a, b)


def test_noise_levels_are_a1111s():
    n = 20
    karras = _sigmas("DPM++ 2M", "karras", n)
    ramp = np.linspace(0, 1, n)
    expected = (SIGMA_MAX ** (1 / 7) + ramp * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
    assert np.allclose(karras[:-1], expected, rtol=1e-4) and karras[-1] == 0
    assert np.allclose(_sigmas("Euler", "exponential", n)[:-1], np.geomspace(SIGMA_MAX, SIGMA_MIN, n), rtol=1e-4)
    angles = np.linspace(math.atan(SIGMA_MAX), math.atan(SIGMA_MIN), n + 1)
    assert np.allclose(_sigmas("Euler", "kl_optimal", n), np.tan(angles), rtol=1e-4)  # ends at sigma_min, as A1111
    # At 11 steps A1111 runs NVIDIA's 10 levels and sigma_min as they are, then 0.
    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, SIGMA_MIN, 0.0]
    assert np.allclose(_sigmas("Euler", "align_your_steps", 11), ays, rtol=1e-3)
    assert _sigmas("Euler", "align_your_steps", 11, family="sdxl")[1] == pytest.approx(6.315, rel=1e-3)
    assert _timesteps("Euler", "uniform", n) == pytest.approx(np.linspace(999, 0, n))
    assert _timesteps("Euler a", "normal", n) == pytest.approx(np.linspace(999, 0, n))
    assert _timesteps("DDIM", "ddim", n) == [1 + 50 * k for k in reversed(range(n))]
    assert _timesteps("Euler", "sgm_uniform", 4) == [999, 749, 499, 249]


def test_lists_of_levels_run_as_timesteps_where_a_class_takes_no_sigmas():
    ays = _sigmas("DPM++ 2M", "align_your_steps", 11)
    assert np.allclose(ays[:-1], [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, SIGMA_MIN], rtol=0.05)
    assert len(_timesteps("DPM++ 2M", "kl_optimal", 150)) == 150
    timesteps = _timesteps("DPM++ 2M", "align_your_steps", 150)  # its lowest levels are under one timestep apart: they merge
    assert timesteps == sorted(set(timesteps), reverse=True) and 140 <= len(timesteps) < 150


def test_a_schedule_a_class_cannot_run_runs_as_the_nearest():
    assert runs_as(resolve_sampler("Euler a"), "Karras") == "Uniform"
    assert np.allclose(_sigmas("Euler a", "karras"), _sigmas("Euler a", "uniform"))
    assert runs_as(resolve_sampler("DPM++ SDE"), "KL Optimal") == "Uniform"
    assert runs_as(resolve_sampler("DPM++ 2M"), "Automatic") == "Karras"
    assert runs_as(resolve_sampler("DDIM"), "Automatic") == "DDIM"


@pytest.mark.parametrize("label", list(SCHEDULES))
def test_every_schedule_round_trips_through_the_infotext(label):
    request = build_request(prompt="a fox", sampler="Euler", schedule=label)
    written = resolve_schedule(resolve_sampler(request.sampler), request.schedule)
    infotext = format_infotext(request.prompt, "", {"Steps": 20, "Sampler": request.sampler, "Schedule type": written, "Seed": 1})
    remade = build_request(**{k: v for k, v in fields_from_infotext(parse_infotext(infotext)).items() if k != "model"})
    assert remade.schedule == (written if label == "Automatic" else label)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.mark.parametrize(("sampler", "schedule"), [("Euler a", "karras"), ("Euler", "Align Your Steps"), ("DPM++ 2M", "kl_optimal")])
def test_generation_writes_the_schedule_asked_for(sd1, sampler, schedule):
    request = build_request(prompt="a fox", sampler=sampler, schedule=schedule, steps=3, width=64, height=64, seed=2)
    image = engine.generate(sd1, request).images[0]
    assert np.isfinite(image.pixels).all()
    assert parse_infotext(image.infotext).params["Schedule type"] == request.schedule


@pytest.fixture(scope="module")
def client(home, tmp_path_factory):
    data = tmp_path_factory.mktemp("schedules-data")
    settings = Settings(data_dir=data, models_dir=home / "models", outputs_dir=data / "out", default_model="tiny-sd15")
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_schedulers_route_lists_every_a1111_scheduler_in_its_shape(client):
    listed = {s["name"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert set(listed) == set(A1111_SCHEDULERS)
    for name, (label, aliases) in A1111_SCHEDULERS.items():
        item = listed[name]
        assert set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
        assert item["label"] == label and (item["aliases"] or []) == aliases
    assert listed["karras"]["default_rho"] == 7.0 and listed["polyexponential"]["default_rho"] == 1.0
    assert listed["uniform"]["need_inner_model"] is True and listed["karras"]["need_inner_model"] is False


@pytest.mark.parametrize(
    "body",
    [
        # SillyTavern's default AUTOMATIC1111 request.
        {"prompt": "a lighthouse", "sampler_name": "DDIM", "scheduler": "normal", "steps": 2, "width": 64, "height": 64},
        {"prompt": "a lighthouse", "sampler_name": "Euler a", "scheduler": "karras", "steps": 2, "width": 64, "height": 64},
        {"prompt": "a lighthouse", "sampler_name": "Euler", "scheduler": "simple", "steps": 2, "width": 64, "height": 64},
    ],
)
def test_a1111_clients_schedules_generate(client, body):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    info = json.loads(r.json()["info"])
    label = A1111_SCHEDULERS[body["scheduler"]][0]
    assert info["extra_generation_params"]["Schedule type"] == label
    assert parse_infotext(info["infotexts"][0]).params["Schedule type"] == label


def test_an_unknown_schedule_is_still_refused(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "scheduler": "karas", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 422
    assert r.json()["field"] == "scheduler" and "unknown schedule type 'karas'; choose one of: Automatic" in r.json()["detail"]
