"""lienzo serve against web pages it did not serve: Host checks (DNS rebinding), cross-site requests
(Origin and Sec-Fetch-Site), JSON routes that refuse form content types, body limits on chunked
uploads and OpenAI links that never follow the request's Host. In-process, then in a real browser."""

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from playwright import sync_api as playwright
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from lienzo.server.app import Auth, create_app
from lienzo.settings import Settings
from servers import ARGS, CHROMIUM, free_port, home_settings, lienzo_server, png_bytes, two_model_home
from test_ui import TIMEOUT

PNG = png_bytes(Image.new("RGB", (64, 64), (200, 60, 40)))
LIENZO = "http://localhost:7860"  # where the in-process server pretends to listen
FAST = {"prompt": "a red apple", "steps": 1, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("security-home"))


def settings_for(home, tmp_path, **values) -> Settings:
    return home_settings(home, data=tmp_path / "data", out=tmp_path / "out", **values)


def serve(home, tmp_path, auth: Auth | None = None, **values) -> TestClient:
    return TestClient(create_app(settings_for(home, tmp_path, **values), auth=auth), base_url=LIENZO)


@pytest.fixture
def client(home, tmp_path):
    with serve(home, tmp_path) as c:
        yield c


def import_image(client) -> int:
    response = client.post("/api/v1/gallery/import", files=[("files", ("mine.png", PNG, "image/png"))])
    assert response.status_code == 200, response.text
    return response.json()["imported"][0]["id"]


def state(client) -> tuple:
    """What a request from a hostile page could change: jobs, the gallery, the current model."""
    jobs = [j["id"] for j in client.get("/api/v1/jobs").json()]
    gallery = [i["id"] for i in client.get("/api/v1/gallery").json()["items"]]
    return jobs, gallery, [m["name"] for m in client.get("/api/v1/models").json() if m["current"]]


def detail(response) -> str:
    """The error message in whichever family's shape it came."""
    body = response.json()
    return body["error"]["message"] if isinstance(body.get("error"), dict) else body["detail"]


