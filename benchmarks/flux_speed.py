"""lienzo against diffusers' FluxPipeline (or Flux2KleinPipeline), side by side, on a random-weight Flux model.

One process builds the model once (seeded, directly in ``--dtype`` on ``--device``): Flux.1 dev's
transformer at its full width (3072 channels, 24 heads of 128, joint_attention_dim 4096, pooled 768,
in_channels 64 = 2x2 packed 16-channel latents, guidance input, rotary axes (16, 56, 56)) with
``--double-blocks`` / ``--single-blocks`` blocks, Flux's VAE at its full size (block_out_channels
(128, 256, 512, 512), 2 layers per block, 16 latent channels, scaling 0.3611, shift 0.1159, no quant
convs), CLIP-L at its full size and T5 at T5-XXL's width (d_model 4096, 64 heads, d_ff 10240) with
``--t5-layers`` layers. diffusers' ``FluxPipeline`` and lienzo's engine then run on those very modules,
with the same prompt, Euler / Simple, steps, size, seed, distilled guidance 3.5 and CFG 1 (no negative
pass), alternating runs after one warm-up each. lienzo's components get what lienzo does on load
(``apply_speed`` with its defaults: channels_last for the VAE, on its own copy of the VAE); diffusers'
pipeline gets the modules as they were built. It prints:

- s/image: the median of ``--runs`` runs (prompt encoding, denoising and VAE decode);
- it/s: denoising steps per second, from the time between the first and the last step's end;
- peak MiB: memory added during a run (CPU: resident set sampled every 5 ms; CUDA: torch's peak
  allocation over what was allocated before the run); weights GiB: the transformer's stored weights;
- the speed-up over diffusers (its median s/image over the row's);
- agreement with diffusers' image: PSNR in dB over 8-bit pixels and the largest absolute pixel
  difference (0-255).

Optional rows (on by default with ``--device cuda``, off on the CPU): ``--fp8``, lienzo with the
transformer's weights stored in float8_e4m3fn and computed in bf16 (diffusers'
``enable_layerwise_casting``, on a second transformer that shares the weights before casting);
``--gguf``, lienzo with the transformer written to a GGUF file in Q8_0 (matrices; other tensors F32)
and read back by ``lienzo.models.transformer_files.load_transformer_file``. ``--nchw`` adds lienzo with
its VAE left in NCHW, as diffusers' is (tells the VAE layout's share of a difference from the rest).

``--family flux2`` does the same for Flux.2 Klein 4B against diffusers' ``Flux2KleinPipeline``: its transformer
at full width (3072 channels, 24 heads of 128, mlp_ratio 3, in_channels 128 = 2x2 packed 32-channel latents,
joint_attention_dim 7680 = three of Qwen3-4B's layers side by side, rotary axes (32, 32, 32, 32), theta 2000,
no guidance input) with ``--double-blocks`` / ``--single-blocks`` blocks (Klein 4B: 5 + 20), Flux.2's VAE
(``AutoencoderKLFlux2`` at diffusers' defaults: block_out_channels (128, 256, 512, 512), 32 latent channels,
quant convs, batch-norm statistics) and Qwen3-4B's language model at full width (2560 channels, 32 query and
8 key/value heads of 128, MLP 9728, its 151,936-row tied embedding) with ``--qwen-layers`` layers (Qwen3-4B:
36). Both programs read the Qwen3 hidden states at three layers (Klein: 9, 18 and 27); with fewer than 27
layers both read layers L/3, 2L/3 and L instead (lienzo's constant is set for the run). The tokenizer is
lienzo's bundled Qwen3 tokenizer, the real vocabulary; the prompt is padded to 512 tokens either way. 4 steps (Klein's distilled default), CFG 1, no distilled guidance.

Weights are random: speed does not depend on their values, and the pixel difference compares the
same computation done by two programs.

    python benchmarks/flux_speed.py                                  # CPU: 2 double + 4 single blocks, 512, 4 steps
    python benchmarks/flux_speed.py --dtype float32
    python benchmarks/flux_speed.py --nchw                           # + lienzo with an NCHW VAE
    python benchmarks/flux_speed.py --device cuda                    # GPU: full depth, 1024, 20 steps, bf16/fp8/GGUF rows
    python benchmarks/flux_speed.py --device cuda --no-gguf --runs 2 # a shorter GPU check
    python benchmarks/flux_speed.py --family flux2                   # Flux.2 Klein 4B: 1 double + 4 single blocks, 3 Qwen3 layers
    python benchmarks/flux_speed.py --family flux2 --device cuda     # full depth: 5 + 20 blocks, Qwen3-4B's 36 layers, 1024, 4 steps
"""

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from lienzo.devices import cpu_has_native_bf16  # noqa: E402
from lienzo.generation import engine, text_encoding  # noqa: E402
from lienzo.generation.request import GenerationRequest  # noqa: E402
from lienzo.models.components import Components  # noqa: E402
from lienzo.models.families import FAMILIES  # noqa: E402
from lienzo.models.single_file_layout import bundled_tokenizer  # noqa: E402
from lienzo.models.speed import SpeedOptions, apply_speed  # noqa: E402
from lienzo.models.tokenizers import bundled_qwen_tokenizer, bundled_t5_tokenizer  # noqa: E402
from speed import PeakMemory, _sync, psnr  # noqa: E402  (benchmarks/speed.py)

