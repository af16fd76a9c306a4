"""The field table at the server's doors: ``GET /api/v1/fields``, and a field added to the table
(``tiling``) taken by lienzo's API, the A1111 API (as a field and as its 1.6+ setting) and the OpenAI
API, each making the same picture and writing it into the infotext."""

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.generation.request import table
from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from servers import home_settings, two_model_home

SAME = {"prompt": "a brick wall", "steps": 2, "seed": 21, "cfg_scale": 5}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = two_model_home(tmp_path_factory.mktemp("fields-home"))
    with TestClient(create_app(home_settings(home, data=home / "data", out=home / "out", watermark=False))) as c:
        yield c


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_fields_lists_the_table_with_every_doors_names(client):
    fields = client.get("/api/v1/fields").json()
    assert [f["name"] for f in fields] == [row.name for row in table()]
    tiling = next(f for f in fields if f["name"] == "tiling")
    assert tiling["label"] == "Tiling" and tiling["type"] == "boolean" and tiling["default"] is False
    assert tiling["names"] == {"cli": "--tiling", "a1111": "tiling", "openai": "tiling", "infotext": "Tiling"}
    assert tiling["widget"] == {"kind": "check"} and tiling["modes"] == ["txt2img", "img2img", "inpaint", "outpaint"]
    strength = next(f for f in fields if f["name"] == "denoising_strength")
    assert strength["limits"] == {"minimum": 0, "maximum": 1} and strength["mode_defaults"] == {"outpaint": 0.8}
    width = next(f for f in fields if f["name"] == "width")
    assert width["nullable"] and width["limits"]["multipleOf"] == 8 and width["names"]["infotext"] == "Size"
    fill = next(f for f in fields if f["name"] == "inpainting_fill")
    assert fill["type"] == "choice" and fill["choices"] == ["fill", "original", "latent noise", "latent nothing"]


def test_tiling_through_every_api_gives_one_picture(client):
    native = client.post("/api/v1/txt2img?wait=true", json={**SAME, "width": 64, "height": 64, "sampler": "Euler", "tiling": True}).json()
    assert native["status"] == "done" and native["parameters"]["tiling"] is True
    by_native = png(client.get(native["images"][0]["url"]).content)
    assert parse_infotext(by_native.info["parameters"]).params["Tiling"] == "True"

    a1111 = {**SAME, "width": 64, "height": 64, "sampler_name": "Euler"}
    answer = client.post("/sdapi/v1/txt2img", json={**a1111, "tiling": True}).json()
    by_field = png(base64.b64decode(answer["images"][0]))
    assert "tiling=True" not in str(answer["info"])  # used, so not reported as ignored
    setting = client.post("/sdapi/v1/txt2img", json={**a1111, "override_settings": {"tiling": True}}).json()
    by_setting = png(base64.b64decode(setting["images"][0]))
    plain = png(base64.b64decode(client.post("/sdapi/v1/txt2img", json=a1111).json()["images"][0]))

    openai = client.post("/v1/images/generations", json={**SAME, "size": "64x64", "sampler": "Euler", "tiling": True}).json()
    by_openai = png(base64.b64decode(openai["data"][0]["b64_json"]))

    for image in (by_field, by_setting, by_openai):
        assert image.tobytes() == by_native.tobytes()
        assert parse_infotext(image.info["parameters"]).params["Tiling"] == "True"
    assert plain.tobytes() != by_native.tobytes() and "Tiling" not in parse_infotext(plain.info["parameters"]).params


