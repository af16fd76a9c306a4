"""Flux.2 Klein's reference images through every door: the command line (``--reference``, and ``--from``,
which needs the same pictures again), lienzo's own API (base64 list), OpenAI's edits (several images and no
mask on a model that reads references) and what the studio reads to offer them. AUTOMATIC1111's API has no
field for them. Tiny models as diffusers folders in a models dir."""

import base64
import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.generation.fields import image_hash
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.server.app import create_app
from lienzo.settings import Settings
from servers import b64_png, png_bytes
from tiny_models import build_tiny, save_diffusers_folder

FAST = {"prompt": "make the apple blue", "steps": 2, "cfg_scale": 1, "seed": 7}


def picture(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


FIRST, SECOND = picture(1), picture(2, 80)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir with a tiny Flux.2 Klein, which reads reference images, and a tiny Z-Image, which does not."""
    root = tmp_path_factory.mktemp("flux2-references")
    for name in ("flux2", "zimage"):
        save_diffusers_folder(build_tiny(name), root / "models" / f"tiny-{name}")
    for name, image in (("first", FIRST), ("second", SECOND)):
        image.save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def client(home):
    settings = Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=home / "out")
    with TestClient(create_app(settings, model="tiny-flux2")) as c:
        yield c


def params_of(image: Image.Image) -> dict[str, str]:
    return parse_infotext(image.info["parameters"]).params


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


RECORD = f"2: {image_hash(FIRST)}, {image_hash(SECOND)}"


# -- the command line --------------------------------------------------------------------------


def _saved(result) -> str:
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    return path


def test_cli_reference_then_remake_with_the_same_pictures(lienzo, home):
    refs = ("--reference", str(home / "first.png"), "--reference", str(home / "second.png"))
    small = ("--model", "tiny-flux2", "--steps", "2", "--cfg", "1", "--seed", "3")
    first = _saved(lienzo("generate", "make the apple blue", *small, *refs))
    params = parse_infotext(read_parameters(first)).params
    assert params["Reference images"] == RECORD
    assert Image.open(first).size == FIRST.size  # no size given: the first reference's
    again = _saved(lienzo("generate", "--from", first, *refs))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    plain = _saved(lienzo("generate", "make the apple blue", *small))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(first)))

    missing = lienzo("generate", "--from", first, code=2)
    assert "--reference: the picture was made with 2 reference image(s); give them again" in missing.stderr
    swapped = lienzo("generate", "--from", first, *refs[2:], *refs[:2], code=2)
    assert "--reference: the reference images given" in swapped.stderr and "in the same order" in swapped.stderr


def test_cli_refuses_references_where_they_cannot_go(lienzo, home):
    ref = ("--reference", str(home / "first.png"))
    other = lienzo("generate", "a pear", "--model", "tiny-zimage", "--steps", "1", "-W", "64", "-H", "64", *ref, code=2)
    assert "reference_images: Z-Image models take no reference images (only Flux.2 Klein" in other.stderr
    too_many = lienzo("generate", "a pear", "--model", "tiny-flux2", *ref * 5, code=2)
    assert "reference_images: at most 4 reference images are allowed, got 5" in too_many.stderr
    assert "--reference" not in lienzo("inpaint", "--help").stdout
    assert "--reference" in lienzo("img2img", "--help").stdout


# -- lienzo's own API and what the studio reads --------------------------------------------------


def test_native_api_takes_a_base64_list(client):
    body = {**FAST, "width": 64, "height": 64, "reference_images": [b64_png(FIRST), b64_png(SECOND)]}
    r = client.post("/api/v1/txt2img?wait=true", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done"
    assert parse_infotext(job["images"][0]["infotext"]).params["Reference images"] == RECORD
    assert job["parameters"]["reference_images"] == [image_hash(FIRST), image_hash(SECOND)]

    r = client.post("/api/v1/txt2img?wait=true", json={**body, "reference_images": ["not base64!"]})
    assert r.status_code == 422 and r.json()["field"] == "reference_images.0", r.text
    inpaint = {**body, "init_image": b64_png(FIRST), "mask": b64_png(Image.new("L", (64, 64), 255))}
    r = client.post("/api/v1/inpaint?wait=true", json=inpaint)
    assert r.status_code == 422 and r.json()["field"] == "reference_images", r.text  # not an inpainting field


def test_native_api_refuses_them_for_another_family(client):
    body = {**FAST, "width": 64, "height": 64, "model": "tiny-zimage", "reference_images": [b64_png(FIRST)]}
    job = client.post("/api/v1/txt2img?wait=true", json=body).json()
    assert job["status"] == "failed" and job["error_field"] == "reference_images"
    assert "Z-Image models take no reference images" in job["error"]


def test_the_studio_learns_which_models_take_them(client):
    families = {m["name"]: m["family"] for m in client.get("/api/v1/models").json()}
    assert families["tiny-flux2"]["reference_images"] is True and families["tiny-zimage"]["reference_images"] is False
    fields = {f["name"]: f for f in client.get("/api/v1/fields").json()}
    references = fields["reference_images"]
    assert references["type"] == "images" and references["modes"] == ["txt2img", "img2img"]
    assert references["names"] == {"cli": "--reference", "a1111": None, "openai": None, "infotext": "Reference images"}
    page = client.get("/").text
    assert 'id="reference_images"' in page and 'id="reference-box"' in page


# -- OpenAI's edits -------------------------------------------------------------------------------


def _edit(client, model: str, images, mask=None, **form):
    files = [("image[]", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
    if mask is not None:
        files.append(("mask", ("mask.png", png_bytes(mask), "image/png")))
    return client.post("/v1/images/edits", data={"prompt": "make the apple blue", "model": model, "steps": "2", "seed": "4", **form}, files=files)


def test_openai_edits_without_a_mask_are_references_on_klein(client):
    r = _edit(client, "tiny-flux2", [FIRST, SECOND])
    assert r.status_code == 200, r.text
    made = png_of(r.json()["data"][0]["b64_json"])
    params = params_of(made)
    assert params["Reference images"] == RECORD and "Denoising strength" not in params
    assert made.size == FIRST.size  # size auto: the first reference's

    r = _edit(client, "tiny-flux2", [FIRST] * 5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    assert "at most 4 reference images" in r.json()["error"]["message"]


def test_openai_edits_stay_as_they_were_with_a_mask_or_on_other_models(client):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    r = _edit(client, "tiny-flux2", [FIRST, SECOND], mask)
    assert r.status_code == 200, r.text
    params = params_of(png_of(r.json()["data"][0]["b64_json"]))
    assert "Reference images" not in params and "Mask blur" in params  # inpainting the first image
    r = _edit(client, "tiny-zimage", [FIRST, SECOND])
    assert r.status_code == 200, r.text
    params = params_of(png_of(r.json()["data"][0]["b64_json"]))
    assert "Reference images" not in params and "Denoising strength" in params  # img2img of the first image


# -- the studio page ------------------------------------------------------------------------------


def test_the_studio_offers_a_picker_for_a_model_that_reads_them(home):
    """Shown for Klein in txt2img and img2img, hidden for another family and in inpaint; the chosen files
    are sent as data URLs."""
    from playwright import sync_api as playwright

    from servers import lienzo_server
    from servers import ARGS, CHROMIUM
    from test_ui import studio, wait_for_results

    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-flux2"}) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        with studio(browser, url) as page:
            page.wait_for_selector("#reference-box:not([hidden])")
            assert "at most 4" in page.text_content("#reference-hint")
            page.set_input_files("#reference_images", [str(home / "first.png"), str(home / "second.png")])
            page.fill("#prompt", "make the apple blue")
            page.fill("#width", "256")
            page.fill("#height", "256")
            page.fill("#steps", "1")
            page.wait_for_function("document.querySelector('#reference_images').files.length === 2")
            with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
                page.click("#generate")
            sent = answer.value.request.post_data_json["reference_images"]
            assert len(sent) == 2 and all(s.startswith("data:image/png;base64,") for s in sent)
            wait_for_results(page, 1)
            job = page.request.get(f"{url}/api/v1/jobs").json()[0]
            assert parse_infotext(job["images"][0]["infotext"]).params["Reference images"] == RECORD

            page.check('input[name="mode"][value="inpaint"]', force=True)
            assert page.is_hidden("#reference-box")
            page.check('input[name="mode"][value="txt2img"]', force=True)
            page.select_option("#model", "tiny-zimage")
            page.wait_for_selector("#reference-box[hidden]", state="attached")
        browser.close()
