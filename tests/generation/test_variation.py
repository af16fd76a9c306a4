"""Variation seeds and seed resize, as AUTOMATIC1111 makes them: the noise equals A1111's construction
number for number (its CPU noise source), a batch keeps its seed and counts up its variation seeds,
and each image is remade alone from its infotext."""

import numpy as np
import pytest
import torch

from lienzo.generation import engine
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.noise import Variation, image_generators, varied_noise
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny

SHAPE = (4, 8, 8)


def a1111_noise(shape, seeds, subseeds, strength, resize_h, resize_w):
    """A1111's first noise of a batch (modules/rng.py, randn_source CPU), written from its rules: the
    global generator reseeded for each draw, per-image generators for the full-size draw, slerp along
    dim 1, the drawn noise centred."""

    def randn(seed, size, generator=None):
        torch.manual_seed(seed)
        return torch.randn(size, generator=generator)

    def slerp(val, low, high):
        a, b = low / torch.norm(low, dim=1, keepdim=True), high / torch.norm(high, dim=1, keepdim=True)
        dot = (a * b).sum(1)
        if dot.mean() > 0.9995:
            return low * val + high * (1 - val)
        omega = torch.acos(dot)
        return (torch.sin((1.0 - val) * omega) / torch.sin(omega)).unsqueeze(1) * low + (torch.sin(val * omega) / torch.sin(omega)).unsqueeze(1) * high

    drawn = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
    out = []
    for i, seed in enumerate(seeds):
        generator = torch.Generator("cpu").manual_seed(seed)
        sub = randn(subseeds[i], drawn) if strength != 0 else None
        noise = randn(seed, drawn) if drawn != shape else randn(seed, shape, generator=generator)
        if sub is not None:
            noise = slerp(strength, noise, sub)
        if drawn != shape:
            x = randn(seed, shape, generator=generator)
            dx, dy = (shape[2] - drawn[2]) // 2, (shape[1] - drawn[1]) // 2
            w = drawn[2] if dx >= 0 else drawn[2] + 2 * dx
            h = drawn[1] if dy >= 0 else drawn[1] + 2 * dy
            x[:, max(dy, 0) : max(dy, 0) + h, max(dx, 0) : max(dx, 0) + w] = noise[:, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
            noise = x
        out.append(noise)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("strength", "resize"),
    [(0.1, (0, 0)), (0.5, (0, 0)), (1.0, (0, 0)), (0.0, (48, 40)), (0.3, (96, 80)), (0.3, (40, 96))],
    ids=["0.1", "0.5", "1.0", "resize-smaller", "resize-larger-and-vary", "resize-mixed"],
)
def test_noise_is_a1111s_number_for_number(strength, resize):
    seeds, subseeds = [1234, 1234], (99, 100)
    variation = Variation(subseeds, strength, resize)
    ours = varied_noise(image_generators(seeds), seeds, variation, SHAPE)
    reference = a1111_noise(SHAPE, seeds, subseeds, strength, resize[1], resize[0])
    assert torch.equal(ours, reference)
    assert not torch.equal(ours[0], ours[1]) or strength == 0


def test_strength_one_is_the_variation_seeds_noise_and_zero_the_seeds():
    seeds = [5]
    full = varied_noise(image_generators(seeds), seeds, Variation((6,), 1.0), SHAPE)[0]
    torch.testing.assert_close(full, torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


BASE = dict(prompt="a fox", steps=3, width=64, height=64, seed=7, sampler="Euler a")


def test_a_variation_batch_keeps_its_seed_counts_up_its_variation_seeds_and_remakes_alone(sd1):
    result = engine.generate(sd1, build_request(**BASE, subseed=100, subseed_strength=0.3, batch_size=2, batch_count=2))
    infos = [parse_infotext(image.infotext).params for image in result.images]
    assert [image.seed for image in result.images] == [7, 7, 7, 7]
    assert [info["Variation seed"] for info in infos] == ["100", "101", "102", "103"]
    assert {info["Variation seed strength"] for info in infos} == {"0.3"}
    assert len({image.pixels.tobytes() for image in result.images}) == 4
    fields = fields_from_infotext(parse_infotext(result.images[3].infotext))
    assert (fields["subseed"], fields["subseed_strength"]) == (103, 0.3)
    fields.pop("model")
    alone = engine.generate(sd1, build_request(**fields)).images[0]
    assert np.abs(alone.pixels - result.images[3].pixels).max() <= 1e-4  # batched arithmetic, as for any batch


def test_strength_zero_is_the_plain_picture_and_resize_changes_it(sd1):
    plain = engine.generate(sd1, build_request(**BASE)).images[0]
    zero = engine.generate(sd1, build_request(**BASE, subseed=100, subseed_strength=0.0)).images[0]
    assert plain.pixels.tobytes() == zero.pixels.tobytes() and "Variation seed" not in zero.infotext
    resized = engine.generate(sd1, build_request(**BASE, seed_resize_from_w=48, seed_resize_from_h=48)).images[0]
    assert parse_infotext(resized.infotext).params["Seed resize from"] == "48x48"
    assert resized.pixels.tobytes() != plain.pixels.tobytes()
    small = engine.generate(sd1, build_request(**BASE, seed_resize_from_w=48, seed_resize_from_h=-1)).images[0]
    assert small.pixels.tobytes() == plain.pixels.tobytes()  # one side unset: off, as in A1111


def test_a_random_variation_seed_is_recorded(sd1):
    result = engine.generate(sd1, build_request(**BASE, subseed_strength=0.2))
    recorded = int(parse_infotext(result.images[0].infotext).params["Variation seed"])
    assert result.request.subseed == recorded and 0 <= recorded < 2**32
