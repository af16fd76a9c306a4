"""The web studio in a real browser: Debian's chromium driven by Playwright against a real ``lienzo serve``.

Screenshots of the main screens go to ``screenshots/`` (ignored) for a person to look at.
"""

import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from lienzo.generation.samplers import flow_samplers
from lienzo.images.metadata import parse_infotext
from servers import lienzo_server

SHOTS = Path(__file__).resolve().parents[2] / "screenshots"
TIMEOUT = 60_000  # ms: a tiny model on a busy 2-core CPU


@pytest.fixture(scope="module")
def server(home):
    with lienzo_server(home, env={"LIENZO_PREVIEW_EVERY": "1", "LIENZO_DEFAULT_MODEL": "tiny-sd15"}) as url:
        yield url


@contextmanager
def studio(browser, url: str):
    """The studio at ``url``, loaded, in a fresh browser context; fails on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser, server):
    with studio(browser, server) as page:
        yield page


def shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def small_settings(page, side: int = 256, steps: int = 2) -> None:
    page.fill("#width", str(side))
    page.fill("#height", str(side))
    page.fill("#steps", str(steps))


def result_count(page) -> int:
    return page.locator("#results .tile").count()


def wait_for_results(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#results .tile img').length >= {count}")
    page.wait_for_function("[...document.querySelectorAll('#results .tile img')].every(i => i.complete && i.naturalWidth > 0)")


def picture(path: Path, size=(256, 256), colour=(200, 60, 40), infotext: str | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    Image.new("RGB", size, colour).save(path, pnginfo=info)
    return path


def test_generate_from_the_prompt_box(page):
    page.fill("#prompt", "a lighthouse on a cliff at dawn")
    small_settings(page)
    page.fill("#seed", "1234")
    shot(page, "create")
    page.locator("#prompt").press("Control+Enter")
    wait_for_results(page, 1)
    width = page.eval_on_selector("#results .tile img", "img => img.naturalWidth")
    assert width == 256
    # The seed it used is there to reuse.
    page.fill("#seed", "-1")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1234"
    # Click to enlarge: the viewer shows its parameters.
    page.click("#results .tile")
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('1234')")
    assert "lighthouse" in page.text_content("#viewer-prompt")
    shot(page, "viewer")
    page.keyboard.press("Escape")


def test_live_progress_and_cancel(page):
    page.fill("#prompt", "a long job to cancel")
    small_settings(page, steps=60)
    page.click("#generate")
    page.wait_for_function("/Step \\d+\\/60/.test(document.querySelector('#progress-text').textContent)")
    page.wait_for_selector("#preview-box:not([hidden])")
    shot(page, "progress")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#generate').disabled === false")
    assert "Cancelled" in page.text_content("#progress-text")


def test_fast_mode_is_sent_and_reused(page):
    page.fill("#prompt", "a paper boat on a pond")
    small_settings(page)
    assert not page.is_checked("#fast")  # never on by default
    page.check("#fast")
    page.click("#generate")
    wait_for_results(page, 1)
    page.uncheck("#fast")
    page.click("#results .tile")
    page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('Fast modetrue')")
    page.click("#act-reuse")
    assert page.is_checked("#fast")


def test_controls_come_from_the_field_table(page):
    # index.html has no tiling input: the page makes the control from GET /api/v1/fields.
    assert 'id="tiling"' not in page.request.get(page.url).text()
    assert page.get_attribute("#tiling", "type") == "checkbox"
    assert page.text_content('[data-field="tiling"] label').strip() == "Tiling"
    assert not page.is_checked("#tiling")
    # Limits, labels and the mode's defaults come from the table too.
    assert page.get_attribute("#mask_blur", "max") == "256"
    assert page.get_attribute("#steps", "max") == "150"
    assert page.text_content('label[for="steps"]').strip() == "Steps"
    page.click('.modes label:has-text("Image to image")')
    assert page.input_value("#denoising_strength") == "0.75"
    page.click('.modes label:has-text("Outpaint")')
    assert page.input_value("#denoising_strength") == "0.8"
    page.click('.modes label:has-text("Text to image")')

    page.fill("#prompt", "a seamless tile of cobblestones")
    small_settings(page)
    page.check("#tiling")
    with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
        page.click("#generate")
    assert answer.value.request.post_data_json["tiling"] is True
    assert answer.value.json()["parameters"]["tiling"] is True
    wait_for_results(page, 1)
    page.uncheck("#tiling")
    page.click("#results .tile")
    page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('Tilingtrue')")
    page.click("#act-reuse")
    assert page.is_checked("#tiling")


def test_server_error_shows_next_to_its_field(page):
    page.fill("#prompt", "too many steps")
    small_settings(page, steps=999)
    page.click("#generate")
    error = page.locator('[data-field="steps"] .error')
    error.wait_for(state="visible")
    assert "steps" in error.text_content() and "150" in error.text_content()
    assert result_count(page) == 0


def test_paint_a_mask_and_inpaint(page, tmp_path):
    page.click('.modes label:has-text("Inpaint")')
    page.set_input_files("#file", str(picture(tmp_path / "red.png")))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for(state="visible")
    # Generating with no mask is refused in the page, next to the image.
    page.click("#generate")
    assert "mask" in page.locator('[data-field="init_image"] .error').text_content()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    page.fill("#prompt", "a blue circle")
    page.fill("#steps", "2")
    shot(page, "inpaint")
    with page.expect_request(re.compile(r"/api/v1/inpaint$")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["mask"].startswith("data:image/png;base64,") and body["init_image"].startswith("data:image/png")
    wait_for_results(page, 1)
    assert page.eval_on_selector("#results .tile img", "img => [img.naturalWidth, img.naturalHeight]") == [256, 256]


def test_outpaint_grows_the_canvas(page, tmp_path):
    page.click('.modes label:has-text("Outpaint")')
    page.set_input_files("#file", str(picture(tmp_path / "green.png", colour=(40, 160, 60))))
    page.fill("#outpaint_right", "64")
    page.fill("#outpaint_down", "0")
    page.fill("#prompt", "more meadow")
    page.fill("#steps", "2")
    page.wait_for_function("document.querySelector('#image-canvas').width === 320")
    shot(page, "outpaint")
    page.click("#generate")
    wait_for_results(page, 1)
    assert page.eval_on_selector("#results .tile img", "img => [img.naturalWidth, img.naturalHeight]") == [320, 256]


def test_prompt_helper_builds_a_prompt_and_saves_presets(page):
    page.click("#helper summary")
    page.fill("#h-kind", "an oil painting of")
    page.fill("#h-subject", "a red fox")
    page.fill("#h-place", "in a snowy forest")
    page.click("#chips >> text=highly detailed")
    page.click("#h-build")
    assert page.input_value("#prompt") == "an oil painting of a red fox, in a snowy forest, highly detailed"
    page.once("dialog", lambda d: d.accept("Foxy"))
    page.click("#preset-save")
    page.wait_for_function("[...document.querySelectorAll('#preset-list option')].some(o => o.value === 'Foxy')")
    page.fill("#prompt", "a cat")
    page.select_option("#preset-list", "Foxy")
    page.click("#preset-apply")
    assert page.input_value("#prompt").startswith("a cat, an oil painting of a red fox")


def test_explore_a_plot_then_vary_the_chosen_cell(page):
    page.fill("#prompt", "a teapot on a table")
    side = page.get_attribute("#width", "min")
    small_settings(page, side=int(side))
    page.fill("#seed", "4321")
    page.click("#explore summary")
    page.select_option("#x-field", "steps")
    page.fill("#x-values", "1,2,3")
    page.select_option("#y-field", label="CFG scale")
    page.fill("#y-values", "1,4,7")
    with page.expect_request(re.compile(r"/api/v1/plot$")) as sent:
        page.click("#plot")
    body = sent.value.post_data_json
    assert (body["x"], body["y"], body.get("z"), body["seed"], body["width"]) == ("steps=1,2,3", "cfg_scale=1,4,7", None, 4321, int(side))
    page.wait_for_function("document.querySelectorAll('#plots .cell img').length === 9", timeout=3 * TIMEOUT)
    page.wait_for_function("[...document.querySelectorAll('#plots .cell img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.text_content("#plot-status") == "9/9 done"
    # Readable labels: the values as headers, none cut off or tiny.
    assert page.locator("#plots .plot-head.col").all_text_contents() == ["Steps: 1", "Steps: 2", "Steps: 3"]
    assert page.locator("#plots .plot-head.row").all_text_contents() == ["CFG scale: 1", "CFG scale: 4", "CFG scale: 7"]
    assert page.evaluate(
        "[...document.querySelectorAll('#plots .plot-head')].every(h => h.scrollWidth <= h.clientWidth"
        " && parseFloat(getComputedStyle(h).fontSize) >= 12 && h.getBoundingClientRect().width > 0)"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 1366
    shot(page, "explore")

    page.click('#plots .cell[title="Steps: 2, CFG scale: 4"]')
    page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('CFG scale4')")
    page.click("#act-reuse")
    assert page.input_value("#steps") == "2"
    assert float(page.input_value("#cfg_scale")) == 4
    assert page.input_value("#seed") == "4321"

    # A variation of the chosen cell: same seed, a little of another.
    page.fill("#subseed", "99")
    page.fill("#subseed_strength", "0.1")
    with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
        page.click("#generate")
    made = answer.value.json()["parameters"]
    assert (made["steps"], made["cfg_scale"], made["seed"], made["subseed"], made["subseed_strength"]) == (2, 4, 4321, 99, 0.1)
    wait_for_results(page, 1)

    # A value out of range is refused before anything is queued, next to its axis.
    page.fill("#x-values", "1,999")
    page.click("#plot")
    error = page.locator('#explore [data-field="x"] .error')
    error.wait_for(state="visible")
    assert "999" in error.text_content()
    assert page.locator("#plots .cell img").count() == 9


def test_cancel_a_plot(page):
    page.fill("#prompt", "a plot to cancel")
    small_settings(page, steps=60)
    page.click("#explore summary")
    page.select_option("#x-field", "Prompt S/R")
    page.fill("#x-values", "plot,grid,chart")
    page.click("#plot")
    page.wait_for_function("/Step \\d+\\/60/.test(document.querySelector('#plots .cell')?.textContent)")
    page.click("#plot-cancel")
    page.wait_for_selector("#plot-cancel", state="hidden")
    assert page.text_content("#plot-status") == "3/3 done (3 without an image)"
    assert page.locator("#plots .plot-head.col").all_text_contents() == ["plot", "grid", "chart"]
    assert page.locator("#plots .cell.failed").all_text_contents()[1:] == ["Cancelled", "Cancelled"]


def test_gallery_search_reuse_and_import(page, tmp_path):
    # Two pictures of its own, so the search below has one to leave out whatever order the tests run in.
    small_settings(page)
    for prompt, seed in (("a lighthouse at dusk", "76"), ("a zeppelin over the harbour", "77")):
        page.fill("#prompt", prompt)
        page.fill("#seed", seed)
        page.click("#generate")
        page.wait_for_function(f"[...document.querySelectorAll('#results .tile')].some(t => t.title.includes('{prompt}'))")
        wait_for_results(page, 1)

    page.click("#tab-gallery")
    page.wait_for_function("document.querySelectorAll('#gallery-grid .tile').length >= 2")
    page.keyboard.press("/")
    page.keyboard.type("zeppelin")
    page.wait_for_function(
        "(() => { const t = [...document.querySelectorAll('#gallery-grid .tile')];"
        " return t.length === 1 && t[0].title.includes('zeppelin'); })()"
    )
    shot(page, "gallery")

    page.click("#gallery-grid .tile")
    page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('77')")
    page.click("#act-fav")
    page.wait_for_function("document.querySelector('#act-fav').getAttribute('aria-pressed') === 'true'")
    page.click("#act-reuse")
    assert page.locator("#view-create").is_visible()
    assert page.input_value("#prompt") == "a zeppelin over the harbour"
    assert page.input_value("#seed") == "77"
    assert page.input_value("#width") == "256"

    # Import a PNG made by another tool: it lands with its prompt and is found by search.
    page.click("#tab-gallery")
    infotext = "a brass owl automaton\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 6, Seed: 9, Size: 256x256"
    page.set_input_files("#import-file", str(picture(tmp_path / "owl.png", colour=(150, 120, 40), infotext=infotext)))
    page.fill("#search", "owl")
    page.wait_for_function(
        "(() => { const t = [...document.querySelectorAll('#gallery-grid .tile')];"
        " return t.length === 1 && t[0].title.includes('brass owl') && t[0].querySelector('.badge'); })()"
    )
    # Favourites filter: only the zeppelin is starred.
    page.fill("#search", "")
    page.check("#filter-fav")
    page.wait_for_function(
        "(() => { const t = [...document.querySelectorAll('#gallery-grid .tile')];"
        " return t.length === 1 && t[0].title.includes('zeppelin'); })()"
    )


def test_delete_from_the_gallery(page):
    page.fill("#prompt", "a picture to delete")
    small_settings(page)
    page.click("#generate")
    wait_for_results(page, 1)
    page.click("#tab-gallery")
    page.fill("#search", "delete")
    page.wait_for_function("document.querySelectorAll('#gallery-grid .tile').length === 1")
    page.click("#gallery-grid .tile")
    page.wait_for_selector("#act-delete:not([hidden])")
    page.once("dialog", lambda d: d.accept())
    page.click("#act-delete")
    page.wait_for_function("document.querySelectorAll('#gallery-grid .tile').length === 0")
    page.reload()
    page.click("#tab-gallery")
    page.fill("#search", "delete")
    page.wait_for_function("document.querySelector('#gallery-end').textContent.includes('Nothing')")


@pytest.mark.parametrize("width,height,name", [(390, 844, "phone"), (1280, 720, "laptop")])
def test_fits_phone_and_laptop_screens(browser, server, width, height, name):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    # Nothing wider than the window: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for selector in ("#prompt", "#generate", "#steps", "#seed"):
        assert page.locator(selector).is_visible()
    shot(page, f"create-{name}")
    page.click("#tab-gallery")
    page.wait_for_selector("#gallery-end")
    page.wait_for_function("[...document.querySelectorAll('#gallery-grid img')].every(i => i.complete)")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    shot(page, f"gallery-{name}")
    context.close()


@pytest.fixture(scope="module")
def flow_server(home, tmp_path_factory):
    """A server whose models dir also holds a tiny Flux.1 dev and an SD 3.x (diffusers folders)."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny, save_diffusers_folder

    root = tmp_path_factory.mktemp("flow-home")
    save_single_file(build_tiny("sd1"), root / "models" / "tiny-sd15.safetensors")
    save_diffusers_folder(build_tiny("flux"), root / "models" / "tiny-flux")
    save_diffusers_folder(build_tiny("sd3"), root / "models" / "tiny-sd3")
    with lienzo_server(root, env={"LIENZO_DEFAULT_MODEL": "tiny-sd15"}) as url:
        yield url


