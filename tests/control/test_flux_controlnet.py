"""Flux.1 ControlNet units in the one loop: against diffusers' FluxControlNetPipeline, and loading their files.

A tiny random Flux.1 model and tiny FluxControlNetModels whose zero-initialised layers are made non-zero (a
trained one's are not zero), so that a unit steers; pictures compared before 8-bit rounding, at fp32.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel
from diffusers.pipelines.flux import pipeline_flux_controlnet
from safetensors.torch import save_file

from lienzo.control.models import control_models, load_control_model
from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.generation import engine
from lienzo.generation.control import Control, ControlStack, _Prepared
from lienzo.generation.control_unit import ControlUnit
from lienzo.generation.plan import Resources
from lienzo.generation.request import GenerationRequest
from pictures import control_map as _map
from tiny_models import FLUX_HEAD_DIM, build_tiny, tiny_controlnet

PROMPT = "a red apple on a table"
SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers


@pytest.fixture(scope="module")
def flux():
    return build_tiny("flux")


def tiny_flux_controlnet(transformer, seed: int, num_mode: int | None = None, single: int = 1, **config) -> FluxControlNetModel:
    """A 1-double-block FluxControlNetModel of ``transformer``'s widths (a Union one with ``num_mode`` modes)."""
    torch.manual_seed(seed)
    config = {**transformer.config, "num_layers": 1, "num_single_layers": single, "num_mode": num_mode, **config}
    net = FluxControlNetModel.from_config(config)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                param.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def nets(flux):
    return tiny_flux_controlnet(flux.transformer, 1), tiny_flux_controlnet(flux.transformer, 2, num_mode=10)


def _unit(**fields) -> ControlUnit:
    return ControlUnit(image=_map(0), model="tiny", **fields)


def _request(units: list[ControlUnit], **fields) -> GenerationRequest:
    values = {"steps": 4, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5} | fields
    return GenerationRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", controlnets=units, **values)


def _ours(flux, controls: list[tuple], **fields):
    """A picture with ``controls``: (unit, network, control map) triples, prepared as the service would."""
    resources = Resources(tuple(Control(unit, net, image) for unit, net, image in controls))
    return engine.generate(flux, _request([unit for unit, _, _ in controls], **fields), resources=resources).images[0]


def _theirs(flux, controlnet, monkeypatch, **call) -> np.ndarray:
    # diffusers draws a sample of the map's VAE posterior from the picture's generator (so the noise then differs
    # from the plain pipeline's); lienzo takes the posterior's mean. Here diffusers takes the mean too.
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode())
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler_config), vae=flux.vae, text_encoder=flux.text_encoder,
        tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2, transformer=flux.transformer,
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(42),
        output_type="np", **call,
    ).images[0]


def test_one_unit_matches_diffusers_flux_controlnet_pipeline(flux, nets, monkeypatch):
    ref = _theirs(flux, nets[0], monkeypatch, control_image=_map(0), controlnet_conditioning_scale=0.8)
    ours = _ours(flux, [(_unit(weight=0.8), nets[0], _map(0))])
    assert np.abs(ours.pixels - ref).max() <= TOLERANCE
    plain = engine.generate(flux, _request([])).images[0]
    assert np.abs(ours.pixels - plain.pixels).max() > 1e-3  # the unit steers


def test_a_guidance_controlnet_on_schnell_matches_diffusers(monkeypatch):
    """Schnell's transformer takes no guidance; a dev-trained ControlNet beside it reads the pipeline's default 3.5."""
    schnell = build_tiny("flux", guidance=False)
    net = tiny_flux_controlnet(schnell.transformer, 4, guidance_embeds=True)
    ref = _theirs(schnell, net, monkeypatch, control_image=_map(0), controlnet_conditioning_scale=1.0)
    ours = _ours(schnell, [(_unit(), net, _map(0))], distilled_cfg_scale=None)
    assert np.abs(ours.pixels - ref).max() <= TOLERANCE


def test_a_union_unit_reads_its_mode_from_the_module(flux, nets, monkeypatch):
    """canny is mode 0 of InstantX's Union table; tile_resample mode 1."""
    ref = _theirs(flux, nets[1], monkeypatch, control_image=_map(0), control_mode=0, controlnet_conditioning_scale=1.0)
    canny = _ours(flux, [(_unit(module="canny"), nets[1], _map(0))])
    assert np.abs(canny.pixels - ref).max() <= TOLERANCE
    # The block samples a step gets: tile_resample's are the network's at mode 1, not canny's.
    net, rows = nets[1], 2
    torch.manual_seed(0)
    inputs = {
        "timestep": torch.full((rows,), 0.5), "guidance": torch.full((rows,), 3.5), "pooled_projections": torch.randn(rows, 64),
        "encoder_hidden_states": torch.randn(rows, 7, 64), "txt_ids": torch.zeros(7, 3), "img_ids": torch.zeros(16, 3),
    }
    packed, cond = torch.randn(rows, 16, 64), torch.randn(1, 16, 64)

    def samples(module: str) -> list[torch.Tensor]:
        stack = ControlStack((_Prepared(Control(_unit(module=module), net, _map(0)), None, cond=cond),), 4)
        return stack.flux_samples(packed, 0, 1, (1, 2), **inputs)["controlnet_block_samples"]

    with torch.no_grad():
        want, _ = net(packed, cond.expand(rows, -1, -1), torch.ones(rows, 1, dtype=torch.long), return_dict=False, **inputs)
    tile = samples("tile_resample")
    torch.testing.assert_close(tile[0], want[0])
    assert (tile[0] - samples("canny")[0]).abs().max() > 1e-3


