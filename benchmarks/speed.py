"""lienzo against diffusers' default pipeline, side by side, on random-weight Stable Diffusion models.

One process builds the model once (SD 1.5's architecture; SDXL's on a GPU with the memory for it),
then runs diffusers' ``StableDiffusion(XL)Pipeline`` as its documentation sets it up (fp32 on the CPU,
fp16 on a GPU) and lienzo's engine in several modes, all on the same weights, prompt, sampler, steps
and seed, alternating runs after one warm-up each. It prints, per size:

- s/image: the median of ``--repeats`` runs (prompt encoding, denoising and VAE decode);
- it/s: denoising steps per second, from the time between the first and the last step's end;
- peak memory added during a run (CPU: resident set sampled every 5 ms; GPU: torch's peak allocation);
- the speed-up over diffusers (its median s/image over the row's);
- agreement with the fp32 reference (diffusers in fp32 on the CPU, lienzo in fp32 on a GPU): PSNR in
  dB over 8-bit pixels and the largest absolute pixel difference (0-255);
- under each table, the FLOP floor: one CFG step's floating-point operations (torch's FLOP counter over
  the U-Net at batch 2) divided by the rate of a large matmul in each dtype the rows run in on this device,
  and the share of its own dtype's floor each row's steps reach (floor s/step x it/s): a bf16 row against
  the bf16 floor, not the fp32 one.

Weights are random: speed does not depend on their values, and PSNR compares the same computation in
other number formats. A compiled row also reports the first run (compilation included) on its own.

    python benchmarks/speed.py                          # CPU: 256 and 512, 4 steps
    python benchmarks/speed.py --sizes 512 --steps 20   # GPU: SD 1.5 at 512 and SDXL at 1024
    python benchmarks/speed.py --compile --int8
    python benchmarks/speed.py --model MODEL --sizes 128 --fast-png fast.png   # judge --fast on a real model
    python benchmarks/speed.py --int8 --peers          # also OpenVINO and stable-diffusion.cpp, when installed
    python benchmarks/speed.py --sizes 512 --peers openvino
    python benchmarks/speed.py --isa avx2 --int8       # this CPU run as an AVX2-only one (oneDNN and ATen capped)

``--peers`` adds what a CPU user would pick instead of lienzo: OpenVINO through optimum-intel (FastSD CPU's
engine; ``benchmarks/peer_openvino.py``) and stable-diffusion.cpp (``benchmarks/peer_sdcpp.py``), each on the
same random weights exported to its own format. They are not lienzo's dependencies: each module says how to
install it, and a missing one is reported and skipped. sd.cpp draws its own noise, so its PSNR column says so.

``--isa avx2`` runs the benchmark again in a process whose oneDNN, ATen and MKL kernels are capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``): the nearest thing to an AVX2-only CPU on a newer
one (same cores, clocks and caches, so it is a stand-in, not a measurement of another CPU). lienzo's ``auto``
precision follows the cap (fp32). The peers are skipped there: their own kernels ignore the cap.
"""

import argparse
import copy
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from lienzo.devices import cpu_has_native_bf16, pick_dtype  # noqa: E402
from lienzo.generation import engine  # noqa: E402
from lienzo.generation.request import build_request  # noqa: E402
from lienzo.generation.samplers import build_scheduler, resolve_sampler  # noqa: E402
from lienzo.models.components import Components  # noqa: E402
from lienzo.models.single_file_layout import bundled_tokenizer, scheduler_config_for  # noqa: E402
from lienzo.models.speed import SpeedOptions, apply_speed  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry"


