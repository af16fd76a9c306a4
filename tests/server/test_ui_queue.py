"""The studio's Queue tab in Debian's chromium driven by Playwright, against a real server whose model waits at a
gate: the first job stands running at its first step while the ones after it wait, so that the test can read
and change their order, pause the queue and cancel jobs before anything finishes.

The server runs in this process (uvicorn in a thread), not as ``lienzo serve`` in a subprocess, so that its
loader can be the test's: the gate is a Python object the test opens and closes."""

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from lienzo.server.app import create_app
from lienzo.studio import load_model
from servers import free_port, home_settings
from test_ui import TIMEOUT, shot, studio

SIDE = 64  # the smallest picture a request may ask for: the jobs that run finish quickly on a busy CPU


class ModelGate:
    """The server's loader: the real tiny model, with a gate before every U-Net call. While the gate is
    closed the running job stands before its next step and the jobs after it wait their turn. It holds
    every call, not the load alone, because a worker that keeps the model loaded loads it only once."""

    def __init__(self, settings):
        self.settings = settings
        self._open = threading.Event()
        self._open.set()

    def load(self, name, cancel):
        s = self.settings
        components = load_model(name, device=s.device, dtype=s.dtype, settings=s, cancel=cancel)
        components.unet.register_forward_pre_hook(self._before_model_call)
        return components

    def _before_model_call(self, _module, _args) -> None:
        if not self._open.wait(120):
            raise RuntimeError("the test never opened the model gate")

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