PROMPT = "a lighthouse at dusk, oil painting"
SEED = 1
DISTILLED_CFG = 3.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FP8 = torch.float8_e4m3fn


# --- the model ------------------------------------------------------------------------------------


def flux_transformer(double: int, single: int) -> FluxTransformer2DModel:
    """Flux.1 dev's transformer at full width with ``double`` + ``single`` blocks (the real one: 19 + 38)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def flux_vae() -> AutoencoderKL:
    """Flux.1's VAE (diffusers' config of black-forest-labs/FLUX.1-dev's vae folder)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )


def clip_l() -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder at its full size (123M parameters)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))


def t5(layers: int) -> T5EncoderModel:
    """T5 v1.1 XXL's encoder layout (d_model 4096, 64 heads of 64, gated-GELU d_ff 10240) with ``layers`` layers (the real one: 24)."""
    return T5EncoderModel(T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        is_encoder_decoder=False, use_cache=False,
    ))


# --- Flux.2 Klein 4B --------------------------------------------------------------------------------

KLEIN_LAYERS = (9, 18, 27)  # the Qwen3 hidden states Flux2KleinPipeline reads (its text_encoder_out_layers)
QWEN3_4B_WIDTH = 2560


def klein_transformer(double: int, single: int) -> Flux2Transformer2DModel:
    """Flux.2 Klein 4B's transformer at full width with ``double`` + ``single`` blocks (the real one: 5 + 20)."""
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3 * QWEN3_4B_WIDTH, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    )


def qwen3_4b(layers: int) -> Qwen3ForCausalLM:
    """Qwen3-4B's language model (2560 channels, 32 query / 8 key-value heads of 128, MLP 9728, tied 151,936-row
    embedding) with ``layers`` layers (the real one: 36)."""
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=QWEN3_4B_WIDTH, intermediate_size=9728, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True, use_cache=False,
    ))


