"""Huge prompts: refused when they are submitted, and a long one that is allowed can be cancelled
while it is encoded (issue 17: a 2 MB prompt was cancelled 35 s after the request)."""

import pytest
from fastapi.testclient import TestClient

from lienzo.errors import GenerationCancelled, InvalidRequestError
from lienzo.generation import engine
from lienzo.generation.prompts import tokenize_prompt
from lienzo.generation.request import MAX_PROMPT_CHARS, build_request
from lienzo.server.app import create_app
from lienzo.settings import Settings
from tiny_models import build_tiny

OVER = "a fox, " * (MAX_PROMPT_CHARS // 7 + 1)  # just past the limit, in words a tokenizer would take


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_limit_is_refused_naming_the_field_and_the_limit(field):
    with pytest.raises(InvalidRequestError) as refused:
        build_request(**{field: OVER})
    assert refused.value.field == field
    assert str(refused.value) == f"{field}: {field} is {len(OVER):,} characters long; the limit is {MAX_PROMPT_CHARS:,}"
    assert len(build_request(**{field: OVER[:MAX_PROMPT_CHARS]}).model_dump()[field]) == MAX_PROMPT_CHARS


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/api/v1/txt2img", {"prompt": OVER}, 422, "prompt"),
        ("/api/v1/txt2img", {"prompt": "a fox", "negative_prompt": OVER}, 422, "negative_prompt"),
        ("/sdapi/v1/txt2img", {"prompt": OVER}, 422, "prompt"),
        ("/v1/images/generations", {"prompt": OVER}, 400, "prompt"),
    ],
    ids=["native", "native-negative", "a1111", "openai"],
)
def test_every_api_refuses_a_prompt_over_the_limit_at_submit(home, tmp_path, path, body, status, field):
    settings = Settings(data_dir=tmp_path / "data", models_dir=home / "models", outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings)) as client:
        answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text[:300]
        assert f"the limit is {MAX_PROMPT_CHARS:,}" in answer.text and field in answer.text
        assert client.get("/api/v1/jobs").json() == []  # refused before it became a job


def test_the_cli_refuses_a_prompt_over_the_limit_in_one_line(lienzo):
    result = lienzo("generate", OVER, "--steps", "1", code=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"prompt is {len(OVER):,} characters long; the limit is {MAX_PROMPT_CHARS:,}" in lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def test_a_long_prompt_is_cancelled_while_it_is_encoded(sd1):
    """The cancel check runs between the prompt's 75-token chunks, not only before the first step."""
    prompt = "a red fox in a snowy forest, " * 300  # 2,400 tokens
    assert len(tokenize_prompt(sd1.tokenizer, prompt)) > 30  # chunks, and as many for the negative prompt
    encoded = []
    hook = sd1.text_encoder.register_forward_hook(lambda *_: encoded.append(1))
    try:
        with pytest.raises(GenerationCancelled):
            # The user cancels while the third chunk is being encoded.
            engine.generate(sd1, build_request(prompt=prompt, steps=2, width=64, height=64), cancel=lambda: len(encoded) >= 3)
        assert len(encoded) == 3
    finally:
        hook.remove()
