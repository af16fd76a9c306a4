"""ControlNet units in the one loop: against diffusers' ControlNet pipelines, and the extension's schedule and modes."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
from diffusers import MultiControlNetModel

from lienzo.errors import InvalidRequestError, LienzoError
from lienzo.generation import engine
from lienzo.generation.control import Control, ControlStack, _Prepared, control_image
from lienzo.generation.control_unit import ControlUnit
from lienzo.generation.plan import Resources
from lienzo.generation.request import build_request
from pictures import control_map as _map
from tiny_models import build_tiny, tiny_controlnet

PROMPT = "a fox in a forest"


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def nets(sd1):
    return tiny_controlnet(sd1.unet, 1), tiny_controlnet(sd1.unet, 2)


def _unit(**fields) -> ControlUnit:
    return ControlUnit(image=_map(0), model="tiny", **fields)


def _run(sd1, controls: list[tuple], **fields):
    """A picture with ``controls``: (unit, network, control map) triples, prepared as the service would."""
    units = [unit for unit, _, _ in controls]
    request = build_request(prompt=PROMPT, negative_prompt="blurry", steps=4, cfg_scale=6.0, sampler="Euler", schedule="DDIM", seed=21, width=64, height=64,
                            controlnets=units, **fields)
    resources = Resources(tuple(Control(unit, net, image) for unit, net, image in controls))
    return engine.generate(sd1, request, resources=resources).images[0]


def _pipeline(sd1, controlnet):
    return StableDiffusionControlNetPipeline(
        vae=sd1.vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer, unet=sd1.unet, controlnet=controlnet,
        scheduler=EulerDiscreteScheduler.from_config(sd1.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def test_one_unit_matches_diffusers_controlnet_pipeline(sd1, nets):
    ref = _pipeline(sd1, nets[0])(
        PROMPT, negative_prompt="blurry", image=_map(0), num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=0.8,
        height=64, width=64, generator=torch.Generator().manual_seed(21), output_type="np",
    ).images[0]
    ours = _run(sd1, [(_unit(weight=0.8), nets[0], _map(0))])
    assert np.abs(ours.pixels - ref).max() <= 1e-4


def test_two_units_match_diffusers_multi_controlnet(sd1, nets):
    ref = _pipeline(sd1, MultiControlNetModel(list(nets)))(
        PROMPT, negative_prompt="blurry", image=[_map(0), _map(1)], num_inference_steps=4, guidance_scale=6.0,
        controlnet_conditioning_scale=[1.0, 0.5], height=64, width=64, generator=torch.Generator().manual_seed(21), output_type="np",
    ).images[0]
    ours = _run(sd1, [(_unit(), nets[0], _map(0)), (_unit(weight=0.5), nets[1], _map(1))])
    assert np.abs(ours.pixels - ref).max() <= 1e-4
    alone = _run(sd1, [(_unit(), nets[0], _map(0))])
    assert np.abs(ours.pixels - alone.pixels).max() > 1e-3  # the second unit counts


def test_weight_zero_and_a_window_outside_the_steps_change_nothing(sd1, nets):
    plain = engine.generate(sd1, build_request(prompt=PROMPT, negative_prompt="blurry", steps=4, cfg_scale=6.0, sampler="Euler", schedule="DDIM",
                                               seed=21, width=64, height=64)).images[0]
    zero = _run(sd1, [(_unit(weight=0.0), nets[0], _map(0))])
    assert np.abs(zero.pixels - plain.pixels).max() <= 1e-5
    # 4 steps: shares done 0, 0.25, 0.5, 0.75; a window of (0.8, 1] holds none of them.
    late = _run(sd1, [(_unit(guidance_start=0.8, guidance_end=1.0), nets[0], _map(0))])
    assert np.abs(late.pixels - plain.pixels).max() <= 1e-5
    full = _run(sd1, [(_unit(), nets[0], _map(0))])
    early = _run(sd1, [(_unit(guidance_end=0.3), nets[0], _map(0))])
    assert np.abs(early.pixels - plain.pixels).max() > 1e-3 and np.abs(early.pixels - full.pixels).max() > 1e-3


def test_the_extension_window_counts_both_ends():
    unit = _unit(guidance_start=0.25, guidance_end=0.5)
    assert [unit.active(step, 4) for step in range(4)] == [False, True, True, False]


def _residuals(sd1, net, unit: ControlUnit, rows: int = 2, uncond: int = 1):
    image = control_image(Control(unit, net, _map(0)), 64, 64, "cpu", torch.float32)
    stack = ControlStack((_Prepared(Control(unit, net, _map(0)), image),), 4)
    torch.manual_seed(0)
    x = torch.randn(rows, 4, 32, 32)  # the tiny VAE halves: 64 pixels are 32 latents
    embeds = torch.randn(rows, 77, sd1.unet.config.cross_attention_dim)
    return stack.residuals(x, torch.tensor(500), 0, embeds, None, uncond), (x, embeds, image)


def test_control_modes_scale_and_place_the_residuals_as_the_extension_does(sd1, nets):
    net = nets[0]
    balanced, (x, embeds, image) = _residuals(sd1, net, _unit(weight=0.7))
    with torch.no_grad():
        down, mid = net(x, torch.tensor(500), encoder_hidden_states=embeds, controlnet_cond=image.expand(2, -1, -1, -1), return_dict=False)
    count = len(down) + 1
    for got, want in zip(balanced["down_block_additional_residuals"], down, strict=True):
        torch.testing.assert_close(got, want * 0.7)
    prompt, _ = _residuals(sd1, net, _unit(weight=0.7, control_mode="My prompt is more important"))
    for i, (got, want) in enumerate(zip(prompt["down_block_additional_residuals"], down, strict=True)):
        torch.testing.assert_close(got, want * 0.7 * 0.825 ** (12 - i))
    torch.testing.assert_close(prompt["mid_block_additional_residual"], mid * 0.7 * 0.825 ** (12 - (count - 1)))
    control, _ = _residuals(sd1, net, _unit(weight=0.7, control_mode="ControlNet is more important"))
    for i, got in enumerate(control["down_block_additional_residuals"]):
        assert not got[0].any()  # the unconditional row gets nothing
        torch.testing.assert_close(got[1:], prompt["down_block_additional_residuals"][i][1:], atol=1e-5, rtol=1e-4)


def test_prompt_more_important_steers_less_than_balanced(sd1, nets):
    plain = engine.generate(sd1, build_request(prompt=PROMPT, negative_prompt="blurry", steps=4, cfg_scale=6.0, sampler="Euler", schedule="DDIM",
                                               seed=21, width=64, height=64)).images[0].pixels
    balanced = _run(sd1, [(_unit(), nets[0], _map(0))]).pixels
    soft = _run(sd1, [(_unit(control_mode="My prompt is more important"), nets[0], _map(0))]).pixels
    assert 0 < np.abs(soft - plain).mean() < np.abs(balanced - plain).mean()


def test_units_are_refused_when_not_prepared_and_on_transformer_families(sd1):
    request = build_request(prompt=PROMPT, steps=2, width=64, height=64, controlnets=[_unit()])
    with pytest.raises(LienzoError, match="prepare_resources"):
        engine.generate(sd1, request)
    with pytest.raises(InvalidRequestError, match="fast"):
        engine.generate(sd1, build_request(prompt=PROMPT, steps=2, width=64, height=64, controlnets=[_unit()], fast=True),
                        resources=Resources((Control(_unit(), None, _map(0)),)))


def test_infotext_writes_the_units_as_the_extension_and_reads_them_back(sd1, nets):
    from lienzo.generation.infotext import fields_from_infotext
    from lienzo.images.metadata import parse_infotext

    unit = _unit(weight=0.8, guidance_end=0.9, control_mode="My prompt is more important")
    image = _run(sd1, [(unit, nets[0], _map(0))])
    params = parse_infotext(image.infotext).params
    assert params["ControlNet 0"] == (
        "Module: none, Model: tiny, Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: 0.0, "
        "Guidance End: 0.9, Pixel Perfect: False, Control Mode: My prompt is more important"
    )
    assert params["Control images"].startswith("1: ")
    units = fields_from_infotext(parse_infotext(image.infotext))["controlnets"]
    assert units[0]["weight"] == 0.8 and units[0]["control_mode"] == "My prompt is more important" and units[0]["image"]
    assert ControlUnit(**{**units[0], "image": _map(0)}) == unit