def qwen_read_layers(layers: int) -> tuple[int, int, int]:
    """The three hidden states both programs read: Klein's (9, 18, 27) when the encoder is that deep, else
    layers L/3, 2L/3 and L of a shallower one."""
    if layers >= KLEIN_LAYERS[-1]:
        return KLEIN_LAYERS
    if layers < 3:
        raise SystemExit("--qwen-layers: at least 3 (three distinct hidden states are read)")
    return (layers // 3, 2 * layers // 3, layers)


def build(args, device: torch.device, dtype: torch.dtype) -> Components:
    """Every module built once, seed 0, directly on ``device`` in ``dtype`` (a full-depth model would not
    fit twice: Flux's 12B parameters are 48 GB in fp32)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if args.family == "flux2":
                transformer = klein_transformer(args.double_blocks, args.single_blocks).eval()
                vae = AutoencoderKLFlux2().eval()
                text_encoder = qwen3_4b(args.qwen_layers).eval()
            else:
                transformer = flux_transformer(args.double_blocks, args.single_blocks).eval()
                vae = flux_vae().eval()
                text_encoder = clip_l().eval()
                text_encoder_2 = t5(args.t5_layers).eval()
    finally:
        torch.set_default_dtype(default)
    if args.family == "flux2":
        return Components(
            unet=None, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=bundled_qwen_tokenizer("qwen3"),
            scheduler_config=dict(FAMILIES["flux2"].scheduler), family="flux2", name="random Flux.2 Klein 4B",
        )
    return Components(
        unet=None, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=bundled_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=bundled_t5_tokenizer(), scheduler_config=dict(FAMILIES["flux"].scheduler),
        family="flux", name="random Flux.1",
    )


def billions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def stored_gib(module: torch.nn.Module) -> float:
    """The module's weights as stored (a GGUF parameter counts its quantized bytes)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


# --- the other storage formats ----------------------------------------------------------------------


def fp8_twin(transformer: torch.nn.Module) -> torch.nn.Module:
    """A second transformer on the same weights (no copy: built on the meta device, then given the first one's
    tensors) whose layers then store fp8 and compute in bf16 (diffusers' layerwise casting; norms and the
    in/out projections stay bf16, diffusers' defaults). Casting replaces the twin's tensors only."""
    with torch.device("meta"):
        twin = type(transformer).from_config(transformer.config)
    twin.load_state_dict(transformer.state_dict(), assign=True)
    twin.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
    return twin.eval()


def q8_0(tensor: torch.Tensor) -> np.ndarray:
    """GGML's Q8_0 blocks of a matrix whose rows are whole 32-value blocks: per block an fp16 scale (the
    largest magnitude / 127) and 32 int8 values, rounded on the tensor's own device (fast on a GPU)."""
    rows, cols = tensor.shape
    blocks = tensor.float().reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    values = torch.round(blocks * inverse).clamp(-127, 127).to(torch.int8)
    packed = torch.cat([scale.half().view(torch.uint8), values.view(torch.uint8)], dim=1)
    return packed.reshape(rows, cols // 32 * 34).cpu().numpy()


def write_gguf_q8_0(transformer: torch.nn.Module, path: Path) -> None:
    """The transformer's tensors in diffusers' names, matrices in Q8_0 and everything else F32, as one GGUF file."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, tensor in transformer.state_dict().items():
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            writer.add_tensor(key, q8_0(tensor), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, tensor.float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_transformer(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[torch.nn.Module, float]:
    """The transformer through a Q8_0 GGUF file and lienzo's loader; also the seconds writing and reading took."""
    from lienzo.models.transformer_files import load_transformer_file

    started = time.perf_counter()
    path = folder / "flux-q8_0.gguf"
    write_gguf_q8_0(transformer, path)
    family, network = load_transformer_file(path, dtype=dtype)
    assert family == "flux", family
    network = network.to(device)
    path.unlink()
    return network, time.perf_counter() - started


# --- the runs --------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    run: object  # () -> (pixels HxWx3 float in [0, 1], step end times)
    weights_gib: float
    seconds: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    first: float = 0.0
    pixels: np.ndarray | None = None


def lienzo_row(name: str, components: Components, device: torch.device, request: GenerationRequest) -> Row:
    def run():
        stamps = []
        result = engine.generate(components, request, progress=lambda p: (_sync(device), stamps.append(time.perf_counter())))
        return result.images[0].pixels, stamps

    return Row(name, run, stored_gib(components.transformer))


def diffusers_row(name: str, components: Components, device: torch.device, size: int, steps: int) -> Row:
    """diffusers' FluxPipeline as its documentation runs Flux.1 dev (or Flux2KleinPipeline as it runs the distilled
    Klein: guidance_scale 1, no negative pass), over the modules as they were built."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    if components.family == "flux2":
        pipe = Flux2KleinPipeline(
            transformer=components.transformer, vae=components.vae, text_encoder=components.text_encoder,
            tokenizer=components.tokenizer, scheduler=scheduler, is_distilled=True,
        )
        extra = dict(guidance_scale=1.0, text_encoder_out_layers=text_encoding._FLUX2_LAYERS)
    else:
        pipe = FluxPipeline(
            transformer=components.transformer, vae=components.vae, text_encoder=components.text_encoder,
            tokenizer=components.tokenizer, text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
            scheduler=scheduler,
        )
        extra = dict(guidance_scale=DISTILLED_CFG)
    pipe.set_progress_bar_config(disable=True)

    def run():
        stamps = []

        def on_step(_pipe, _i, _t, kwargs):
            _sync(device)
            stamps.append(time.perf_counter())
            return kwargs

        image = pipe(
            prompt=PROMPT, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
            output_type="np", callback_on_step_end=on_step, **extra,
        ).images[0]
        return image, stamps

    return Row(name, run, stored_gib(components.transformer))


def measure(rows: list[Row], runs: int, device: torch.device) -> None:
    for row in rows:  # warm-up: first-call allocations, kernel choice
        started = time.perf_counter()
        row.pixels, _ = row.run()
        _sync(device)
        row.first = time.perf_counter() - started
        print(f"  warm-up {row.name}: {row.first:.1f} s", file=sys.stderr, flush=True)
    for _ in range(runs):
        for row in rows:
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                _, stamps = row.run()
                _sync(device)
                row.seconds.append(time.perf_counter() - started)
            row.peaks.append(memory.added_mib)
            print(f"  run {len(row.seconds)} {row.name}: {row.seconds[-1]:.1f} s, {_load()}", file=sys.stderr, flush=True)
            if len(stamps) > 1:
                row.rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))


def table(rows: list[Row], baseline: Row) -> str:
    base = statistics.median(baseline.seconds)
    lines = [
        f"| {'':40} | s/image | min-max s | it/s | peak MiB | weights GiB | speed-up | PSNR dB | max diff | first run s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        seconds = statistics.median(row.seconds)
        rate = f"{statistics.median(row.rates):.3f}" if row.rates else "-"
        agreement = psnr(row.pixels, baseline.pixels)
        diff = np.abs(np.round(row.pixels * 255) - np.round(baseline.pixels * 255)).max()
        shown = "exact" if agreement == float("inf") else f"{agreement:.1f}"
        lines.append(
            f"| {row.name:40} | {seconds:.2f} | {min(row.seconds):.2f}-{max(row.seconds):.2f} | {rate} | {max(row.peaks):.0f} "
            f"| {row.weights_gib:.2f} | {base / seconds:.2f}x | {shown} | {diff:.0f} | {row.first:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("flux", "flux2"), default="flux", help="Flux.1 dev (default) or Flux.2 Klein 4B")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    parser.add_argument("--size", type=int, help="image side (default: 512 on the CPU, 1024 on CUDA)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 4 on the CPU, 20 on CUDA; flux2: 4, the distilled Klein's)")
    parser.add_argument(
        "--double-blocks", type=int, help="double-stream blocks (default: 2 on the CPU, Flux.1's 19 on CUDA; flux2: 1, Klein's 5)"
    )
    parser.add_argument(
        "--single-blocks", type=int, help="single-stream blocks (default: 4 on the CPU, Flux.1's 38 on CUDA; flux2: 4, Klein's 20)"
    )
    parser.add_argument("--t5-layers", type=int, help="T5 encoder layers (default: 2 on the CPU, T5-XXL's 24 on CUDA)")
    parser.add_argument("--qwen-layers", type=int, help="flux2: Qwen3 layers (default: 3 on the CPU, Qwen3-4B's 36 on CUDA)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row after one warm-up (default: 3)")
    parser.add_argument("--fp8", action=argparse.BooleanOptionalAction, help="add the fp8-storage row (default: on CUDA)")
    parser.add_argument("--nchw", action="store_true", help="add a lienzo row whose VAE keeps the NCHW layout (lienzo's default: channels_last)")
    parser.add_argument("--gguf", action=argparse.BooleanOptionalAction, help="add the GGUF Q8_0 row (default: on CUDA)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    native_bf16 = gpu or cpu_has_native_bf16()
    dtype = DTYPES[args.dtype or ("bfloat16" if native_bf16 else "float32")]
    size = args.size or (1024 if gpu else 512)
    klein = args.family == "flux2"
    steps = args.steps or (20 if gpu and not klein else 4)  # Klein is distilled to 4 steps
    full = (5, 20) if klein else (19, 38)  # the real model's double + single blocks
    cpu_depth = (1, 4) if klein else (2, 4)  # reduced depth that runs in minutes on a few cores
    args.double_blocks = args.double_blocks if args.double_blocks is not None else (full[0] if gpu else cpu_depth[0])
    args.single_blocks = args.single_blocks if args.single_blocks is not None else (full[1] if gpu else cpu_depth[1])
    args.t5_layers = args.t5_layers or (24 if gpu else 2)
    args.qwen_layers = args.qwen_layers or (36 if gpu else 3)
    want_fp8 = gpu if args.fp8 is None else args.fp8
    want_gguf = (gpu and not klein) if args.gguf is None else args.gguf
    if want_gguf and klein:
        parser.error("--gguf: lienzo's GGUF reader is measured for Flux.1 only here")
    if want_fp8 and dtype != torch.bfloat16:
        print("--fp8 computes in bf16: left out with --dtype float32\n")
        want_fp8 = False

    if gpu:
        what = torch.cuda.get_device_name()
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}"
    pipeline = "Flux2KleinPipeline" if klein else "FluxPipeline"
    print(f"# lienzo vs diffusers {pipeline}, {date.today()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}, {what}")
    print(f"{_load()} at the start")
    if klein:  # both programs read the same three hidden states of the (maybe shallower) Qwen3
        text_encoding._FLUX2_LAYERS = qwen_read_layers(args.qwen_layers)

    started = time.perf_counter()
    components = build(args, device, dtype)
    full_depth = (args.double_blocks, args.single_blocks) == full
    if klein:
        print(
            f"random Flux.2 Klein 4B architecture in {str(dtype).removeprefix('torch.')}: transformer at full width with "
            f"{args.double_blocks} double + {args.single_blocks} single blocks ({billions(components.transformer):.2f}B parameters"
            f"{'' if full_depth else '; Klein 4B has 5 + 20, 3.9B'}), Flux.2 VAE ({billions(components.vae) * 1000:.0f}M), "
            f"Qwen3-4B at full width with {args.qwen_layers} layers ({billions(components.text_encoder):.2f}B with the "
            f"0.39B embedding{'' if args.qwen_layers == 36 else '; Qwen3-4B has 36, 4.0B'}), hidden states read at layers "
            f"{text_encoding._FLUX2_LAYERS}, byte-level tokenizer; built in {time.perf_counter() - started:.0f} s"
        )
        print(
            f"{size}x{size}, {steps} steps Euler / Simple (size- and step-shifted), CFG 1, Qwen3 length 512, batch 1, "
            f"{args.runs} runs each after one warm-up, alternating\n"
        )
    else:
        print(
            f"random Flux.1-dev architecture in {str(dtype).removeprefix('torch.')}: transformer at full width with "
            f"{args.double_blocks} double + {args.single_blocks} single blocks ({billions(components.transformer):.2f}B parameters"
            f"{'' if full_depth else '; Flux.1 has 19 + 38, 11.9B'}), full-size VAE ({billions(components.vae) * 1000:.0f}M), "
            f"CLIP-L full size ({billions(components.text_encoder) * 1000:.0f}M), T5 at XXL width with {args.t5_layers} layers "
            f"({billions(components.text_encoder_2):.2f}B{'' if args.t5_layers == 24 else '; T5-XXL has 24, 4.8B'}); "
            f"built in {time.perf_counter() - started:.0f} s"
        )
        print(
            f"{size}x{size}, {steps} steps Euler / Simple, distilled CFG {DISTILLED_CFG}, CFG 1, T5 length 512, batch 1, "
            f"{args.runs} runs each after one warm-up, alternating\n"
        )

    # lienzo's own copy of the VAE, with what lienzo does on load (channels_last); the rest is shared.
    theirs = components
    ours = apply_speed(dataclasses.replace(components, vae=copy.deepcopy(components.vae)), SpeedOptions(), device)
    request = GenerationRequest(
        prompt=PROMPT, width=size, height=size, seed=SEED, steps=steps, sampler="Euler", schedule="Simple",
        cfg_scale=1.0, distilled_cfg_scale=None if klein else DISTILLED_CFG,
    )
    name = str(dtype).removeprefix("torch.")
    baseline = diffusers_row(f"diffusers {pipeline} ({name})", theirs, device, size, steps)
    rows = [baseline, lienzo_row(f"lienzo ({name})", ours, device, request)]
    notes = []
    if args.nchw:
        plain = apply_speed(dataclasses.replace(components, vae=copy.deepcopy(components.vae)), SpeedOptions(channels_last=False), device)
        rows.append(lienzo_row(f"lienzo ({name}, NCHW VAE)", plain, device, request))
    if want_fp8:
        rows.append(lienzo_row("lienzo (fp8 storage)", dataclasses.replace(ours, transformer=fp8_twin(ours.transformer)), device, request))
    if want_gguf:
        with tempfile.TemporaryDirectory() as folder:
            network, seconds = gguf_transformer(ours.transformer, device, dtype, Path(folder))
        rows.append(lienzo_row("lienzo (GGUF Q8_0)", dataclasses.replace(ours, transformer=network), device, request))
        notes.append(f"GGUF Q8_0: writing the file and loading it through lienzo took {seconds:.0f} s")

    measure(rows, args.runs, device)
    print(table(rows, baseline))
    print()
    for note in notes:
        print(note)
    blank = float(np.ptp(baseline.pixels))
    print(f"{_load()} at the end")
    print(f"diffusers' image spans {blank:.3f} of the 0-1 range (a flat image would make the pixel comparison say little)")


def _load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