UPLOAD = ("a.png", PNG, "image/png")
# Every family's state-changing routes, as a page elsewhere would send them.
CHANGES = {
    "openai-edit": ("POST", "/v1/images/edits", {"data": {"prompt": "x", "steps": "1"}, "files": {"image": UPLOAD}}),
    "openai-variation": ("POST", "/v1/images/variations", {"data": {"steps": "1"}, "files": {"image": UPLOAD}}),
    "gallery-import": ("POST", "/api/v1/gallery/import", {"files": [("files", UPLOAD)]}),
    "sdapi-interrupt": ("POST", "/sdapi/v1/interrupt", {}),
    "sdapi-options": ("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "tiny-b"}}),
    "native-txt2img": ("POST", "/api/v1/txt2img", {"json": FAST}),
    "native-model": ("PUT", "/api/v1/models/current", {"json": {"name": "tiny-b"}}),
    "gallery-delete": ("DELETE", "/api/v1/gallery/1", {}),  # the image the test imports first
}


# -- Host: DNS rebinding --------------------------------------------------------------------------


def test_a_foreign_host_can_neither_read_nor_change_anything(client):
    image = import_image(client)
    before = state(client)
    foreign = {"Host": "rebind.example:7860"}  # a page's own name, rebound to 127.0.0.1
    for method, path, kwargs in [
        ("GET", "/api/v1/gallery", {}),
        ("GET", f"/api/v1/gallery/{image}/image", {}),
        ("GET", "/sdapi/v1/options", {}),
        ("DELETE", f"/api/v1/gallery/{image}", {}),
        ("PUT", "/api/v1/models/current", {"json": {"name": "tiny-b"}}),
        ("POST", "/api/v1/txt2img", {"json": FAST}),
    ]:
        response = client.request(method, path, headers=foreign, **kwargs)
        assert response.status_code == 403, (method, path, response.text)
        assert "rebind.example" in detail(response) and "allowed_hosts" in detail(response)
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/api/v1/queue", headers=foreign):
            pass
    assert closed.value.code == 1008
    assert state(client) == before and before[1] == [image]


def test_this_servers_own_names_and_addresses_are_answered_and_no_other(client):
    own = ["localhost:7860", "localhost", "127.0.0.1:7860", "[::1]:7860", "192.168.1.20:7860", f"{socket.gethostname()}:7860"]
    for host in own:
        assert client.get("/api/v1/queue", headers={"Host": host}).status_code == 200, host
    for host in ["localhost.evil.test:7860", "127.0.0.1.evil.test", "evil.test:7860", "bad host!"]:
        assert client.get("/api/v1/queue", headers={"Host": host}).status_code == 403, host


@pytest.mark.parametrize(
    "allowed, answered, refused",
    [
        (["studio.example"], ["studio.example", "STUDIO.example:443"], ["studio.example.evil.test", "rebind.example"]),
        ([".ts.net"], ["box.tail1234.ts.net", "ts.net"], ["notts.net", "ts.net.evil.test"]),
        (["*"], ["rebind.example"], []),
    ],
)
def test_allowed_hosts(home, tmp_path, allowed, answered, refused):
    with serve(home, tmp_path) as c:
        assert c.get("/api/v1/queue", headers={"Host": answered[0]}).status_code == 403
    with serve(home, tmp_path, allowed_hosts=allowed) as c:
        for host in answered:
            assert c.get("/api/v1/queue", headers={"Host": host}).status_code == 200, host
        for host in refused:
            assert c.get("/api/v1/queue", headers={"Host": host}).status_code == 403, host


def test_allowed_hosts_and_public_url_from_the_environment(monkeypatch, home, tmp_path):
    monkeypatch.setenv("LIENZO_ALLOWED_HOSTS", "Studio.Example, .ts.net")
    monkeypatch.setenv("LIENZO_PUBLIC_URL", "https://lienzo.example/art/")
    settings = Settings()
    assert settings.allowed_hosts == ["studio.example", ".ts.net"] and settings.public_url == "https://lienzo.example/art"
    with serve(home, tmp_path) as c:  # public_url's host is one of the server's names
        assert c.get("/api/v1/queue", headers={"Host": "lienzo.example"}).status_code == 200
    for name, value, words in [
        ("allowed_hosts", "http://studio.example", "'http://studio.example' is not a host name"),
        ("allowed_hosts", "studio.example:8080", "without scheme or port"),
        ("public_url", "studio.example", "'studio.example' is not a base URL"),
        ("public_url", "http://studio.example:port", "is not a base URL"),
    ]:
        monkeypatch.setenv(f"LIENZO_{name.upper()}", value)
        with pytest.raises(ValidationError) as refused:
            Settings()
        assert refused.value.errors()[0]["loc"] == (name,) and words in refused.value.errors()[0]["msg"]
        monkeypatch.delenv(f"LIENZO_{name.upper()}")


def test_serve_options_name_the_option_at_fault(home):
    from lienzo.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--models-dir", str(home / "models"), "serve", "--allowed-host", "studio.example:80"])
    assert result.exit_code == 2 and "--allowed-host" in result.output and "without scheme or port" in result.output
    result = runner.invoke(app, ["--models-dir", str(home / "models"), "serve", "--public-url", "studio.example"])
    assert result.exit_code == 2 and "--public-url" in result.output and "not a base URL" in result.output


# -- Origin and Sec-Fetch-Site: pages elsewhere -----------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://localhost:3000"},  # another app on this machine
        {"Origin": "null"},  # a sandboxed frame, a file:// page
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},  # a form POST
    ],
    ids=["foreign-origin", "another-port", "null-origin", "cross-site", "same-site", "form-post"],
)
@pytest.mark.parametrize("route", list(CHANGES))
def test_a_page_elsewhere_cannot_change_anything(client, headers, route):
    import_image(client)
    before = state(client)
    method, path, kwargs = CHANGES[route]
    response = client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == 403, response.text
    assert detail(response).startswith("cross-site request refused")
    assert state(client) == before


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}],
    ids=["origin", "fetch-site"],
)
def test_a_page_elsewhere_cannot_read_anything(client, headers):
    image = import_image(client)
    for path in ("/api/v1/gallery", f"/api/v1/gallery/{image}/image", "/api/v1/jobs", "/sdapi/v1/options", "/"):
        assert client.get(path, headers=headers).status_code == 403, path
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/api/v1/queue", headers={"Origin": "http://evil.example"}):
            pass
    assert closed.value.code == 1008