def _text_encoder(hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads, num_hidden_layers=layers,
        max_position_embeddings=77, vocab_size=49408, hidden_act=act, projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(scaling: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling,
    ).eval()


def sd15() -> Components:
    """SD 1.5's published architecture (860M UNet, ViT-L/14 text encoder, 84M VAE), random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
    text = _text_encoder(768, 12, 12, "quick_gelu")
    return Components(unet, _vae(0.18215), text, bundled_tokenizer("<|endoftext|>"), scheduler_config_for("epsilon"), "sd1", name="SD 1.5")


def sdxl() -> Components:
    """SDXL 1.0 base's published architecture (2.6B UNet, CLIP ViT-L + OpenCLIP bigG), random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).eval()
    text = _text_encoder(768, 12, 12, "quick_gelu")
    text_2 = _text_encoder(1280, 32, 20, "gelu", projection=1280)
    return Components(
        unet, _vae(0.13025), text, bundled_tokenizer("<|endoftext|>"), scheduler_config_for("epsilon"), "sdxl",
        text_encoder_2=text_2, tokenizer_2=bundled_tokenizer("!"), name="SDXL",
    )


class PeakMemory:
    """Peak memory added inside the block: torch's peak allocation on CUDA, else the resident set sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclass
class Row:
    name: str
    run: object  # () -> (pixels HxWx3 float in [0, 1], step end times)
    seconds: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    first: float = 0.0
    pixels: np.ndarray | None = None
    note: str = ""
    dtype: torch.dtype = torch.float32  # what its matmuls run in: its FLOP floor is that dtype's
    comparable: bool = True  # False: it draws its own noise (sd.cpp), so PSNR against the reference means nothing


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a8, b8 = np.round(a * 255).astype(np.float64), np.round(b * 255).astype(np.float64)
    mse = np.mean((a8 - b8) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lienzo_row(name: str, components: Components, device: torch.device, request, note: str = "") -> Row:
    """lienzo's engine on ``components``; its floor is the U-Net's dtype's."""
    def run():
        stamps = []
        result = engine.generate(components, request, progress=lambda p: (_sync(device), stamps.append(time.perf_counter())))
        return result.images[0].pixels, stamps

    return Row(name, run, note=note, dtype=components.unet.dtype)


def diffusers_row(name: str, components: Components, device: torch.device, size: int, steps: int, sampler) -> Row:
    parts = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=components.unet,
                 scheduler=build_scheduler(sampler, "Uniform", components.scheduler_config))
    if components.family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run():
        stamps = []

        def on_step(_pipe, _i, _t, kwargs):
            _sync(device)
            stamps.append(time.perf_counter())
            return kwargs

        image = pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
            generator=torch.Generator().manual_seed(1), output_type="np", callback_on_step_end=on_step,
        ).images[0]
        return image, stamps

    return Row(name, run, dtype=components.unet.dtype)


def measure(rows: list[Row], repeats: int, device: torch.device) -> None:
    for row in rows:  # warm-up: first-call allocations, kernel choice, compilation
        started = time.perf_counter()
        row.pixels, _ = row.run()
        row.first = time.perf_counter() - started
    for _ in range(repeats):
        for row in rows:
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                _, stamps = row.run()
                _sync(device)
                row.seconds.append(time.perf_counter() - started)
            row.peaks.append(memory.added_mib)
            if len(stamps) > 1:
                row.rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))


