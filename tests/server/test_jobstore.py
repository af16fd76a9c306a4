"""The durable job store: requests stored losslessly, jobs that survive a reopen, another process and a
crash, the history's pages, and a database from a newer lienzo refused."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.gallery.records import GalleryError
from lienzo.generation.control_unit import ControlUnit
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.server.job import Job, JobNotFoundError, JobStatus, SavedImage
from lienzo.server.jobstore import JobStore, decode_request, encode_request
from lienzo.settings import Settings


def _picture(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels, so that any change to any pixel shows."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(axis=2) if bands == 1 else pixels, mode)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return (a.mode, a.size, a.tobytes()) == (b.mode, b.size, b.tobytes())


def _round_trip(request: GenerationRequest) -> GenerationRequest:
    back = decode_request(encode_request(request))
    for name in GenerationRequest.model_fields:
        assert getattr(back, name) == getattr(request, name), name
    assert back == request
    return back


def _job(job_id: str, **fields) -> Job:
    return Job(id=job_id, request=fields.pop("request", build_request(prompt=f"job {job_id}")), model=None, source="native", **fields)


# -- the request codec --------------------------------------------------------------------------------


def test_a_txt2img_request_with_seed_loras_and_hires_round_trips():
    request = build_request(
        prompt="a lighthouse <lora:glow:0.4>, {day|night}", negative_prompt="blurry", steps=31, sampler="euler a",
        schedule="karras", cfg_scale=6.5, seed=123456789, subseed=42, subseed_strength=0.25, width=640, height=448,
        batch_size=2, batch_count=3, loras=[("ink", -0.75), "paper"], enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
        hr_second_pass_steps=12, hr_denoising_strength=0.45, hr_sampler="DPM++ 2M", hr_schedule="exponential",
        hr_prompt="sharp", hr_negative_prompt="soft", refiner="xl-refiner", refiner_switch_at=0.65, clip_skip=2,
        styles=["film"], tiling=True, fast=True, watermark=False, safety="block", shift=3.0, distilled_cfg_scale=2.5,
    )
    back = _round_trip(request)
    assert back.seed == 123456789 and back.loras[0].weight == -0.75 and back.hr_scale == 1.5
    assert back.sampler == "Euler a" and back.hr_schedule == "Exponential"


def test_an_img2img_request_keeps_an_rgba_image_and_an_l_mask_pixel_for_pixel():
    init, mask = _picture("RGBA", (96, 72), 1), _picture("L", (96, 72), 2)
    request = build_request(prompt="repaint", init_image=init, mask=mask, denoising_strength=0.6, mask_blur=9, inpaint_only_masked=True)
    back = _round_trip(request)
    assert _same_pixels(back.init_image, init) and back.init_image.mode == "RGBA"
    assert _same_pixels(back.mask, mask) and back.mask.mode == "L"
    assert back.mode == "inpaint"


def test_controlnet_units_keep_their_pictures_and_their_none():
    picture = _picture("RGB", (80, 64), 3)
    units = [
        ControlUnit(image=picture, module="canny", model="control_canny", weight=0.8, guidance_end=0.9, threshold_a=50, threshold_b=150),
        ControlUnit(image=None, model="control_depth", control_mode="ControlNet is more important", pixel_perfect=True),
    ]
    request = build_request(prompt="a house", init_image=_picture("RGB", (80, 64), 4), controlnets=units)
    back = _round_trip(request)
    assert _same_pixels(back.controlnets[0].image, picture) and back.controlnets[1].image is None
    assert back.controlnets[0].module == "canny" and back.controlnets[1].pixel_perfect


def test_reference_images_round_trip():
    references = [_picture("RGB", (64, 96), 5), _picture("RGBA", (128, 64), 6)]
    back = _round_trip(build_request(prompt="the cat from the first, the hat from the second", reference_images=references))
    assert [image.mode for image in back.reference_images] == ["RGB", "RGBA"]
    assert all(_same_pixels(a, b) for a, b in zip(back.reference_images, references, strict=True))


def test_every_image_of_a_request_is_stored_as_png_wherever_it_sits():
    request = build_request(
        prompt="all of them", init_image=_picture("RGB", (64, 64), 7),
        reference_images=[_picture("RGB", (64, 64), 9), _picture("RGB", (64, 64), 10)],
        controlnets=[ControlUnit(image=_picture("RGB", (64, 64), 11), model="c"), ControlUnit(model="c")],
    )
    stored = json.loads(encode_request(request))

    def images(value) -> int:
        if isinstance(value, dict):
            return (set(value) == {"$png"}) + sum(images(item) for item in value.values())
        return sum(images(item) for item in value) if isinstance(value, list) else 0

    assert images(stored) == 4
    assert isinstance(stored["controlnets"][0]["image"]["$png"], str) and stored["controlnets"][1]["image"] is None


def test_an_image_field_the_codec_was_never_told_about_is_stored_too():
    class Sketched(GenerationRequest):
        sketch: Image.Image | None = None

    sketch = _picture("RGB", (64, 64), 12)
    stored = json.loads(encode_request(Sketched(prompt="x", sketch=sketch)))
    assert set(stored["sketch"]) == {"$png"}


def test_an_image_png_cannot_hold_exactly_is_refused_naming_where_it_is():
    request = build_request(prompt="x", reference_images=[_picture("RGB", (64, 64), 13), Image.new("CMYK", (64, 64))])
    with pytest.raises(InvalidRequestError) as err:
        encode_request(request)
    assert err.value.field == "reference_images.1" and "CMYK" in str(err.value)


# -- the store ----------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path / "jobs.db") as store:
        yield store


def test_a_job_is_added_updated_and_loaded_whole(store, tmp_path):
    request = build_request(prompt="a boat", seed=7, init_image=_picture("RGB", (64, 64), 14))
    job = _job("a1", request=request, owner="ana", priority=2, seq=5, fit_to_model=True, created=1000.5)
    job.model = "sdxl-base"
    store.add(job)

    job.status, job.started, job.finished, job.attempts, job.worker = JobStatus.DONE, 1001.0, 1009.25, 1, "cuda:0"
    job.model_name = "sdxl-base [abc]"
    job.images = [SavedImage(tmp_path / "out" / "1.png", 7, "a boat\nSteps: 20", {"seed": 7}, 1024, 768, "blurred", True, 3)]
    job.warnings, job.resize_to = ["1792x1024 is more than twice this model's side"], (1792, 1024)
    store.update(job)

    back = store.load("a1")
    assert back.request == request and _same_pixels(back.request.init_image, request.init_image)
    assert (back.id, back.model, back.source, back.owner, back.priority, back.seq, back.created) == ("a1", "sdxl-base", "native", "ana", 2, 5, 1000.5)
    assert (back.status, back.started, back.finished, back.attempts, back.worker) == (JobStatus.DONE, 1001.0, 1009.25, 1, "cuda:0")
    assert back.model_name == "sdxl-base [abc]" and back.fit_to_model is True
    assert back.images == job.images and isinstance(back.images[0].path, Path)
    assert back.warnings == job.warnings and back.resize_to == (1792, 1024)
    assert store.load("nope") is None


def test_a_failed_job_keeps_its_error_and_field(store):
    job = _job("f1")
    store.add(job)
    job.status, job.error, job.error_field = JobStatus.FAILED, "steps: must be 1 to 150", "steps"
    store.update(job)
    back = store.load("f1")
    assert (back.status, back.error, back.error_field, back.images, back.resize_to) == (JobStatus.FAILED, "steps: must be 1 to 150", "steps", [], None)


def test_an_error_echoing_a_lone_surrogate_is_stored_readable(store):
    job = _job("s1")
    store.add(job)
    job.status, job.error = JobStatus.FAILED, "unknown sampler '\ud800x'"
    store.update(job)
    assert store.load("s1").error == "unknown sampler '?x'"


def test_an_update_never_rewrites_the_request(store):
    job = _job("r1", request=build_request(prompt="first", width=512, height=512))
    store.add(job)
    job.request = build_request(prompt="second")
    job.status = JobStatus.RUNNING
    store.update(job)
    back = store.load("r1")
    assert back.request.prompt == "first" and back.status == JobStatus.RUNNING


def test_a_duplicate_id_and_an_unknown_job_are_refused(store):
    store.add(_job("d1"))
    with pytest.raises(sqlite3.IntegrityError):
        store.add(_job("d1"))
    with pytest.raises(JobNotFoundError):
        store.update(_job("never-added"))


def test_unfinished_jobs_come_back_by_seq(store):
    for job_id, seq, status in [("a", 3, JobStatus.QUEUED), ("b", 1, JobStatus.RUNNING), ("c", 2, JobStatus.DONE),
                                ("d", -4, JobStatus.QUEUED), ("e", 0, JobStatus.CANCELLED), ("f", 2, JobStatus.QUEUED)]:
        store.add(_job(job_id, seq=seq, status=status))
    assert [job.id for job in store.unfinished()] == ["d", "b", "f", "a"]


def test_seq_bounds(store):
    assert (store.min_seq(), store.max_seq()) == (0, 0)
    for job_id, seq in [("a", 4), ("b", -2), ("c", 9)]:
        store.add(_job(job_id, seq=seq))
    assert (store.min_seq(), store.max_seq()) == (-2, 9)


def test_counts_name_every_state(store):
    for job_id, status in [("a", JobStatus.QUEUED), ("b", JobStatus.QUEUED), ("c", JobStatus.DONE), ("d", JobStatus.FAILED)]:
        store.add(_job(job_id, status=status))
    assert store.counts() == {"queued": 2, "running": 0, "done": 1, "failed": 1, "cancelled": 0, "interrupted": 0}


def test_history_pages_newest_first_without_gaps_or_repeats(store):
    # Seven jobs, three of them created at the same instant: the id orders those.
    created = {"j1": 10.0, "j2": 20.0, "j3": 20.0, "j4": 20.0, "j5": 30.0, "j6": 40.0, "j7": 50.0}
    for job_id, when in created.items():
        store.add(_job(job_id, created=when))
    seen, cursor, pages = [], None, 0
    while True:
        jobs, cursor = store.history(cursor=cursor, limit=3)
        seen += [job.id for job in jobs]
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert seen == ["j7", "j6", "j5", "j4", "j3", "j2", "j1"]


def test_history_filters_by_state_and_owner(store):
    for job_id, owner, status, when in [("a", "ana", JobStatus.DONE, 1.0), ("b", "bo", JobStatus.DONE, 2.0),
                                        ("c", "ana", JobStatus.FAILED, 3.0), ("d", "ana", JobStatus.DONE, 4.0), ("e", None, JobStatus.DONE, 5.0)]:
        store.add(_job(job_id, owner=owner, status=status, created=when))
    assert [job.id for job in store.history(owner="ana")[0]] == ["d", "c", "a"]
    assert [job.id for job in store.history(state="done")[0]] == ["e", "d", "b", "a"]
    first, cursor = store.history(state="done", owner="ana", limit=1)
    assert [job.id for job in first] == ["d"]
    rest, last = store.history(state="done", owner="ana", cursor=cursor, limit=1)
    assert [job.id for job in rest] == ["a"] and last is None


@pytest.mark.parametrize("cursor", ["not a cursor", "WzEsMl0=", "bnVsbA==", "é"])
def test_a_malformed_cursor_is_refused_naming_cursor(store, cursor):
    with pytest.raises(InvalidRequestError) as err:
        store.history(cursor=cursor)
    assert err.value.field == "cursor"


def test_a_bad_state_or_limit_is_refused_naming_it(store):
    with pytest.raises(InvalidRequestError) as err:
        store.history(state="finished")
    assert err.value.field == "state" and "queued" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        store.history(limit=0)
    assert err.value.field == "limit"


def test_flags_are_set_replaced_and_removed(store):
    assert store.flag("paused") is None
    store.set_flag("paused", "1")
    store.set_flag("paused", "yes")
    assert store.flag("paused") == "yes"
    store.set_flag("paused", None)
    assert store.flag("paused") is None


def test_the_database_is_in_wal_mode_and_syncs_every_commit(store):
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_reopened_store_has_everything(tmp_path):
    path = tmp_path / "jobs.db"
    with JobStore(path) as store:
        store.add(_job("a", seq=1, request=build_request(prompt="kept", mask=_picture("L", (64, 64), 15), init_image=_picture("RGB", (64, 64), 16))))
        store.add(_job("b", seq=2, status=JobStatus.DONE))
        store.set_flag("paused", "1")
    with JobStore(path) as store:
        assert [job.id for job in store.unfinished()] == ["a"]
        assert store.load("a").request.mode == "inpaint" and store.load("b").status == JobStatus.DONE
        assert store.flag("paused") == "1"
        store.close()
        assert store.load("b") is not None  # used after close: reopened


def test_for_settings_opens_the_settings_jobs_db(tmp_path):
    settings = Settings(data_dir=tmp_path / "data" / "lienzo")
    with JobStore.for_settings(settings) as store:
        store.add(_job("x"))
    assert settings.jobs_db.is_file()


def test_two_stores_on_one_file_see_each_others_jobs(tmp_path):
    with JobStore(tmp_path / "jobs.db") as one, JobStore(tmp_path / "jobs.db") as two:
        assert two.load("a") is None
        one.add(_job("a"))
        job = two.load("a")
        assert job is not None
        job.status = JobStatus.RUNNING
        two.update(job)
        assert one.load("a").status == JobStatus.RUNNING


@pytest.mark.parametrize("death", ["os._exit(0)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_a_job_added_just_before_a_crash_is_there_afterwards(tmp_path, death):
    path = tmp_path / "jobs.db"
    script = (
        "import os, signal, sys\n"
        "from lienzo.generation.request import build_request\n"
        "from lienzo.server.job import Job\n"
        "from lienzo.server.jobstore import JobStore\n"
        "store = JobStore(sys.argv[1])\n"
        "store.add(Job(id='crash', request=build_request(prompt='survive', seed=99), model=None, source='native', seq=3))\n"
        f"{death}\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, -9), result.stderr
    assert Path(f"{path}-wal").exists()  # never checkpointed: the job is in the log the process left behind
    with JobStore(path) as store:
        job = store.load("crash")
    assert (job.request.prompt, job.request.seed, job.seq, job.status) == ("survive", 99, 3, JobStatus.QUEUED)


def test_a_database_from_a_newer_lienzo_is_refused(tmp_path):
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(GalleryError, match=r"schema version 99, newer than this lienzo's 1"):
        JobStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