def test_the_studio_links_from_elsewhere_and_clients_that_are_no_browser_are_answered(client):
    studio = {"Origin": LIENZO, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert client.put("/api/v1/models/current", json={"name": "tiny-b"}, headers=studio).json()["current"]
    assert client.post("/sdapi/v1/interrupt", headers=studio).status_code == 200
    assert client.get("/api/v1/gallery", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}  # the address bar
    assert client.get("/", headers=typed).status_code == 200
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/", headers=link).status_code == 200
    assert client.get("/", headers={**link, "Sec-Fetch-Dest": "iframe"}).status_code == 403  # framed by a page elsewhere
    # curl, webuiapi and the openai package send neither Origin nor Sec-Fetch-Site.
    assert client.post("/sdapi/v1/interrupt").status_code == 200  # webuiapi: no body at all
    curl = {"Content-Type": "application/x-www-form-urlencoded"}  # curl -d ''
    assert client.post("/sdapi/v1/skip", content=b"", headers=curl).status_code == 200
    assert client.put("/api/v1/models/current", json={"name": "tiny-a"}).status_code == 200
    assert import_image(client)


def test_behind_a_proxy_that_rewrites_host_public_urls_origin_is_the_servers(home, tmp_path):
    with serve(home, tmp_path, public_url="https://studio.example") as c:
        proxied = {"Host": "127.0.0.1:7860", "Origin": "https://studio.example", "Sec-Fetch-Site": "same-origin"}
        assert c.put("/api/v1/models/current", json={"name": "tiny-b"}, headers=proxied).status_code == 200
        elsewhere = {**proxied, "Origin": "https://studio.example:8443"}
        assert c.put("/api/v1/models/current", json={"name": "tiny-a"}, headers=elsewhere).status_code == 403


def test_authentication_does_not_let_pages_elsewhere_in(home, tmp_path):
    """A browser sends saved Basic credentials with any page's request to the server."""
    with serve(home, tmp_path, auth=Auth(user="ana", password="s3cret")) as c:
        assert c.put("/api/v1/models/current", json={"name": "tiny-b"}, auth=("ana", "s3cret")).status_code == 200
        evil = {"Origin": "http://evil.example"}
        response = c.put("/api/v1/models/current", json={"name": "tiny-a"}, auth=("ana", "s3cret"), headers=evil)
        assert response.status_code == 403
        response = c.get("/api/v1/gallery", auth=("ana", "s3cret"), headers={"Host": "rebind.example"})
        assert response.status_code == 403


# -- bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, content_type",
    [
        ("POST", "/api/v1/txt2img", "text/plain"),
        ("POST", "/sdapi/v1/txt2img", "text/plain;charset=UTF-8"),
        ("POST", "/v1/images/generations", "application/x-www-form-urlencoded"),
        ("PUT", "/api/v1/models/current", "multipart/form-data; boundary=x"),
        ("POST", "/sdapi/v1/options", None),
    ],
)
def test_json_routes_refuse_other_bodies_with_415(client, method, path, content_type):
    """Bodies a page elsewhere could send without asking first; none is read as JSON."""
    before = state(client)
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({**FAST, "name": "tiny-b", "sd_model_checkpoint": "tiny-b"})
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == 415, response.text
    assert "takes a JSON body" in detail(response) and "Content-Type: application/json" in detail(response)
    assert f"(got {content_type or 'none'})" in detail(response)
    assert state(client) == before