def test_a_tiling_of_the_wrong_type_is_named_at_each_door(client):
    assert client.post("/api/v1/txt2img", json={**SAME, "tiling": "sometimes"}).json()["field"] == "tiling"
    assert client.post("/sdapi/v1/txt2img", json={**SAME, "tiling": "sometimes"}).status_code == 422
    response = client.post("/v1/images/generations", json={**SAME, "tiling": "sometimes"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tiling"


def test_variation_seeds_through_the_a1111_api_answer_as_a1111_does(client):
    import json

    body = {**SAME, "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 2, "subseed": 40, "subseed_strength": 0.2}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [21, 21] and info["all_subseeds"] == [40, 41] and info["subseed_strength"] == 0.2
    assert not any("subseed" in ignored for ignored in info["ignored"])
    assert [parse_infotext(text).params["Variation seed"] for text in info["infotexts"]] == ["40", "41"]


def test_a_plot_queues_one_job_per_cell_with_the_cells_values(client):
    import time

    body = {**SAME, "width": 64, "height": 64, "seed": -1, "x": "steps=1,2", "y": "cfg=3,6", "z": "sampler=Euler,DDIM"}
    response = client.post("/api/v1/plot", json=body)
    assert response.status_code == 202, response.text
    plot = response.json()
    assert plot["x"] == {"field": "steps", "title": "Steps", "labels": ["1", "2"]} and plot["z"]["labels"] == ["Euler", "DDIM"]
    assert len(plot["cells"]) == 8 and len({c["job"] for c in plot["cells"]}) == 8
    deadline = time.monotonic() + 120
    jobs = {}
    for cell in plot["cells"]:
        while (job := client.get(f"/api/v1/jobs/{cell['job']}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        jobs[(cell["z"], cell["y"], cell["x"])] = job
    assert {j["status"] for j in jobs.values()} == {"done"}
    made = jobs[(1, 1, 0)]["parameters"]
    assert (made["steps"], made["cfg_scale"], made["sampler"], made["seed"], made["batch_size"]) == (1, 6.0, "DDIM", plot["seed"], 1)


def test_a_bad_plot_queues_nothing_and_names_its_axis(client):
    before = len(client.get("/api/v1/jobs").json())
    response = client.post("/api/v1/plot", json={**SAME, "x": "steps=1,2", "y": "cfg=3,99"})
    assert response.status_code == 422 and response.json()["field"] == "y" and "cfg_scale = 99" in response.json()["detail"]
    response = client.post("/api/v1/plot", json={**SAME, "x": "colour=red"})
    assert response.status_code == 422 and response.json()["field"] == "x"
    assert len(client.get("/api/v1/jobs").json()) == before


def test_styles_are_merged_at_every_api_and_an_unknown_one_is_the_clients_error(client):
    assert client.put("/api/v1/presets/Dusk", json={"prompt": "{prompt} at dusk", "negative_prompt": "noon"}).status_code == 200
    job = client.post("/api/v1/txt2img?wait=true", json={**SAME, "width": 64, "height": 64, "styles": ["dusk"]}).json()
    assert (job["parameters"]["prompt"], job["parameters"]["negative_prompt"], job["parameters"]["styles"]) == ("a brick wall at dusk", "noon", [])
    info = parse_infotext(png(client.get(job["images"][0]["url"]).content).info["parameters"])
    assert info.prompt == "a brick wall at dusk"
    refused = client.post("/api/v1/txt2img", json={**SAME, "styles": ["Dawn"]})
    assert refused.status_code == 422 and refused.json()["field"] == "styles" and "saved styles: Dusk" in refused.json()["detail"]
    a1111 = client.post("/sdapi/v1/txt2img", json={**SAME, "width": 64, "height": 64, "styles": ["Dusk", "Dawn"]}).json()
    import json

    info = json.loads(a1111["info"])
    assert parse_infotext(info["infotexts"][0]).prompt == "a brick wall at dusk" and any("Dawn" in w for w in info["warnings"])


def test_a1111s_xyz_plot_script_answers_the_grid_then_each_picture(client):
    import json

    # A1111 1.10's txt2img axes: 4 is Steps, 6 CFG Scale, 9 Sampler (its values from the dropdown).
    args = [4, "1-2", [], 9, "", ["Euler", "DDIM"], 0, "", [], True, True, False, False, False, False, False, 0, False]
    body = {**SAME, "width": 64, "height": 64, "script_name": "X/Y/Z plot", "script_args": args}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    images = [png(base64.b64decode(b64)) for b64 in answer["images"]]
    assert len(images) == 5 and images[0].width > 2 * 64 and images[0].height > 2 * 64
    info = json.loads(answer["info"])
    made = [parse_infotext(text).params for text in info["infotexts"][1:]]
    assert [(p["Steps"], p["Sampler"]) for p in made] == [("1", "Euler"), ("2", "Euler"), ("1", "DDIM"), ("2", "DDIM")]
    assert len({p["Seed"] for p in made}) == 1  # one seed for the plot, drawn once
    assert info["index_of_first_image"] == 1
