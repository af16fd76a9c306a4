"""Speed and memory switches for loaded components: memory layout, torch.compile, int8 linear layers on
the CPU, VAE tiling, attention slicing and the low-VRAM mode (VAE tiling and slicing, CPU offload).

Each switch is a field of :class:`SpeedOptions`, applied by :func:`apply_speed` after the components
are on their device, so a benchmark can turn them on one at a time. None of them changes what an image
means: sliced attention and offload compute the same numbers, channels_last and compiled kernels the
same up to float rounding, and tiles differ from a whole decode only where their seams are blended.
``int8`` is the exception, and is off unless asked: it trades agreement with fp32 (about 40 dB PSNR on
SD 1.5's architecture, benchmarks/RESULTS.md) for speed.
The dtype (bf16 on CPUs that compute it natively) and the threads are chosen at load time
(:mod:`lienzo.devices`); the NaN-safe, tiled decode itself is :mod:`lienzo.generation.vae_decode`.
"""

import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lienzo.errors import LienzoError
from lienzo.models.components import TILING_CHOICES, Components, has_frames

log = logging.getLogger(__name__)

# An inductor cache directory the user chose before lienzo started wins over the settings' one.
_USER_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
# The parts low_vram offloads to CPU memory (components.speed.offloaded keeps their weights meanwhile).
_OFFLOADED_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# Where NHWC is the default layout: CUDA's convolutions prefer it, and on the CPU oneDNN's do too
# (SD 1.5 on a 2-core AVX2 EPYC: 1.10x at 256 and 1.11x at 512, 80 dB from NCHW; benchmarks/RESULTS.md).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class SpeedOptions:
    """How to run loaded components; the defaults are what lienzo does when nothing is asked.

    ``channels_last``: NHWC memory layout for the U-Net and VAE (None: on CUDA and the CPU,
    see ``CHANNELS_LAST_DEVICES``; off elsewhere). ``compile``: ``torch.compile`` the U-Net and the VAE decoder (mode
    default, ``fullgraph=False``); the first image pays the compilation, which inductor caches on disk
    in ``compile_cache``. ``vae_tiling``: ``auto`` (images above 1024 x 1024), ``on`` or ``off``.
    ``low_vram``: VAE tiling and batch slicing, sliced attention where it saves memory (see below), and
    on CUDA sequential CPU offload of the U-Net and text encoders (their weights stream to the GPU layer
    by layer; the VAE stays on it). ``attention_slicing`` (None: only with ``low_vram``, and not on CPUs
    and CUDA GPUs) computes attention a few heads at a time; where PyTorch's fused attention
    (``scaled_dot_product_attention``) runs, it needs far less memory than sliced attention and is
    faster, so slicing would cost there what it means to save. ``compile_mode`` is torch.compile's mode
    (None: its default; ``reduce-overhead`` adds CUDA graphs), ``compile_backend`` its backend (tests use
    ``eager`` and ``aot_eager``, which generate no code). ``int8``: on the CPU, the U-Net's linear layers
    (attention projections and feed-forwards) compute in int8 (:func:`quantize_int8`); ignored elsewhere.
    ``fp8``: the network's and T5's weights are stored in fp8 (:func:`store_fp8`).
    """

    channels_last: bool | None = None
    compile: bool = False
    vae_tiling: str = "auto"
    low_vram: bool = False
    attention_slicing: bool | None = None
    compile_cache: Path | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    int8: bool = False
    fp8: bool = False

    def __post_init__(self):
        if self.vae_tiling not in TILING_CHOICES:
            raise LienzoError(f"vae_tiling: choose one of {', '.join(TILING_CHOICES)}; got {self.vae_tiling!r}")

    @classmethod
    def from_settings(cls, settings, **overrides) -> "SpeedOptions":
        """The settings' switches (``LIENZO_CHANNELS_LAST``, ``LIENZO_COMPILE``, ...), with ``overrides`` that are not None."""
        fields = dict(
            channels_last=settings.channels_last,
            compile=settings.compile,
            vae_tiling=settings.vae_tiling,
            low_vram=settings.low_vram,
            attention_slicing=settings.attention_slicing,
            compile_cache=settings.cache_dir / "torch-compile",
            int8=settings.int8,
            fp8=settings.fp8,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


def apply_speed(components: Components, options: SpeedOptions, device: torch.device | str | None = None) -> Components:
    """Apply ``options`` to ``components`` (already loaded on ``device``; default: the network's) in place.
    What is said of the U-Net applies to a transformer family's transformer alike."""
    device = torch.device(device) if device is not None else components.network.device
    tiling = "on" if options.low_vram and options.vae_tiling == "auto" else options.vae_tiling
    components.vae_tiling = tiling
    components.vae.use_tiling = tiling == "on"  # encodes follow the VAE's own flag; decodes are decided per image

    channels_last = device.type in CHANNELS_LAST_DEVICES if options.channels_last is None else options.channels_last
    if channels_last:
        # NHWC is a layout of 4-D tensors: a video VAE's 5-D convolutions (Qwen-Image's) keep theirs.
        for module in (components.network, *(() if has_frames(components.vae) else (components.vae,))):
            module.to(memory_format=torch.channels_last)

    slicing = options.attention_slicing
    if slicing is None:  # fused attention on CPUs and CUDA GPUs already works in blocks (see SpeedOptions)
        slicing = options.low_vram and device.type not in ("cpu", "cuda")
    if slicing:
        enable_attention_slicing(components.network)

    offloaded = False
    if options.low_vram:
        components.vae.enable_slicing()  # a batch decodes one image at a time
        if device.type == "cuda":
            enable_sequential_offload(components, device)
            offloaded = True

    if options.int8:
        quantize_int8(components, device)
    if options.fp8:
        store_fp8(components)

    if options.compile:
        set_compile_cache(options.compile_cache)
        if offloaded:
            # Offload hooks move weights inside every layer's call: dynamo would break the graph at each one.
            log.warning("compile: the U-Net is not compiled with low_vram's CPU offload; the VAE decoder is")
        else:
            compile_module(components, components.spec.network, components.network, options.compile_backend, options.compile_mode)
        compile_module(components, "vae decoder", components.vae.decoder, options.compile_backend, options.compile_mode)
    return components


def quantize_int8(components: Components, device: torch.device) -> None:
    """Dynamic int8 quantization of the U-Net's ``nn.Linear`` layers, in place (PyTorch's fbgemm kernels).

    Weights become int8 with one scale per output channel; each call quantizes its input with a scale
    from that input's own range, multiplies in int8 and returns float32. Convolutions, attention itself,
    the text encoders and the VAE stay in float. Where it pays: a CPU without native bf16, where the
    fp32 matmuls of the transformer blocks are a large part of a step (SD 1.5, one CFG step on a 2-core
    AVX2 EPYC: 1.5-1.6x at 256x256, 1.2x at 512x512 where attention itself weighs more). Only float32
    weights on the CPU are quantized; elsewhere the switch is logged and left off. Marked in
    ``components.speed.int8``, which LoRA loading checks: adapters cannot wrap quantized layers.
    """
    network = components.network
    if device.type != "cpu" or network.dtype != torch.float32:
        log.warning("int8: only float32 models on the CPU are quantized; this one is %s on %s", network.dtype, device)
        return
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # the eager API's notice that torchao will replace it, once per call
        warnings.simplefilter("ignore")
        quantize_dynamic(network, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    components.speed.int8 = True


# T5's parts that must stay in their dtype: its norms, position bias and embedding are small, and its
# feed-forward output ("wo") casts its input to its weight's dtype, which fp8 storage would make fp8.
_T5_KEEP = ("norm", "relative_attention_bias", "shared", "embed", "wo")


def store_fp8(components: Components) -> None:
    """Store the network's weights, and T5's, in ``float8_e4m3fn``: diffusers' layerwise casting casts each
    layer's weights up to the model's dtype just before it runs and back after, so about half bf16's memory
    for them, a little less faithful (weights rounded to fp8's 3 mantissa bits), and computed in the
    model's dtype on every device. A GGUF network is already quantized and is left as it is."""
    from diffusers.hooks import apply_layerwise_casting

    network = components.network
    if not getattr(network, "is_quantized", False):
        network.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=network.dtype)
        components.speed.fp8.append(components.spec.network)
    for slot in components.spec.text_encoders:
        encoder = getattr(components, slot.component)
        if slot.kind == "t5xxl" and encoder is not None:
            apply_layerwise_casting(encoder, torch.float8_e4m3fn, encoder.dtype, skip_modules_pattern=_T5_KEEP)
            components.speed.fp8.append("T5")


def enable_attention_slicing(unet: torch.nn.Module) -> None:
    """Attention in slices of half the heads (at least one), without PyTorch's fused kernel: the same
    numbers, and less memory at once than unfused attention (not than the fused kernel)."""
    for module in unet.modules():
        if hasattr(module, "set_attention_slice") and hasattr(module, "sliceable_head_dim"):
            module.set_attention_slice(max(1, module.sliceable_head_dim // 2))


def enable_sequential_offload(components: Components, device: torch.device | str) -> None:
    """Keep the U-Net's and text encoders' weights in CPU memory and stream each layer's to ``device``
    for its call (accelerate's ``cpu_offload``, as diffusers' ``enable_sequential_cpu_offload``).

    The VAE (80 M parameters) stays on ``device``, so that a NaN decode can still be redone in fp32.
    The offloaded parameters sit on the ``meta`` device; :func:`lienzo.devices.execution_device` finds
    where they compute.
    """
    device = torch.device(device)
    for name in _OFFLOADED_PARTS:
        module = getattr(components, name)
        if name.startswith("text_encoder") and components.text_encoder_device is not None:
            continue  # they run where they were put
        if module is not None and getattr(module, "_hf_hook", None) is None:
            _offload(components, name, module, device)
    components.vae.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _offload(components: Components, name: str, module: torch.nn.Module, device: torch.device) -> None:
    from accelerate import cpu_offload

    module.to("cpu")
    # Kept so that offload_suspended can put the weights back into the module.
    state = {key: tensor.to("cpu") for key, tensor in module.state_dict().items()}
    components.speed.offloaded[name] = (state, device)
    cpu_offload(module, device, offload_buffers=len(module._parameters) > 0, state_dict=state)


@contextmanager
def offload_suspended(components: Components):
    """Inside, the offloaded parts hold their weights on the CPU again, so that layers can be added to
    them (LoRA adapters); on leaving, they are offloaded anew, with what was added."""
    from accelerate.hooks import remove_hook_from_module

    states = components.speed.offloaded
    suspended = [(name, getattr(components, name)) for name in states if getattr(getattr(components, name), "_hf_hook", None)]
    for name, module in suspended:
        remove_hook_from_module(module, recurse=True)
        module.load_state_dict(states[name][0], assign=True)
    try:
        yield
    finally:
        for name, module in suspended:
            _offload(components, name, module, states[name][1])


def set_compile_cache(path: Path | None) -> None:
    """Point inductor's on-disk cache (compiled kernels, FX graphs; Triton's below it) at ``path``,
    unless ``TORCHINDUCTOR_CACHE_DIR`` was set before lienzo started."""
    if path is None or _USER_COMPILE_CACHE:
        return
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def compile_module(
    components: Components, name: str, module: torch.nn.Module, backend: str = "inductor", mode: str | None = None
) -> None:
    """``module.compile()`` in place (names and state dict unchanged, so LoRAs still find their layers).

    Compilation happens on the first call; its time (compile + that call) is logged and kept in
    ``components.speed.compile_seconds[name]``, so a benchmark can report it apart from the runs after it.
    """
    module.compile(fullgraph=False, backend=backend, mode=mode)
    compiled = module._compiled_call_impl
    times = components.speed.compile_seconds

    def first_call(*args, **kwargs):
        started = time.perf_counter()
        out = compiled(*args, **kwargs)
        times[name] = time.perf_counter() - started
        log.info("torch.compile: %s compiled (and ran once) in %.1f s", name, times[name])
        module._compiled_call_impl = compiled
        return out

    module._compiled_call_impl = first_call
