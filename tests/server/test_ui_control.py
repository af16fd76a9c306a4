"""The studio's ControlNet panel, hires fix, Upscale tab and embeddings, in Debian's chromium driven by Playwright
against a real ``lienzo serve`` whose models dir holds a tiny SD 1.x checkpoint, a tiny ControlNet and an embedding."""

import re

import pytest
import torch
from PIL import Image

from lienzo.generation.fields import image_hash
from lienzo.images.metadata import parse_infotext
from servers import lienzo_server
from test_native_control import control_home, drawing
from test_ui import TIMEOUT, shot, small_settings, studio, wait_for_results


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = control_home(tmp_path_factory.mktemp("ui-control-home"))
    (home / "models" / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}, "name": "glimmer"}, home / "models" / "embeddings" / "glimmer.pt")
    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-sd15"}) as url:
        yield url


@pytest.fixture
def page(browser, server):
    with studio(browser, server) as page:
        yield page


def detect(response, **sent) -> bool:
    """A detect call's answer, made for a request with these fields."""
    if not response.url.endswith("/api/v1/controlnet/detect"):
        return False
    body = response.request.post_data_json
    return all(body.get(key) == value for key, value in sent.items())


def test_a_controlnet_unit_with_a_live_map_goes_with_the_job(page, server, tmp_path):
    path = tmp_path / "square.png"
    drawing(128).save(path)
    page.click("#controlnet summary")
    page.click("#cn-add")
    unit = page.locator('#cn-units .unit[data-field="controlnets.0"]')
    assert unit.locator(".cn-model").input_value() == "tiny-canny"
    unit.locator(".cn-file").set_input_files(str(path))
    with page.expect_response(lambda r: detect(r, module="canny")) as detected:
        unit.locator(".cn-module").select_option("canny")
    assert detected.value.headers["content-type"] == "image/png"
    # The module's own sliders, at its defaults: the resolution, then canny's two thresholds.
    assert [unit.locator(f".cn-{name}").input_value() for name in ("processor_res", "threshold_a", "threshold_b")] == ["512", "100", "200"]
    page.wait_for_function(
        "(() => { const m = document.querySelector('#cn-units .cn-map'); return !m.hidden && m.complete && m.naturalWidth === 512; })()"
    )
    # A slider moved: a new map at the new resolution.
    with page.expect_response(lambda r: detect(r, processor_res=256)):
        unit.locator(".cn-processor_res").fill("256")
    page.wait_for_function("document.querySelector('#cn-units .cn-map').naturalWidth === 256")
    unit.locator(".cn-weight").fill("0.7")
    unit.locator(".cn-control-mode").select_option("ControlNet is more important")

    # A second unit without a picture: refused in the page, next to that unit; then removed.
    page.click("#cn-add")
    page.fill("#prompt", "a square window")
    small_settings(page, side=int(page.get_attribute("#width", "min")))
    page.click("#generate")
    second = page.locator('#cn-units .unit[data-field="controlnets.1"]')
    assert "no picture" in second.locator(".error").text_content()
    second.locator(".cn-remove").click()
    assert page.locator("#cn-units .unit").count() == 1
    shot(page, "controlnet")

    with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
        page.click("#generate")
    sent = answer.value.request.post_data_json["controlnets"]
    assert len(sent) == 1 and sent[0]["image"].startswith("data:image/png;base64,")
    assert (sent[0]["module"], sent[0]["model"], sent[0]["weight"], sent[0]["processor_res"], sent[0]["threshold_a"]) == (
        "canny", "tiny-canny", 0.7, 256, 100
    )
    assert sent[0]["control_mode"] == "ControlNet is more important"
    wait_for_results(page, 1)
    job = page.request.get(f"{server}/api/v1/jobs").json()[0]
    unit_sent = job["parameters"]["controlnets"][0]
    assert (unit_sent["image"], unit_sent["model"]) == (image_hash(Image.open(path)), "tiny-canny")
    assert parse_infotext(job["images"][0]["infotext"]).params["ControlNet 0"].startswith("Module: canny, Model: tiny-canny [")


