"""Tiling (seamless textures): circular padding in the U-Net and VAE for one job, and only for it.

The tiny random models cannot show a texture that visibly tiles (two steps from noise stay noise, and
i.i.d. noise has no more in common across the wrap-around edge with tiling than without: measured,
the first/last column difference does not reliably drop). What tiling means is tested exactly instead:
with circular padding the networks, and the whole engine, commute with a circular shift of their
input, so no column is an edge; without it they do not.
"""

import numpy as np
import pytest
import torch
from torch import nn

from lienzo.generation import engine, latents
from lienzo.generation.deepcache import DeepCacheUNet
from lienzo.generation.request import build_request
from lienzo.generation.tiling import circular_padding, padded_convs, seamless
from tiny_models import build_tiny

PROMPT = "a mossy stone wall"


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _modes(components) -> list[str]:
    return [m.padding_mode for part in (components.unet, components.vae) for m in part.modules() if isinstance(m, nn.Conv2d)]


def _unet(components, x: torch.Tensor) -> torch.Tensor:
    embeds = torch.randn(1, 77, components.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return components.unet(x, torch.tensor(500), encoder_hidden_states=embeds).sample


def _decoder(components, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return components.vae.decode(z).sample


def _shifted_equals(net, x: torch.Tensor, shift: int, factor: int) -> bool:
    """Whether ``net(roll(x, shift)) == roll(net(x), shift * factor)``, along both axes."""
    out = net(x)
    rolled = net(torch.roll(x, (shift, 2 * shift), dims=(-2, -1)))
    return torch.allclose(rolled, torch.roll(out, (shift * factor, 2 * shift * factor), dims=(-2, -1)), atol=1e-4)


def test_every_padded_conv_is_switched_and_put_back(sd1):
    before = _modes(sd1)
    convs = padded_convs(sd1.unet, sd1.vae)
    # The U-Net's and both VAE halves' 3x3 convolutions; the 1x1 shortcuts and the quant convs pad nothing.
    assert {id(c) for c in convs} >= {id(sd1.unet.conv_in), id(sd1.vae.encoder.conv_in), id(sd1.vae.decoder.conv_out)}
    assert all(any(p for p in c.padding) for c in convs) and id(sd1.vae.post_quant_conv) not in {id(c) for c in convs}
    with circular_padding(sd1.unet, sd1.vae, on=True):
        assert all(c.padding_mode == "circular" for c in convs)
        assert sd1.vae.post_quant_conv.padding_mode == "zeros"
    assert _modes(sd1) == before
    with circular_padding(sd1.unet, sd1.vae, on=False):
        assert _modes(sd1) == before
    with pytest.raises(RuntimeError, match="boom"), circular_padding(sd1.unet, sd1.vae, on=True):
        raise RuntimeError("boom")
    assert _modes(sd1) == before


def test_a_conv_keeps_its_own_mode():
    reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with circular_padding(nn.Sequential(reflect), on=True):
        assert reflect.padding_mode == "circular"
    assert reflect.padding_mode == "reflect"


def test_wrapped_unets_are_found(sd1):
    convs = {id(c) for c in padded_convs(sd1.unet)}
    assert {id(c) for c in padded_convs(DeepCacheUNet(sd1.unet))} == convs
    assert {id(c) for c in padded_convs(torch.compile(sd1.unet, backend="eager"))} == convs  # OptimizedModule


def test_unet_is_circularly_equivariant_with_tiling(sd1):
    # One downsampler in the tiny U-Net: shifts by a multiple of 2 latents commute with it.
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    def net(v):
        return _unet(sd1, v)
    with circular_padding(sd1.unet, on=True):
        assert _shifted_equals(net, x, 2, 1)
    assert not _shifted_equals(net, x, 2, 1)


def test_vae_decoder_is_circularly_equivariant_with_tiling(sd1):
    factor = sd1.vae_scale_factor  # 2 for the tiny VAE (8 for SD's)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    def net(v):
        return _decoder(sd1, v)
    with circular_padding(sd1.vae, on=True):
        assert _shifted_equals(net, z, 3, factor)
    assert not _shifted_equals(net, z, 3, factor)


def _rolling_noise(monkeypatch, shift: int) -> None:
    """The engine's starting noise, rolled circularly by ``shift`` latents (rows) and ``2 * shift`` (columns)."""
    real = latents.batch_noise

    def rolled(*args, **kwargs):
        return torch.roll(real(*args, **kwargs), (shift, 2 * shift), dims=(-2, -1))

    monkeypatch.setattr(latents, "batch_noise", rolled)


@pytest.mark.parametrize("fast", [False, True])
def test_tiling_image_has_no_edges(sd1, monkeypatch, fast):
    """End to end: with tiling, rolling the starting noise rolls the picture (every step and the decode
    wrap around, so the picture's border is like any other column); without it, it does not."""
    fields = dict(prompt=PROMPT, seed=7, steps=2, width=64, height=64, sampler="Euler", fast=fast)
    factor, shift = sd1.vae_scale_factor, 4  # latents: a multiple of the U-Net's downsampling (2)
    plain, tiled = (engine.generate(sd1, build_request(**fields, tiling=t)).images[0].pixels for t in (False, True))
    assert not np.array_equal(plain, tiled)
    _rolling_noise(monkeypatch, shift)
    plain_rolled, tiled_rolled = (engine.generate(sd1, build_request(**fields, tiling=t)).images[0].pixels for t in (False, True))
    pixels = (shift * factor, 2 * shift * factor)
    np.testing.assert_allclose(tiled_rolled, np.roll(tiled, pixels, axis=(0, 1)), atol=1e-4)
    assert not np.allclose(plain_rolled, np.roll(plain, pixels, axis=(0, 1)), atol=1e-2)


def test_a_tiling_job_leaves_the_model_as_it_was(sd1):
    fields = dict(prompt=PROMPT, seed=3, steps=2, width=64, height=64, sampler="Euler a")
    before_modes = _modes(sd1)
    before = engine.generate(sd1, build_request(**fields)).images[0]
    engine.generate(sd1, build_request(**fields, tiling=True, batch_size=2))
    assert _modes(sd1) == before_modes
    after = engine.generate(sd1, build_request(**fields)).images[0]
    assert np.array_equal(after.pixels, before.pixels) and after.image.tobytes() == before.image.tobytes()


def test_a_cancelled_tiling_job_puts_the_padding_back(sd1):
    from lienzo.errors import GenerationCancelled

    before = _modes(sd1)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # past the prompt's encode, into the steps

    with pytest.raises(GenerationCancelled):
        engine.generate(sd1, build_request(prompt=PROMPT, seed=1, steps=4, width=64, height=64, tiling=True), cancel=cancel)
    assert _modes(sd1) == before


def test_tiling_img2img_and_a_tiled_vae(monkeypatch):
    """img2img encodes its picture inside the job; a VAE set to decode and encode in tiles does neither
    for a tiling job (a tile would wrap onto itself), and gets its own setting back."""
    components = build_tiny("sd1")
    components.vae_tiling, components.vae.use_tiling = "on", True
    seen = []
    real_decode, real_encode = type(components.vae).decode, type(components.vae).encode

    def decode(vae, *args, **kwargs):
        seen.append(("decode", vae.use_tiling, vae.decoder.conv_out.padding_mode))
        return real_decode(vae, *args, **kwargs)

    def encode(vae, *args, **kwargs):
        seen.append(("encode", vae.use_tiling, vae.encoder.conv_in.padding_mode))
        return real_encode(vae, *args, **kwargs)

    monkeypatch.setattr(type(components.vae), "decode", decode)
    monkeypatch.setattr(type(components.vae), "encode", encode)
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    from PIL import Image

    init = Image.fromarray(np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1))
    fields = dict(prompt=PROMPT, seed=5, steps=2, init_image=init, denoising_strength=0.6, sampler="Euler")
    tiled = engine.generate(components, build_request(**fields, tiling=True)).images[0]
    assert seen == [("encode", False, "circular"), ("decode", False, "circular")]
    assert components.vae.use_tiling and components.vae_tiling == "on"
    seen.clear()
    plain = engine.generate(components, build_request(**fields)).images[0]
    assert seen == [("encode", True, "zeros"), ("decode", True, "zeros")]
    assert not np.array_equal(plain.pixels, tiled.pixels)


def test_seamless_off_touches_nothing(sd1):
    sd1.vae.use_tiling = False
    with seamless(sd1, False):
        assert sd1.unet.conv_in.padding_mode == "zeros"
    with seamless(sd1, True):
        assert sd1.unet.conv_in.padding_mode == "circular" and sd1.vae.decoder.conv_in.padding_mode == "circular"
    assert sd1.unet.conv_in.padding_mode == "zeros"