def options(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} option", "os => os.map(o => o.value)")


def test_controls_follow_the_models_family(browser, flow_server):
    with studio(browser, flow_server) as page:
        distilled = '[data-field="distilled_cfg_scale"]'
        # SD 1.x: real CFG, a negative prompt, every sampler, no distilled CFG.
        assert page.input_value("#cfg_scale") == "7" and page.input_value("#steps") == "20"
        assert page.is_visible("#negative-box") and page.is_hidden(distilled)
        assert "DDIM" in options(page, "#sampler")
        page.fill("#steps", "2")  # the user's own value: it stays when the model changes

        page.select_option("#model", "tiny-flux")
        page.wait_for_selector(f"{distilled}:not([hidden])")
        assert page.input_value("#distilled_cfg_scale") == "3.5"
        assert page.text_content(f"{distilled} label").startswith("Distilled CFG scale")
        assert (page.input_value("#cfg_scale"), page.input_value("#sampler"), page.input_value("#steps")) == ("1", "Euler", "2")
        # At CFG scale 1 the negative prompt has no effect: its box gives way to a note.
        assert page.is_hidden("#negative-box") and page.is_visible("#negative-off")
        assert options(page, "#sampler") == flow_samplers()
        assert "Automatic (Simple)" in page.text_content("#schedule")
        shot(page, "create-flux")

        page.fill("#prompt", "a red apple")
        small_settings(page)  # the tiny model's own size: the family's 1024 is a real Flux.1's
        page.fill("#distilled_cfg_scale", "2.5")
        page.fill("#seed", "3")
        with page.expect_response(re.compile(r"/api/v1/txt2img$")) as answer:
            page.click("#generate")
        sent = answer.value.request.post_data_json
        assert (sent["model"], sent["cfg_scale"], sent["distilled_cfg_scale"], sent["sampler"]) == ("tiny-flux", 1, 2.5, "Euler")
        assert "negative_prompt" not in sent
        wait_for_results(page, 1)
        page.click("#results .tile")
        page.wait_for_function("document.querySelector('#viewer-params').textContent.includes('tiny-flux')")
        page.keyboard.press("Escape")
        job = page.request.get(f"{flow_server}/api/v1/jobs").json()[0]
        assert parse_infotext(job["images"][0]["infotext"]).params["Distilled CFG Scale"] == "2.5"

        # SD 3.x: CFG scale 5 with a negative prompt; its network takes no distilled guidance.
        page.select_option("#model", "tiny-sd3")
        page.wait_for_selector(f"{distilled}[hidden]", state="attached")
        assert page.input_value("#cfg_scale") == "5" and page.is_visible("#negative-box")
        page.fill("#cfg_scale", "1")
        assert page.is_hidden("#negative-box")
