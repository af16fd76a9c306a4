"""Fixtures the generation tests share."""

import pytest

from lienzo.generation import prompts


@pytest.fixture
def encoded(monkeypatch):
    """Every text the engine encodes, in order."""
    texts: list[str] = []
    real = prompts.encode_prompt

    def counting(components, text, **kwargs):
        texts.append(text)
        return real(components, text, **kwargs)

    monkeypatch.setattr(prompts, "encode_prompt", counting)
    return texts
