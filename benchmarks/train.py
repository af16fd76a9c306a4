"""Training speed. On a CPU: lienzo's UNet stage next to a bare PyTorch loop on the same model, in one
process. On a GPU (``--device cuda``): images/s of each stage of the recipes, and the share of the
GPU's bf16 FLOP floor that reaches.

    python benchmarks/train.py                 # tiny and mini presets, CPU
    python benchmarks/train.py --presets tiny --steps 30 --rounds 3
    python benchmarks/train.py --device cuda --data data/openmoji/train --vae src/lienzo/weights/lienzo-mini/vae

Both sides train the same seeded UNet + text encoder on the same images' latents with the same batch
size, and do the same math per step: text encoder + UNet forward, MSE on the noise, backward, gradient
clipping, AdamW (foreach, as the trainer sets it), EMA. The bare loop keeps latents and token ids in tensors and draws its noise from
one generator; the trainer adds what a real run needs (per-sample seeded noise for exact resume,
caption dropout, tokenising captions, loss logging, progress). Rounds alternate bare / trainer, and
per-step times are compared as medians after the first steps of each round (warm-up).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lienzo.training.config import build_config, parse_override
from lienzo.training.losses import DenoiserLoss
from lienzo.training.models import build_models, noise_scheduler
from lienzo.training.trainer import Trainer

WARMUP = 3


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        array = np.clip(rng.normal(rng.integers(0, 256, 3), 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture, number {i}")


def bare_loop(config, vae_dir: Path, steps: int) -> list[float]:
    """The textbook loop: cached latents in a tensor, one generator, AdamW, clip, EMA by lerp."""
    models = build_models(config)
    vae = type(models["vae"]).from_pretrained(vae_dir)
    unet, text_encoder = models["unet"], models["text_encoder"]
    noise = noise_scheduler(config)
    cfg = config.unet
    side = config.resolution
    pixels = torch.rand(64, 3, side, side) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    ids = torch.randint(0, 49407, (64, 77))
    loss_fn = DenoiserLoss(unet, text_encoder, noise, snr_gamma=0.0).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    shadow = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        index = torch.randint(0, 64, (cfg.batch_size,), generator=g)
        x = latents[index]
        eps = torch.randn(x.shape, generator=g)
        t = torch.randint(0, noise.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        loss, _ = loss_fn(x, ids[index], eps, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - cfg.ema_decay)
        times.append(time.perf_counter() - started)
    return times


def trainer_run(config, data: Path, vae_dir: Path, out: Path, steps: int) -> list[float]:
    stamps: list[float] = []
    config = config.model_copy(update={"unet": config.unet.model_copy(update={"steps": steps})})
    Trainer(config, data=data, out=out, vae=vae_dir, device="cpu", progress=lambda p: stamps.append(time.perf_counter())).run()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


# The GPU rows: (name, config layers, stage). "v1" is lienzo-mini version 1's recipe (128x128, UNet
# [96, 192, 192] in batches of 32, VAE on 64x64 crops in batches of 16), which an H100 trained at ~284
# (UNet) and ~160 (VAE) images/s before the trainer kept its data on the GPU; "v2" is recipes/lienzo-mini.toml.
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "lienzo-mini.toml"
V1 = {"resolution": 128, "model": {"unet": {"block_out_channels": [96, 192, 192]}}, "unet": {"batch_size": 32},
      "vae": {"batch_size": 16, "crop": 64, "lr": 4.5e-4}, "data": {"caption_variants": 1}}
QUIET = {"samples": {"every": 0, "prompts": []}, "checkpoint_every": 0, "log_every": 1000}
GPU_ROWS = {
    "v1 vae": ([V1], "vae"),
    "v1 unet": ([V1], "unet"),
    "v2 vae (batch 64, 128 crops)": ([{"vae": {"batch_size": 64, "crop": 128}}], "vae"),
    "v2 unet": ([], "unet"),
    "v2 unet, compiled": ([{"compile": True}], "unet"),
}


def step_flops(config, stage: str, device: str) -> float:
    """FLOPs of one training image, forward and backward, counted by torch on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    from lienzo.training.losses import AutoencoderLoss

    models = {k: m.to(device) for k, m in build_models(config).items()}
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        if stage == "vae":
            side = config.vae.crop or config.resolution
            loss = AutoencoderLoss(models["vae"], recon="l1", kl_weight=1e-6, perceptual=None, perceptual_weight=0)
            value, _ = loss(torch.randn(2, 3, side, side, device=device), generators)
        else:
            side = config.resolution // 2 ** (len(config.model.vae.block_out_channels) - 1)
            loss = DenoiserLoss(models["unet"], models["text_encoder"].train(), noise_scheduler(config), snr_gamma=0.0)
            latents = torch.randn(2, 4, side, side, device=device)
            ids = torch.randint(0, 49407, (2, 77), device=device)
            value, _ = loss(latents, ids, torch.randn_like(latents), torch.tensor([10, 900], device=device))
        value.backward()
    return counter.get_total_flops() / 2


