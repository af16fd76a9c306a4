"""OpenVINO rows for speed.py: the runtime FastSD CPU runs Stable Diffusion on, through optimum-intel.

The same random weights speed.py builds are exported once per process to OpenVINO's format (IR) by
optimum-intel, from a diffusers pipeline over the models in memory, and loaded back as
``OVStableDiffusionPipeline`` in three modes: fp32 (the ``f32`` precision hint), OpenVINO's default on this CPU
(bf16 where the CPU has AMX or AVX512-BF16, f32 elsewhere), and 8-bit weights (NNCF's int8 weight compression
of every convolution and matmul in the U-Net, text encoder and VAE decoder, which is what optimum-intel's
``load_in_8bit`` does; activations stay in the default precision). Each is reshaped to the static size and
compiled, as FastSD CPU does. The pipeline is diffusers' own ``StableDiffusionPipeline.__call__`` over
OpenVINO models, so it gets the same scheduler, prompts, CFG 7 and steps as speed.py's diffusers row, and the
same starting noise: diffusers draws it with ``randn_tensor`` from ``torch.Generator().manual_seed(1)``, and
these rows pass that very tensor as ``latents``, so PSNR against the fp32 reference measures precision alone.

Hybrid quantization (int8 activations in the U-Net's convolutions too) is left out: optimum-intel calibrates
it by running the pipeline at 512x512 for 50 steps per prompt, which takes longer than the benchmark.

OpenVINO is not a dependency of lienzo; :func:`openvino_missing` says how to install it. optimum-intel 2.2
(the newest) asks for transformers < 5.6 and huggingface_hub < 1.22, while lienzo pins transformers 5.20-5.23 and
diffusers 0.42 needs huggingface_hub >= 1.32 and a transformers new enough for its LTX-2 pipelines (which
optimum-intel imports): no set of versions satisfies all, so optimum-intel goes in with ``--no-deps`` beside
lienzo's pins. Its Stable Diffusion export and pipeline work there; see :func:`_optimum_intel` for the one
module that does not import.
"""

import gc
import importlib
import sys
import time
import types
from pathlib import Path

import torch

INSTALL = (
    'pip install openvino==2026.4.1 openvino-tokenizers==2026.4.1 nncf==3.4.0 optimum==2.3.0 && '
    'pip install --no-deps optimum-intel==2.2.0'
)

_exported: dict[tuple[int, str], Path] = {}  # (id of the Components, workdir) -> its IR folder, once per process


def openvino_missing() -> str | None:
    """None when optimum-intel, OpenVINO and NNCF import; else what to run to add the OpenVINO rows."""
    try:
        for name in ("openvino", "nncf"):
            importlib.import_module(name)
        _optimum_intel()
    except ImportError as error:
        return f"OpenVINO rows left out ({error}); to add them: {INSTALL}"
    return None


def _optimum_intel() -> types.ModuleType:
    """``optimum.intel.openvino``, imported beside transformers >= 5.6.

    Its vision-language module (``modeling_visual_language``) reaches for Qwen-VL internals that transformers 5.6
    renamed, and the package's ``__init__`` and quantizer import it unconditionally. Nothing here runs a
    vision-language model, so when that module fails, an empty stand-in with the three classes the rest imports
    from it takes its place (the quantizer's isinstance checks against them are then false, as they are for a
    diffusion pipeline anyway) and the import is tried again.
    """
    try:
        import optimum.intel.openvino as ov_intel
    except (ImportError, AttributeError):
        name = "optimum.intel.openvino.modeling_visual_language"
        stand_in = types.ModuleType(name, "Stand-in: the real module does not import with this transformers")
        for cls in ("OVModelForMultimodalLM", "OVModelForVisualCausalLM", "OVVisionEmbedding"):
            setattr(stand_in, cls, type(cls, (), {}))
        sys.modules[name] = stand_in
        import optimum.intel.openvino as ov_intel
    return ov_intel


def default_precision() -> str:
    """What OpenVINO's CPU plugin computes in unless told otherwise: bf16 on AMX/AVX512-BF16 CPUs, else f32."""
    import openvino

    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