@contextmanager
def serve(app) -> Iterator[str]:
    """``app`` on a free loopback port in a thread of this process; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lienzo-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def served(home, tmp_path_factory):
    where = tmp_path_factory.mktemp("ui-queue")
    settings = home_settings(home, data=where / "data", out=where / "out", model="tiny-sd15")
    gate = ModelGate(settings)
    with serve(create_app(settings, loader=gate.load)) as url:
        yield url, gate
        gate.open()  # let a held job finish, so that the server stops without waiting on it


@pytest.fixture
def page(browser, served):
    url, gate = served
    with studio(browser, url) as page:
        yield page
        # However the test ended: the queue runs again and nothing is held for the next test.
        gate.open()
        page.request.post(f"{url}/api/v1/queue/resume")


def submit(page, url: str, prompt: str, steps: int = 2) -> str:
    """Queue a small txt2img job through the API; its id."""
    answer = page.request.post(f"{url}/api/v1/txt2img", data={"prompt": prompt, "width": SIDE, "height": SIDE, "steps": steps})
    assert answer.status == 202, answer.text()
    return answer.json()["id"]


def queue_state(page, url: str) -> dict:
    answer = page.request.get(f"{url}/api/v1/queue")
    assert answer.ok, answer.text()
    return answer.json()


def shown_order(page) -> list[str]:
    return page.eval_on_selector_all("#q-jobs .q-job", "rows => rows.map(r => r.dataset.id)")


def wait_for_order(page, ids: list[str]) -> None:
    page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('#q-jobs .q-job')].map(r => r.dataset.id)) === JSON.stringify(ids)", arg=ids)


def open_queue_tab(page) -> None:
    page.click("#tab-queue")
    page.wait_for_selector("#view-queue:not([hidden])")


def test_the_queue_lists_moves_pauses_and_cancels(page, served):
    url, gate = served
    gate.close()
    running = submit(page, url, "a held lighthouse")
    page.wait_for_function(
        "async (url) => (await (await fetch(url)).json()).running !== null", arg=f"{url}/api/v1/queue", timeout=TIMEOUT
    )
    second, third, fourth = (submit(page, url, prompt) for prompt in ("a second boat", "a third tree", "a fourth hill"))
    open_queue_tab(page)

    # The running job first, with its progress; the waiting ones in the order they were queued.
    wait_for_order(page, [running, second, third, fourth])
    first_row = page.locator(f'#q-jobs .q-job[data-id="{running}"]')
    assert "running" in first_row.get_attribute("class")
    assert first_row.locator(".q-progress").is_visible() and first_row.locator(".q-place").text_content() == "Running"
    assert first_row.locator(".q-front").is_hidden() and first_row.locator(".q-cancel").is_visible()
    waiting_rows = page.locator("#q-jobs .q-job:not(.running)")
    assert waiting_rows.locator(".q-place").all_text_contents() == ["#1", "#2", "#3"]
    assert waiting_rows.locator(".q-prompt").all_text_contents() == ["a second boat", "a third tree", "a fourth hill"]
    assert waiting_rows.locator(".q-progress").evaluate_all("els => els.every(e => e.hidden)")
    assert page.get_attribute(f'#q-jobs .q-job[data-id="{fourth}"] .q-front', "aria-label") == "Move to the front: a fourth hill"
    # The workers strip: the worker running the held job is busy.
    page.wait_for_selector("#q-workers .q-worker .q-state.busy")
    shot(page, "queue")

    # The last to the front: the API is asked, and the list shows the server's new order.
    with page.expect_response(re.compile(rf"/api/v1/jobs/{fourth}/move$")) as moved:
        page.click(f'#q-jobs .q-job[data-id="{fourth}"] .q-front')
    assert moved.value.ok and moved.value.request.post_data_json == {"to": "front"}
    wait_for_order(page, [running, fourth, second, third])
    assert [job["id"] for job in queue_state(page, url)["jobs"]] == [running, fourth, second, third]

    # A priority typed in: sent as a number, shown in the row once the server has it.
    priority = page.locator(f'#q-jobs .q-job[data-id="{third}"] .q-priority')
    with page.expect_response(re.compile(rf"/api/v1/jobs/{third}/priority$")) as prioritised:
        priority.fill("7")
        priority.press("Enter")
    assert prioritised.value.ok and prioritised.value.request.post_data_json == {"priority": 7}
    page.wait_for_function(f"document.querySelector('.q-job[data-id=\"{third}\"] .q-meta').textContent.includes('priority 7')")
    # Out of range: refused in the page, with the field named; nothing is sent.
    priority.fill("500")
    priority.press("Enter")
    page.wait_for_function("document.querySelector('#q-error').textContent.startsWith('priority:')")

    # Pause: the button offers Resume, and the server says paused.
    with page.expect_response(re.compile(r"/api/v1/queue/pause$")):
        page.click("#q-pause")
    page.wait_for_function("document.querySelector('#q-pause').textContent === 'Resume'")
    assert queue_state(page, url)["paused"] is True
    assert "Paused" in page.text_content("#q-summary")

    # Cancel one: its row goes, the server has it cancelled.
    with page.expect_response(re.compile(rf"/api/v1/jobs/{second}/cancel$")):
        page.click(f'#q-jobs .q-job[data-id="{second}"] .q-cancel')
    page.wait_for_selector(f'#q-jobs .q-job[data-id="{second}"]', state="detached")
    assert page.request.get(f"{url}/api/v1/jobs/{second}").json()["status"] == "cancelled"
    assert second not in shown_order(page)

    # Resume and let the model go: everything left runs, and the list empties into the history.
    with page.expect_response(re.compile(r"/api/v1/queue/resume$")):
        page.click("#q-pause")
    page.wait_for_function("document.querySelector('#q-pause').textContent === 'Pause'")
    gate.open()
    page.wait_for_selector("#q-empty:not([hidden])", timeout=3 * TIMEOUT)
    page.wait_for_selector(f'#q-history .q-past[data-id="{running}"]')
    assert page.text_content(f'#q-history .q-past[data-id="{second}"] .q-status') == "cancelled"
    assert page.text_content(f'#q-history .q-past[data-id="{fourth}"] .q-status') == "done"


def test_history_opens_a_finished_picture_and_filters_by_state(page, served):
    url, _gate = served
    answer = page.request.post(
        f"{url}/api/v1/txt2img?wait=true", data={"prompt": "a finished windmill", "width": SIDE, "height": SIDE, "steps": 2}
    )
    assert answer.status == 200 and answer.json()["status"] == "done", answer.text()
    done = answer.json()["id"]
    open_queue_tab(page)
    row = page.locator(f'#q-history .q-past[data-id="{done}"]')
    row.wait_for()
    assert row.locator(".q-status").text_content() == "done"
    assert "a finished windmill" in row.locator(".q-prompt").text_content()
    page.wait_for_function(
        f"(() => {{ const i = document.querySelector('.q-past[data-id=\"{done}\"] .q-thumb img'); return i && i.complete && i.naturalWidth > 0; }})()"
    )
    # The thumbnail opens the picture in the viewer, with its prompt.
    row.locator(".q-thumb").click()
    page.wait_for_selector("#viewer[open]")
    assert page.text_content("#viewer-prompt") == "a finished windmill"
    assert page.get_attribute("#viewer-img", "src") == answer.json()["images"][0]["url"]
    page.keyboard.press("Escape")

    # The state filter asks the server for that state only.
    with page.expect_response(re.compile(r"/api/v1/jobs\?.*state=failed")) as listed:
        page.select_option("#q-state-filter", "failed")
    assert listed.value.ok
    page.wait_for_selector(f'#q-history .q-past[data-id="{done}"]', state="detached")
    page.select_option("#q-state-filter", "done")
    row.wait_for()
    assert set(page.locator("#q-history .q-status").all_text_contents()) == {"done"}


def test_cancel_all_mine_and_history_pages(page, served):
    url, _gate = served
    page.request.post(f"{url}/api/v1/queue/pause")
    count = 22  # more than the history's page of 20
    ids = [submit(page, url, f"a waiting cloud {n}") for n in range(count)]
    open_queue_tab(page)
    wait_for_order(page, ids)
    assert page.text_content("#q-pause") == "Resume"

    # A confirmation first; dismissed, nothing happens.
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#q-cancel-mine")
    assert queue_state(page, url)["waiting"] == count
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_response(re.compile(r"/api/v1/queue/cancel$")) as cancelled:
        page.click("#q-cancel-mine")
    assert cancelled.value.request.post_data_json == {"owner": None}
    assert cancelled.value.json()["cancelled"] == count
    page.wait_for_function(f"document.querySelector('#toast').textContent === 'Cancelled {count} jobs.'")
    page.wait_for_selector("#q-empty:not([hidden])")
    assert queue_state(page, url)["waiting"] == 0

    # The cancelled ones, a page at a time: "More" asks for the next page with the server's cursor.
    page.select_option("#q-state-filter", "cancelled")
    page.wait_for_function("document.querySelectorAll('#q-history .q-past').length === 20")
    assert page.is_visible("#q-more")
    with page.expect_response(re.compile(r"/api/v1/jobs\?.*cursor=")) as next_page:
        page.click("#q-more")
    assert next_page.value.ok
    page.wait_for_function(f"document.querySelectorAll('#q-history .q-past').length >= {count}")
    shown = page.eval_on_selector_all("#q-history .q-past", "rows => rows.map(r => r.dataset.id)")
    assert len(shown) == len(set(shown))  # no job twice across the pages
    assert set(ids) <= set(shown)
    assert set(page.locator("#q-history .q-status").all_text_contents()) == {"cancelled"}