def chunks(size: int):
    """A body sent in chunks, with no Content-Length to refuse it by: a file upload's start, then bytes."""
    yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(size // 1024):
        yield b"x" * 1024


@pytest.mark.parametrize(
    "path, content_type, where",
    [
        ("/api/v1/txt2img", "application/json", lambda r: r.json()["detail"]),
        ("/api/v1/gallery/import", "multipart/form-data; boundary=b", lambda r: r.json()["detail"]),
        ("/v1/images/edits", "multipart/form-data; boundary=b", lambda r: r.json()["error"]["message"]),
        ("/sdapi/v1/img2img", "application/json", lambda r: r.json()["detail"]),
    ],
)
def test_a_chunked_body_over_the_limit_is_413_naming_it(home, tmp_path, path, content_type, where):
    with serve(home, tmp_path, max_body_mb=0.01) as c:
        response = c.post(path, content=chunks(64 * 1024), headers={"Content-Type": content_type})
        assert response.status_code == 413, response.text
        assert "limit of 0.01 MB (max_body_mb)" in where(response)
        assert c.get("/api/v1/jobs").json() == []


# -- OpenAI links ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "public_url, link",
    [(None, f"{LIENZO}/api/v1/jobs/"), ("https://studio.example/lienzo", "https://studio.example/lienzo/api/v1/jobs/")],
)
def test_openai_url_responses_never_follow_the_requests_host(home, tmp_path, public_url, link):
    """With every Host allowed, a forged one still does not choose where the links point."""
    with serve(home, tmp_path, allowed_hosts=["*"], public_url=public_url) as c:
        body = {"prompt": "a lighthouse", "response_format": "url", "size": "64x64", "steps": 1}
        response = c.post("/v1/images/generations", json=body, headers={"Host": "attacker.example"})
        assert response.status_code == 200, response.text
        url = response.json()["data"][0]["url"]
        assert url.startswith(link) and "attacker" not in url
        assert c.get(url.removeprefix(public_url or LIENZO)).headers["content-type"] == "image/png"


# -- a real browser -------------------------------------------------------------------------------

# What a hostile page tries: every request a page may send without a CORS preflight (forms, text/plain,
# bodies without a type, bodiless POSTs), reads, and the preflighted DELETE and PUT.
ATTACK = """<!doctype html><meta charset="utf-8"><title>not lienzo</title><script type="module">
const L = "__LIENZO__";
const png = () => new Blob([Uint8Array.from(atob("__PNG__"), (c) => c.charCodeAt(0))], { type: "image/png" });
const FAST = JSON.stringify({ prompt: "pwned", steps: 1, width: 64, height: 64 });
const TEXT = { "Content-Type": "text/plain" };
const JSON_ = { "Content-Type": "application/json" };
function form(fields) {
  const data = new FormData();
  for (const [name, value] of Object.entries(fields)) value === "png" ? data.append(name, png(), "a.png") : data.append(name, value);
  return data;
}
const post = (path, init) => fetch(L + path, { method: "POST", mode: "no-cors", ...init });
const attacks = {
  openai_edit: () => post("/v1/images/edits", { body: form({ prompt: "pwned", steps: "1", image: "png" }) }),
  openai_variation: () => post("/v1/images/variations", { body: form({ steps: "1", image: "png" }) }),
  gallery_import: () => post("/api/v1/gallery/import", { body: form({ files: "png" }) }),
  interrupt: () => post("/sdapi/v1/interrupt"),
  txt2img_text_plain: () => post("/api/v1/txt2img", { headers: TEXT, body: FAST }),
  txt2img_untyped: () => post("/api/v1/txt2img", { body: new Blob([FAST]) }),
  a1111_switch_model: () => post("/sdapi/v1/options", { headers: TEXT, body: '{"sd_model_checkpoint": "tiny-b"}' }),
  read_gallery: () => fetch(L + "/api/v1/gallery"),
  read_jobs: () => fetch(L + "/api/v1/jobs"),
  delete_image: () => fetch(L + "/api/v1/gallery/__ID__", { method: "DELETE" }),
  switch_model: () => fetch(L + "/api/v1/models/current", { method: "PUT", headers: JSON_, body: '{"name": "tiny-b"}' }),
};
const results = {};
for (const [name, attack] of Object.entries(attacks)) {
  try {
    const response = await attack();
    results[name] = { type: response.type, status: response.status, body: (await response.text()).slice(0, 200) };
  } catch (err) {
    results[name] = { error: String(err) };
  }
}
window.results = results;
</script>"""

# Sent by the page with no preflight: each reaches the server, which must refuse it.
UNPREFLIGHTED = {
    "/v1/images/edits", "/v1/images/variations", "/api/v1/gallery/import", "/sdapi/v1/interrupt",
    "/api/v1/txt2img", "/sdapi/v1/options", "/api/v1/gallery", "/api/v1/jobs",
}