MODES = ("fp32", "default", "int8")


def openvino_rows(components, size: int, steps: int, sampler, workdir: str, modes: tuple[str, ...] = MODES) -> list:
    """speed.Row-s running SD 1.5-family ``components`` (fp32) through OpenVINO at ``size`` x ``size``, one per mode
    in ``modes``: "fp32", "default" (OpenVINO's precision on this CPU; left out where that is fp32, as it would
    repeat the fp32 row) and "int8" (8-bit weights). The export to ``workdir`` happens once per process. Each row
    holds its own compiled pipeline (SD 1.5: about the weights' size in its precision, fp32 4.2 GB), freed with
    the row's ``run``: ask for fewer modes per call where memory is short."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"modes: {sorted(unknown)} are not among {MODES}")
    folder = _export(components, sampler, Path(workdir))
    default = default_precision()
    default_dtype = torch.bfloat16 if default == "bf16" else torch.float32
    common = (folder, components, size, steps, sampler, _latents(components, size))
    rows = []
    if "fp32" in modes:
        rows.append(_row("OpenVINO", "fp32", torch.float32, *common, {"INFERENCE_PRECISION_HINT": "f32"}))
    if "default" in modes and (default != "f32" or "fp32" not in modes):
        rows.append(_row("OpenVINO", f"default: {default}", default_dtype, *common, {}))
    if "int8" in modes:
        quantization = _optimum_intel().OVWeightQuantizationConfig(bits=8)
        rows.append(_row("OpenVINO int8", f"8-bit weights, {default}", default_dtype, *common, {}, quantization=quantization))
    return rows


def _export(components, sampler, workdir: Path) -> Path:
    """The IR folder of ``components``, written by optimum-intel's exporter straight from a diffusers pipeline over
    the models in memory (no second copy of the weights read back from disk); weights stay fp32 (optimum-intel
    compresses only parts over a billion parameters by default, and SD 1.5's U-Net has 860M)."""
    key = (id(components), str(workdir))
    if key in _exported:
        return _exported[key]
    from diffusers import StableDiffusionPipeline

    _optimum_intel()
    from optimum.exporters.openvino import export_from_model

    if components.family not in ("sd1", "sd2"):
        raise ValueError(f"OpenVINO rows run SD 1.x/2.x U-Nets; {components.name} is {components.family}")
    target = workdir / "openvino"
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=components.unet,
        scheduler=_scheduler(components, sampler), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    export_from_model(pipe, target, task="text-to-image")
    del pipe
    gc.collect()  # the exporter's traced graphs and converted copies sit in reference cycles: free them before compiling
    _exported[key] = target
    return target


def _scheduler(components, sampler):
    """The scheduler speed.py's diffusers row runs: the sampler on the Uniform schedule over the model's config."""
    from lienzo.generation.samplers import build_scheduler

    return build_scheduler(sampler, "Uniform", components.scheduler_config)


def _latents(components, size: int) -> torch.Tensor:
    """The starting noise diffusers' ``prepare_latents`` draws for speed.py's baseline (seed 1, on the CPU, fp32)."""
    from diffusers.utils.torch_utils import randn_tensor

    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    shape = (1, components.unet.config.in_channels, size // scale, size // scale)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"), dtype=torch.float32)


def _row(name, note, dtype, folder, components, size, steps, sampler, latents, ov_config, quantization=None):
    """One OpenVINO pipeline in one mode, reshaped to batch 2 (CFG) at ``size`` and compiled."""
    from speed import NEGATIVE, PROMPT, Row

    pipe = _optimum_intel().OVStableDiffusionPipeline.from_pretrained(
        str(folder), export=False, compile=False, ov_config=ov_config, quantization_config=quantization,
        scheduler=_scheduler(components, sampler), vae_encoder=None,  # text-to-image never encodes: not loaded
    )
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)

    def run():
        stamps = []

        def on_step(_pipe, _i, _t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        image = pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
            latents=latents.clone(), output_type="np", callback_on_step_end=on_step,
        ).images[0]
        return image, stamps

    return Row(name, run, note=note, dtype=dtype)