def test_two_units_match_diffusers_multi_controlnet(flux, nets, monkeypatch):
    ref = _theirs(
        flux, FluxMultiControlNetModel(list(nets)), monkeypatch, control_image=[_map(0), _map(1)], control_mode=[None, 0],
        controlnet_conditioning_scale=[1.0, 0.5],
    )
    ours = _ours(flux, [(_unit(), nets[0], _map(0)), (_unit(module="canny", weight=0.5), nets[1], _map(1))])
    assert np.abs(ours.pixels - ref).max() <= TOLERANCE


def test_weight_zero_and_a_window_outside_the_steps_change_nothing(flux, nets):
    plain = engine.generate(flux, _request([])).images[0].pixels
    zero = _ours(flux, [(_unit(weight=0.0), nets[0], _map(0))])
    assert np.abs(zero.pixels - plain).max() <= 1e-6
    # 4 steps: shares done 0, 0.25, 0.5, 0.75; a window of (0.8, 1] holds none of them.
    late = _ours(flux, [(_unit(guidance_start=0.8), nets[0], _map(0))])
    assert np.abs(late.pixels - plain).max() <= 1e-6
    full = _ours(flux, [(_unit(), nets[0], _map(0))]).pixels
    early = _ours(flux, [(_unit(guidance_end=0.3), nets[0], _map(0))]).pixels
    assert np.abs(early - plain).max() > 1e-3 and np.abs(early - full).max() > 1e-3


def test_controlnet_more_important_leaves_the_negative_rows_alone(flux, nets):
    """True CFG (scale above 1, a negative prompt): with "ControlNet is more important" only the prompt's rows are
    steered, so the picture differs from Balanced's; without guidance there is no row to leave out."""
    guided = {"cfg_scale": 3.0, "negative_prompt": "blurry"}
    balanced = _ours(flux, [(_unit(), nets[0], _map(0))], **guided).pixels
    control = _ours(flux, [(_unit(control_mode="ControlNet is more important"), nets[0], _map(0))], **guided).pixels
    assert np.abs(balanced - control).max() > 1e-3
    unguided = _ours(flux, [(_unit(control_mode="ControlNet is more important"), nets[0], _map(0))]).pixels
    assert np.abs(unguided - _ours(flux, [(_unit(), nets[0], _map(0))]).pixels).max() == 0


def test_my_prompt_is_more_important_is_refused_on_flux(flux, nets):
    with pytest.raises(InvalidRequestError) as err:
        _ours(flux, [(_unit(control_mode="My prompt is more important"), nets[0], _map(0))])
    assert err.value.field == "controlnets.0.control_mode"


def test_other_transformer_families_still_refuse_units():
    sd3 = build_tiny("sd3")
    with pytest.raises(InvalidRequestError, match="Flux.1 do"):
        engine.generate(sd3, _request([_unit()], cfg_scale=5.0, distilled_cfg_scale=None), resources=Resources((Control(_unit(), None, _map(0)),)))


def test_infotext_writes_the_unit(flux, nets):
    from lienzo.images.metadata import parse_infotext

    image = _ours(flux, [(_unit(weight=0.8, guidance_end=0.9), nets[0], _map(0))])
    params = parse_infotext(image.infotext).params
    assert params["ControlNet 0"] == (
        "Module: none, Model: tiny, Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: 0.0, "
        "Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced"
    )


# -- files ------------------------------------------------------------------------------------------


def _same_weights(a, b) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_folders_and_single_files_load_and_are_listed(flux, nets, tmp_path):
    folder = tmp_path / "ControlNet"
    nets[0].save_pretrained(folder / "flux-canny")
    union = tiny_flux_controlnet(flux.transformer, 3, num_mode=10, single=2)
    save_file({k: v.contiguous() for k, v in union.state_dict().items()}, folder / "flux-union.safetensors")
    listed = {entry.name: entry for entry in control_models(tmp_path)}
    assert (listed["flux-canny"].kind, listed["flux-canny"].family) == ("controlnet", "flux")
    assert (listed["flux-union"].kind, listed["flux-union"].family) == ("controlnet", "flux")
    loaded = load_control_model(listed["flux-canny"], flux.transformer)
    assert isinstance(loaded, FluxControlNetModel) and _same_weights(loaded, nets[0])
    single = load_control_model(listed["flux-union"], flux.transformer)
    assert single.config.num_mode == 10 and single.config.num_single_layers == 2 and single.config.guidance_embeds
    assert _same_weights(single, union)