def attack_page(lienzo: str, image_id: int) -> str:
    return ATTACK.replace("__LIENZO__", lienzo).replace("__PNG__", base64.b64encode(PNG).decode()).replace("__ID__", str(image_id))


@pytest.fixture(scope="module")
def server(home):
    with lienzo_server(home, "--allowed-host", "studio.test", env={"LIENZO_DEFAULT_MODEL": "tiny-a"}) as url:
        yield url


def test_serve_answers_to_its_allowed_hosts_and_no_other(server):
    port = httpx.URL(server).port
    assert httpx.get(f"{server}/api/v1/queue", headers={"Host": f"studio.test:{port}"}).status_code == 200
    refused = httpx.get(f"{server}/api/v1/queue", headers={"Host": f"other.test:{port}"})
    assert refused.status_code == 403 and "allowed_hosts" in refused.json()["detail"]


@pytest.fixture(scope="module")
def planted(server):
    """An image in the gallery for the page to try to read and delete; imported by a client that is no browser."""
    response = httpx.post(f"{server}/api/v1/gallery/import", files=[("files", ("mine.png", PNG, "image/png"))])
    assert response.status_code == 200, response.text
    return response.json()["imported"][0]["id"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run installs it)")
    # evil.test and rebind.test resolve to this machine, as an attacker's names do once they rebind.
    # Chromium's own Local Network Access checks would stop some of these requests before they leave;
    # Firefox and Safari have none, and it is lienzo's checks that are tested here.
    rules = "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, rules, "--disable-features=LocalNetworkAccessChecks"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def attacker_port(server, planted):
    """A second web server on this machine: another local app, or, under another name, any web site."""
    page = attack_page(server, planted).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def run_attack(browser, url: str, lienzo: str, document: str | None = None) -> tuple[dict, set[str], dict[str, int]]:
    """Open ``url`` and let its script run: its results, the paths it sent to lienzo, and lienzo's
    answer to each that the browser saw (it sees none where CORS blocks the response).
    ``document``: the page's HTML, answered by the browser instead of the network."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    sent: set[str] = set()
    answers: dict[str, int] = {}

    def request(r):
        if r.url.startswith(lienzo) and r.url != url:
            sent.add(httpx.URL(r.url).path)

    def response(r):
        if r.url.startswith(lienzo) and r.url != url:
            answers[f"{r.request.method} {httpx.URL(r.url).path}"] = r.status

    page.on("request", request)
    page.on("response", response)
    if document is not None:
        page.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body=document))
    page.goto(url)
    page.wait_for_function("window.results !== undefined")
    results = page.evaluate("window.results")
    context.close()
    return results, sent, answers


def assert_untouched(server: str, planted: int) -> None:
    assert httpx.get(f"{server}/api/v1/jobs").json() == []
    assert [item["id"] for item in httpx.get(f"{server}/api/v1/gallery").json()["items"]] == [planted]
    assert [m["name"] for m in httpx.get(f"{server}/api/v1/models").json() if m["current"]] == ["tiny-a"]


@pytest.mark.parametrize("site", ["127.0.0.1", "evil.test"], ids=["another-local-app", "another-site"])
def test_a_page_elsewhere_can_neither_read_nor_change_anything(browser, server, planted, attacker_port, site):
    results, sent, answers = run_attack(browser, f"http://{site}:{attacker_port}/", server)
    assert sent >= UNPREFLIGHTED, sent
    assert set(answers.values()) == {403}, answers
    assert all('"items"' not in r.get("body", "") for r in results.values()), results  # the gallery's listing
    assert_untouched(server, planted)


def test_dns_rebinding_can_neither_read_nor_change_anything(browser, server, planted):
    """The page is the attacker's under rebind.test, then rebind.test resolves to lienzo: the page is
    same-origin with lienzo's port, and only the Host it sends (rebind.test) gives it away."""
    lienzo = f"http://rebind.test:{httpx.URL(server).port}"
    results, sent, answers = run_attack(browser, f"{lienzo}/", lienzo, document=attack_page("", planted))
    assert sent >= UNPREFLIGHTED | {f"/api/v1/gallery/{planted}", "/api/v1/models/current"}, sent
    assert set(answers.values()) == {403}, answers
    assert all('"items"' not in r["body"] for r in results.values()), results
    assert_untouched(server, planted)