def bf16_peak(device: str) -> float:
    """FLOP/s of a large bf16 matrix product on this GPU: the floor's rate."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started)


def gpu_rate(config, stage: str, data: Path, vae: Path, out: Path, device: str) -> tuple[float, float]:
    """Steady images/s of the trainer on ``stage`` (after its first fifth of steps), and the seconds to its first step."""
    stamps: list[tuple[float, int]] = []
    started = time.perf_counter()
    Trainer(config, data=data, out=out, vae=vae if stage == "unet" else None, device=device,
            progress=lambda p: stamps.append((time.perf_counter(), p.step))).run()
    steps = (config.vae if stage == "vae" else config.unet).steps
    batch = (config.vae if stage == "vae" else config.unet).batch_size
    first = next(i for i, (_, step) in enumerate(stamps) if step >= steps // 5)
    (t0, s0), (t1, s1) = stamps[first], stamps[-1]
    return (s1 - s0) * batch / (t1 - t0), stamps[0][0] - started


def gpu_main(args) -> None:
    import json

    peak = bf16_peak(args.device) if args.device == "cuda" else float("nan")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, name in enumerate(args.rows):
            layers, stage = GPU_ROWS[name]
            sets = [parse_override(text) for text in args.set]
            config = build_config(file=RECIPE, overrides=[*layers, *sets, QUIET, {"stages": [stage], stage: {"steps": args.steps}}])
            rate, first = gpu_rate(config, stage, args.data, args.vae, Path(tmp) / f"run{n}", args.device)
            flops = step_flops(config, stage, args.device)
            results.append({"row": name, "stage": stage, "batch": (config.vae if stage == "vae" else config.unet).batch_size,
                            "images_per_s": rate, "gflop_per_image": flops / 1e9, "share_of_floor": rate * flops / peak,
                            "seconds_to_first_step": first})
            print(json.dumps(results[-1]), flush=True)
            if args.json is not None:  # after every row: a run cut short keeps the rows it measured
                args.json.write_text(json.dumps({"device": device_name, "peak_flops": peak, "rows": results}, indent=1))
    print(f"\n{device_name}, torch {torch.__version__}, bf16 matmul {peak / 1e12:.0f} TFLOP/s, "
          f"{args.steps} steps per row (rate over the last four fifths)")
    print(f"{'row':32} {'batch':>5} {'img/s':>9} {'GFLOP/img':>10} {'floor share':>12} {'to 1st step s':>14}")
    for r in results:
        print(f"{r['row']:32} {r['batch']:>5} {r['images_per_s']:>9.0f} {r['gflop_per_image']:>10.1f} {r['share_of_floor']:>12.1%} "
              f"{r['seconds_to_first_step']:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--presets", nargs="+", default=["tiny", "mini"], help="CPU: the presets to compare")
    parser.add_argument("--steps", type=int, default=15, help="steps per round and side (CPU), per row (GPU)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, help="GPU: the training folder (lienzo dataset openmoji --size 256)")
    parser.add_argument("--vae", type=Path, help="GPU: the VAE the UNet rows train on (lienzo-mini's)")
    parser.add_argument("--rows", nargs="+", choices=list(GPU_ROWS), help="the rows to run (default on a GPU: all of them)")
    parser.add_argument("--json", type=Path, help="GPU: also write the rows as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every recipe row")
    args = parser.parse_args()
    if args.device == "cuda" or args.rows:
        if args.data is None or args.vae is None:
            parser.error("the recipe rows need --data and --vae")
        args.rows = args.rows or list(GPU_ROWS)
        gpu_main(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            base = build_config(preset, overrides=[{"stages": ["unet"], "samples": {"every": 0, "prompts": []}, "checkpoint_every": 0}])
            data = tmp / f"{preset}-data"
            make_images(data, 64, base.resolution)
            vae_dir = tmp / f"{preset}-vae"
            build_models(base)["vae"].save_pretrained(vae_dir)
            bare, ours = [], []
            for r in range(args.rounds):
                bare += bare_loop(base, vae_dir, args.steps)[WARMUP:]
                ours += trainer_run(base, data, vae_dir, tmp / f"{preset}-run{r}", args.steps + 1)[WARMUP:]
            b, o = statistics.median(bare), statistics.median(ours)
            batch = base.unet.batch_size
            rows.append((preset, batch, batch / b, batch / o, o / b - 1))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, UNet stage, median of {args.rounds} x {args.steps - WARMUP} steps")
    print(f"{'preset':8} {'batch':>5} {'bare img/s':>11} {'lienzo img/s':>13} {'overhead':>9}")
    for preset, batch, bare_rate, our_rate, overhead in rows:
        print(f"{preset:8} {batch:>5} {bare_rate:>11.2f} {our_rate:>13.2f} {overhead:>+9.1%}")


if __name__ == "__main__":
    main()
