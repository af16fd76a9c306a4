"""Krea 2's LoRAs, in diffusers' names and Krea's own (its trainer's and ComfyUI's): each layer gets W + weight * alpha / rank * B A,
and the picture changes, and comes back when the LoRA is taken off."""

import pytest
import torch
from test_transformer_lora import Layer, _probe, _write
from tiny_models import build_tiny

from lienzo.generation.engine import generate
from lienzo.generation.request import GenerationRequest
from lienzo.models.lora import apply_loras

BLOCK = "transformer_blocks.0"
LORA_FORMATS = {
    "diffusers": [
        Layer(f"transformer.{BLOCK}.attn.to_q", "transformer", (f"{BLOCK}.attn.to_q",), 4),
        Layer(f"transformer.{BLOCK}.ff.up", "transformer", (f"{BLOCK}.ff.up",), 2, 4.0),
    ],
    # Krea's reference trainer / ComfyUI: Krea's own module names under diffusion_model.
    "comfyui": [
        Layer("diffusion_model.blocks.0.attn.wv", "transformer", (f"{BLOCK}.attn.to_v",), 4, 2.0),
        Layer("diffusion_model.blocks.1.mlp.down", "transformer", ("transformer_blocks.1.ff.down",), 2),
    ],
}


def _picture(components, *loras):
    request = GenerationRequest(
        prompt="a red apple", width=64, height=64, steps=2, seed=3, sampler="Euler", schedule="Simple", loras=list(loras)
    )
    return generate(components, request).images[0].pixels


@pytest.mark.parametrize("fmt", list(LORA_FORMATS))
def test_krea2_loras_add_weight_times_alpha_over_rank_times_b_a(tmp_path, fmt):
    components = build_tiny("krea2")
    path = tmp_path / f"{fmt}.safetensors"
    expected = _write(path, components, LORA_FORMATS[fmt], "peft")
    probes = _probe(components, expected)
    original = _picture(components)
    apply_loras(components, [(path, "style", 0.5)])
    for key, (down, up, scale) in expected.items():
        x, base_weight, bias = probes[key]
        with torch.no_grad():
            got = components.transformer.get_submodule(key[1])(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, base_weight + 0.5 * scale * up @ down, bias), atol=1e-5, rtol=1e-5)
    assert (_picture(components, ("style", 0.5)) != original).any()
    apply_loras(components, [])
    # Taken off, the LoRA's layers stay wrapped (lienzo keeps a LoRA loaded for the next job): the picture comes
    # back to float rounding (4e-7 measured; other families' come back bit-exact), well below one 8-bit step.
    assert abs(_picture(components) - original).max() < 1e-5
