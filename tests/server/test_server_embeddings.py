"""A1111's textual-inversion endpoints: GET /sdapi/v1/embeddings (the current model's, loaded and skipped, with
A1111's fields) and POST /sdapi/v1/refresh-embeddings, and a txt2img whose prompt names an embedding."""

import json

import torch
from fastapi.testclient import TestClient

from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from servers import home_settings


def save_a1111(path, count: int, width: int = 64) -> None:
    """As A1111's ``Embedding.save`` writes it."""
    vec = torch.randn(count, width, generator=torch.Generator().manual_seed(count))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": path.stem, "step": 100 * count}
    torch.save({**data, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd15"}, path)


def test_embeddings_listed_used_in_txt2img_and_refreshed(home, tmp_path):
    directory = home / "models" / "embeddings"
    directory.mkdir(exist_ok=True)
    save_a1111(directory / "srv-emb.pt", 2)
    save_a1111(directory / "srv-wide.pt", 1, width=32)
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out", model="tiny-sd15")
    with TestClient(create_app(settings)) as client:
        body = {"prompt": "a srv-emb apple", "steps": 2, "width": 64, "height": 64, "seed": 5}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert parse_infotext(infotext).params["TI hashes"].startswith("srv-emb: ")

        listed = client.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"] == {
            "srv-emb": {"step": 200, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd15", "shape": 64, "vectors": 2}
        }
        assert listed["skipped"] == {
            "srv-wide": {"step": 100, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd15", "shape": 32, "vectors": 1}
        }

        save_a1111(directory / "srv-new.pt", 3)
        assert "srv-new" not in client.get("/sdapi/v1/embeddings").json()["loaded"]  # read on refresh, as A1111 does
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["srv-new"]["vectors"] == 3
        assert client.get("/sdapi/v1/cmd-flags").json()["embeddings_dir"] == str(directory)
