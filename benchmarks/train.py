"""UNet-stage training speed: lienzo's trainer next to a bare PyTorch loop on the same model, in one process.

    python benchmarks/train.py                 # tiny and mini presets, CPU
    python benchmarks/train.py --presets tiny --steps 30 --rounds 3

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

from lienzo.training.config import build_config
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mini"])
    parser.add_argument("--steps", type=int, default=15, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
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