def test_hires_fix_section_only_for_txt2img(page, server):
    box = page.locator("#hires-box")
    assert box.is_visible() and box.locator("h2").text_content() == "Hires fix"
    assert page.is_hidden("#hires-more") and not page.is_checked("#enable_hr")
    page.click('.modes label:has-text("Image to image")')
    assert page.is_hidden("#hires-box")
    page.click('.modes label:has-text("Text to image")')
    page.check("#enable_hr")
    assert page.is_visible("#hr_scale") and page.is_visible("#hr_upscaler")
    # The hires upscalers: the latent modes, then the picture upscalers; its sampler may follow the first pass's.
    upscalers = page.eval_on_selector_all("#hr_upscaler option", "os => os.map(o => o.value)")
    assert upscalers[0] == "Latent" and "Lanczos" in upscalers and page.input_value("#hr_upscaler") == "Latent"
    assert page.input_value("#hr_sampler") == "" and page.input_value("#hr_schedule") == "Automatic"
    # Its schedule types are its sampler's: the first pass's until it has one of its own.
    values = "os => os.map(o => o.value)"
    assert page.eval_on_selector_all("#hr_schedule option", values) == page.eval_on_selector_all("#schedule option", values)
    page.select_option("#hr_sampler", "DPM++ 2M")
    assert "Karras" in page.eval_on_selector_all("#hr_schedule option", values)
    page.select_option("#hr_sampler", "")
    side = int(page.get_attribute("#width", "min"))
    page.fill("#prompt", "a lighthouse, larger")
    small_settings(page, side=side)
    page.fill("#hr_scale", "1.5")
    page.select_option("#hr_upscaler", "Lanczos")
    with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
        page.click("#generate")
    sent = answer.value.request.post_data_json
    hires = tuple(sent[name] for name in ("enable_hr", "hr_scale", "hr_upscaler", "hr_sampler", "hr_schedule"))
    assert hires == (True, 1.5, "Lanczos", None, "Automatic")
    # Two passes, the second at the larger size: more time than one picture takes.
    page.wait_for_function("document.querySelectorAll('#results .tile img').length >= 1", timeout=3 * TIMEOUT)
    wait_for_results(page, 1)
    assert page.eval_on_selector("#results .tile img", "img => img.naturalWidth") == side * 3 // 2
    job = page.request.get(f"{server}/api/v1/jobs").json()[0]
    assert parse_infotext(job["images"][0]["infotext"]).params["Hires upscale"] == "1.5"


def test_upscale_tab(page, server, tmp_path):
    path = tmp_path / "small.png"
    drawing(96).save(path)
    page.click("#tab-upscale")
    assert page.is_visible("#view-upscale") and page.is_hidden("#view-create")
    options = page.eval_on_selector_all("#up-upscaler option", "os => os.map(o => o.value)")
    assert "Lanczos" in options and not any(o.startswith("Latent") for o in options)
    page.set_input_files("#up-file", str(path))
    page.wait_for_selector("#up-source:not([hidden])")
    page.select_option("#up-upscaler", "Nearest")
    page.fill("#up-scale", "2.5")
    with page.expect_response(re.compile(r"/api/v1/upscale$")) as answer:
        page.click("#up-run")
    assert answer.value.request.post_data_json["scale"] == 2.5 and answer.value.request.post_data_json["upscaler"] == "Nearest"
    page.wait_for_selector("#up-result-box:not([hidden])")
    assert page.text_content("#up-size") == "240×240"
    shot(page, "upscale")
    with page.expect_download() as download:
        page.click("#up-download")
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    with Image.open(saved) as result:
        assert result.size == (240, 240)
        assert result.tobytes() == Image.open(path).resize((240, 240), Image.Resampling.NEAREST).tobytes()
    page.click("#up-save")
    page.wait_for_function("document.querySelector('#toast').textContent.includes('Saved to the gallery')")
    newest = page.request.get(f"{server}/api/v1/gallery").json()["items"][0]
    assert (newest["width"], newest["height"]) == (240, 240)
    # Too large for the server: the error shows, nothing breaks.
    page.fill("#up-scale", "8")
    page.select_option("#up-upscaler", "Lanczos")
    drawing(512).save(tmp_path / "big.png")
    page.set_input_files("#up-file", str(tmp_path / "big.png"))
    page.click("#up-run")
    page.wait_for_function("document.querySelector('#up-error').textContent.includes('max_pixels')", timeout=TIMEOUT)


def test_embeddings_in_the_prompt_helper(page):
    page.fill("#prompt", "a lamp, soft light")
    page.click("#helper summary")
    chip = page.locator("#embeddings .chip", has_text="glimmer")
    chip.wait_for()
    page.eval_on_selector("#prompt", "p => p.setSelectionRange(6, 6)")  # after "a lamp"
    chip.click()
    assert page.input_value("#prompt") == "a lamp glimmer, soft light"