def table(rows: list[Row], reference: np.ndarray, baseline: Row) -> str:
    base = statistics.median(baseline.seconds)
    lines = [f"| {'':34} | s/image | it/s | peak MiB | speed-up | PSNR dB | max diff | first run s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        seconds = statistics.median(row.seconds)
        rate = f"{statistics.median(row.rates):.2f}" if row.rates else "-"
        if row.comparable:
            agreement = psnr(row.pixels, reference)
            shown = "exact" if agreement == float("inf") else f"{agreement:.1f}"
            diff = f"{np.abs(np.round(row.pixels * 255) - np.round(reference * 255)).max():.0f}"
        else:
            shown, diff = "own noise", "-"
        lines.append(
            f"| {row.name + (f' ({row.note})' if row.note else ''):34} | {seconds:.2f} | {rate} | {max(row.peaks):.0f} "
            f"| {base / seconds:.2f}x | {shown} | {diff} | {row.first:.1f} |"
        )
    return "\n".join(lines)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on ``device``, median of 5: what dense layers can reach here."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(6):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times[1:])


def step_flops(components: Components, size: int, device: torch.device) -> float:
    """Floating-point operations of one CFG step: the U-Net once at batch 2 (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = components.unet
    latents = torch.zeros(2, unet.config.in_channels, size // 8, size // 8, device=device, dtype=unet.dtype)
    context = torch.zeros(2, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    extra = {}
    if components.family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(2, 1280, device=device, dtype=unet.dtype), "time_ids": torch.zeros(2, 6, device=device, dtype=unet.dtype),
        }
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([500, 500], device=device), encoder_hidden_states=context, **extra)
    return float(counter.get_total_flops())


def floor_line(rows: list[Row], flops: float, rates: dict[torch.dtype, float]) -> str:
    """The FLOP floor of one step in each dtype the rows run in (``rates``: that dtype's matmul FLOP/s here), and the
    share of its own dtype's floor each row reaches. Fast mode skips U-Net blocks, so it can pass 100%; int8 layers
    run faster than the floor of the dtype around them too."""
    floors = {dtype: flops / rate for dtype, rate in rates.items()}
    each = "; ".join(f"{_dtype(d)} {rates[d] / 1e9:.0f} GFLOP/s, at least {floors[d]:.2f} s a step" for d in floors)
    shares = ", ".join(
        f"{row.name} {100 * floors[row.dtype] * statistics.median(row.rates):.0f}% ({_dtype(row.dtype)})" for row in rows if row.rates
    )
    return f"FLOP floor: one CFG step is {flops / 1e12:.2f} TFLOP; matmuls here: {each}. Share of its dtype's floor reached: {shares}"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides (default: 256 512 on a CPU, 512 on a GPU)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 4 on a CPU, 20 on a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--compile", action="store_true", help="add a row with torch.compile (the first run compiles)")
    parser.add_argument("--nchw", action="store_true", help="add a row without the channels_last layout (on by default)")
    parser.add_argument("--int8", action="store_true", help="add rows with int8 linear layers, alone and with --fast (CPU)")
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1024 (default on a GPU with 16 GB or more)")
    parser.add_argument("--fast-png", help="write the normal and fast images side by side to this PNG")
    parser.add_argument("--model", help="a real checkpoint instead of random SD 1.5 weights (for --fast-png)")
    parser.add_argument(
        "--peers", nargs="*", choices=["openvino", "sdcpp"],
        help="add OpenVINO and stable-diffusion.cpp rows (CPU), when installed; name one to run only it",
    )
    parser.add_argument("--isa", choices=["avx2"], help="cap oneDNN and ATen at this instruction set (an AVX2-only CPU, emulated)")
    args = parser.parse_args()
    if args.isa and os.environ.get("ONEDNN_MAX_CPU_ISA") != args.isa.upper():
        # Both libraries read their cap once, when torch loads: the run happens in a fresh process.
        # oneDNN runs the convolutions, ATen the elementwise kernels, MKL the fp32 matmuls: each has its own cap.
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": args.isa.upper(), "ATEN_CPU_CAPABILITY": args.isa,
               "MKL_ENABLE_INSTRUCTIONS": args.isa.upper()}
        raise SystemExit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    torch.set_grad_enabled(False)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    sizes = args.sizes or ([512] if gpu else [256, 512])
    steps = args.steps or (20 if gpu else 4)
    sampler = resolve_sampler(args.sampler)
    auto = pick_dtype("auto", device)
    base_dtype = torch.float16 if gpu else torch.float32  # what diffusers' documentation runs on each
    if gpu:
        what = torch.cuda.get_device_name()
    else:
        what = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
            f"ATen kernels: {torch.backends.cpu.get_cpu_capability()}"
            + (f", oneDNN capped at {os.environ['ONEDNN_MAX_CPU_ISA']}" if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
        )
    print(f"# lienzo vs diffusers, {date.today()}, torch {torch.__version__}, {what}")
    print(f"random weights, {steps} steps {sampler.name}, CFG 7, batch 1, {args.repeats} runs each after one warm-up; lienzo default dtype here: {auto}\n")

    if args.model:
        models = [lambda: _load(args.model)]
    else:
        models = [sd15]
        if args.sdxl or (gpu and torch.cuda.get_device_properties(0).total_memory >= 16 * 2**30):
            models.append(sdxl)
    workdir = tempfile.mkdtemp(prefix="lienzo-speed-")  # the peers' exported models, kept across sizes
    for build in models:
        fp32 = build()
        model_sizes = [1024] if fp32.family == "sdxl" and gpu and not args.sizes else sizes
        baseline_model = copy.deepcopy(fp32).to(device, base_dtype) if base_dtype != torch.float32 else fp32
        default_model = apply_speed(copy.deepcopy(fp32).to(device, auto), SpeedOptions(), device)
        variants = {}
        if args.nchw:
            variants["--no-channels-last"] = apply_speed(copy.deepcopy(fp32).to(device, auto), SpeedOptions(channels_last=False), device)
        if args.compile:
            variants["compile"] = apply_speed(copy.deepcopy(fp32).to(device, auto), SpeedOptions(compile=True), device)
        if args.int8:
            variants["--int8"] = apply_speed(copy.deepcopy(fp32).to(device, auto), SpeedOptions(int8=True), device)
        fp32.to(device)
        for size in model_sizes:
            request = build_request(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler=sampler.name, schedule="Uniform", seed=1, width=size, height=size)
            baseline = diffusers_row(f"diffusers ({str(base_dtype).removeprefix('torch.')})", baseline_model, device, size, steps, sampler)
            normal = lienzo_row("lienzo", default_model, device, request, note=str(auto).removeprefix("torch."))
            fast = lienzo_row("lienzo --fast", default_model, device, request.model_copy(update={"fast": True}), note="DeepCache 3")
            rows = [baseline] + ([lienzo_row("lienzo (float32)", fp32, device, request)] if gpu else []) + [normal, fast]
            rows += [lienzo_row(f"lienzo {name}", model, device, request) for name, model in variants.items()]
            if "--int8" in variants:
                rows.append(lienzo_row("lienzo --int8 --fast", variants["--int8"], device, request.model_copy(update={"fast": True})))
            if args.peers is not None and not gpu:
                rows += peer_rows(fp32, size, steps, sampler, workdir, args.peers or ["openvino", "sdcpp"])
            measure(rows, args.repeats, device)
            # The fp32 reference: diffusers' own run on the CPU; on a GPU, one more diffusers run in fp32.
            reference = baseline.pixels if not gpu else diffusers_row("fp32", fp32, device, size, steps, sampler).run()[0]
            print(f"## {fp32.name}, {size}x{size}\n")
            print(table(rows, reference, baseline))
            print()
            rates = {row.dtype: matmul_rate(device, row.dtype, 8192 if gpu else 2048) for row in rows}
            print(floor_line(rows, step_flops(fp32, size, device), rates))
            print()
            if args.fast_png:
                side = np.concatenate([normal.pixels, fast.pixels], axis=1)
                Image.fromarray(np.round(side * 255).astype(np.uint8)).save(args.fast_png)
                print(f"lienzo | lienzo --fast written to {args.fast_png}\n")
        del baseline_model, default_model, variants, fp32
    shutil.rmtree(workdir, ignore_errors=True)


def peer_rows(components: Components, size: int, steps: int, sampler, workdir: str, names: list[str]) -> list[Row]:
    """OpenVINO's and stable-diffusion.cpp's rows on ``components`` exported to their formats; a peer that is
    not installed (or, with ``--isa``, would ignore the cap) is named with how to install it, and skipped."""
    import peer_openvino
    import peer_sdcpp

    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        print("peers skipped: OpenVINO and sd.cpp pick their own kernels, whatever oneDNN's cap says\n")
        return []
    rows = []
    # Each peer's fastest modes and its int8 one; their fp32 modes are left out, for memory (24 GiB here).
    peers = {
        "openvino": ("OpenVINO", peer_openvino.openvino_missing, peer_openvino.openvino_rows, ("default", "int8")),
        "sdcpp": ("stable-diffusion.cpp", peer_sdcpp.sdcpp_missing, peer_sdcpp.sdcpp_rows, ("f16", "q8_0")),
    }
    for name, missing, build, modes in (peers[key] for key in names):
        hint = missing()
        if hint:
            print(f"{name} rows skipped: {hint}\n")
            continue
        rows += build(components, size, steps, sampler, os.path.join(workdir, name), modes=modes)
    return rows


def _load(path: str) -> Components:
    """A real checkpoint (any format lienzo loads) in fp32, to judge --fast on pictures rather than noise."""
    from lienzo.models.loading import load_components

    components = load_components(path, dtype=torch.float32)
    components.name = os.path.basename(path.rstrip("/"))
    return components

if __name__ == "__main__":
    main()