def test_flux_controlnets_on_sd_and_unet_controlnets_on_flux_are_refused(flux, nets, tmp_path):
    sd1 = build_tiny("sd1")
    nets[0].save_pretrained(tmp_path / "flux-folder")
    save_file({k: v.contiguous() for k, v in nets[0].state_dict().items()}, tmp_path / "flux-file.safetensors")
    for path in (tmp_path / "flux-folder", tmp_path / "flux-file.safetensors"):
        with pytest.raises(ModelFileError, match=r"is a Flux.1 ControlNet and does not fit the loaded SD 1.x model"):
            load_control_model(path, sd1.unet)
    unet_net = tiny_controlnet(sd1.unet)
    unet_net.save_pretrained(tmp_path / "sd15-folder")
    save_file({k: v.contiguous() for k, v in unet_net.state_dict().items()}, tmp_path / "sd15-file.safetensors")
    for path in (tmp_path / "sd15-folder", tmp_path / "sd15-file.safetensors"):
        with pytest.raises(ModelFileError, match=r"is an SD 1.x ControlNet and does not fit the loaded Flux.1 model"):
            load_control_model(path, flux.transformer)


def test_a_flux_controlnet_of_other_widths_or_xlabs_layout_is_refused(flux, tmp_path):
    config = {**flux.transformer.config, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 3}
    wide = FluxControlNetModel.from_config(config)
    save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    wide_width = 3 * FLUX_HEAD_DIM
    with pytest.raises(ModelFileError, match=f"hidden width {wide_width}, the model's {2 * FLUX_HEAD_DIM}"):
        load_control_model(tmp_path / "wide.safetensors", flux.transformer)
    xlabs = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
             "controlnet_blocks.0.weight": torch.zeros(2, 2)}
    save_file(xlabs, tmp_path / "xlabs.safetensors")
    with pytest.raises(ModelFileError, match="XLabs Flux.1 ControlNet in its original layout"):
        load_control_model(tmp_path / "xlabs.safetensors", flux.transformer)
    # The same design in diffusers' names (a pixel hint encoder): a folder and a single file.
    hinted = FluxControlNetModel.from_config({**flux.transformer.config, "num_layers": 1, "num_single_layers": 1, "conditioning_embedding_channels": 16})
    hinted.save_pretrained(tmp_path / "hinted")
    save_file(hinted.state_dict(), tmp_path / "hinted.safetensors")
    for path in (tmp_path / "hinted", tmp_path / "hinted.safetensors"):
        with pytest.raises(ModelFileError, match="XLabs-style Flux.1 ControlNet"):
            load_control_model(path, flux.transformer)


def test_prepared_from_the_models_dir_with_a_preprocessor(flux, tmp_path):
    """The service's way: the unit's model found in models/ControlNet, loaded to fit the transformer, its map made by
    the preprocessor; a Union ControlNet refuses a module it has no mode for, another family refuses units early."""
    from lienzo.control.prepare import prepare_resources
    from lienzo.settings import Settings

    union = tiny_flux_controlnet(flux.transformer, 3, num_mode=10)
    (tmp_path / "ControlNet").mkdir()
    save_file({k: v.contiguous() for k, v in union.state_dict().items()}, tmp_path / "ControlNet" / "flux-union.safetensors")
    settings = Settings(models_dir=tmp_path, data_dir=tmp_path / "data")
    request = _request([ControlUnit(image=_map(0), module="canny", model="flux-union")])
    request, resources = prepare_resources(flux, request, settings)
    assert request.controlnets[0].model.startswith("flux-union [") and _same_weights(resources.controls[0].model, union)
    made = engine.generate(flux, request, resources=resources).images[0].pixels
    assert np.abs(made - engine.generate(flux, _request([])).images[0].pixels).max() > 1e-3
    with pytest.raises(InvalidRequestError) as err:
        prepare_resources(flux, _request([ControlUnit(image=_map(0), module="none", model="flux-union")]), settings)
    assert err.value.field == "controlnets.0.module" and "canny" in str(err.value)
    with pytest.raises(InvalidRequestError, match="Flux.1 do"):
        prepare_resources(build_tiny("sd3"), _request([ControlUnit(image=_map(0), model="flux-union")], cfg_scale=5.0, distilled_cfg_scale=None), settings)
