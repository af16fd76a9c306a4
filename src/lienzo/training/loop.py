"""One stage's training: its optimizer, schedule and EMA (``start_stage``), one optimizer step
(``train_step``), and the batches it draws (see ``stream``: every draw is seeded by sample position).

On a GPU the step never waits for the host: the data is on the device (``cache``), the losses stay
there until the trainer reads them, and the optimizer is fused."""

import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from lienzo.training.cache import Latents, Pixels, Prompts, encode_latents, tokenize_prompts
from lienzo.training.config import Data, Optim, TrainConfig
from lienzo.training.data import ImageRecord
from lienzo.training.losses import AutoencoderLoss, DenoiserLoss, VGGPerceptual
from lienzo.training.models import PROMPT_LENGTH, Networks
from lienzo.training.state import STAGES, TrainingError
from lienzo.training.stream import SampleStream, random_crop, sample_seed

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """One stage's training objects, built by ``start_stage``; a checkpoint saves its optimizer, schedule and EMA."""

    name: str
    cfg: Optim
    module: torch.nn.Module  # the loss module, as accelerate prepared it
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    ema: EMAModel | None  # None without EMA, and once the stage is done (its weights are the model's then)
    stream: SampleStream
    cache: Latents | None = None  # UNet stage with cache_latents
    prompts: Prompts | None = None  # UNet stage
    # Throughput since the stage's loop (re)started in this session, for the log and the progress bar.
    started: float = field(default_factory=time.perf_counter)
    images: int = 0

    @property
    def index(self) -> int:
        return STAGES.index(self.name)


def lr_factor(cfg: Optim) -> Callable[[int], float]:
    """Linear warmup, then cosine to zero, step decay (x gamma every step_size) or constant.

    One closed-form function of the step (torch's chained schedulers recompute from the previous
    rate) so a resumed run gets the very same rates; diffusers' table has no step decay.
    """

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        done = step - cfg.warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done / max(1, cfg.steps - cfg.warmup))))
        if cfg.schedule == "step":
            return cfg.gamma ** (done // cfg.step_size)
        return 1.0

    return factor


def stage_config(config: TrainConfig, stage: str) -> Optim:
    return config.vae if stage == "vae" else config.unet


def start_stage(config: TrainConfig, stage: str, acc: Accelerator, nets: Networks, pixels: Pixels, *,
                checkpoint: Path | None, perceptual_weights: Path | None) -> StageRun:
    """The stage's loss module, optimizer, LR schedule and EMA, restored from ``checkpoint`` when given."""
    cfg = stage_config(config, stage)
    # 1. A VAE trained in this run gets SD's latent scale; a given one keeps its own.
    if checkpoint is None and stage == "unet" and "vae" in config.stages:
        set_latent_scale(nets.models["vae"], pixels)
    # 2. What trains, and the optimizer over it.
    module, trainable = _loss_module(config, stage, nets, perceptual_weights, acc.device)
    for p in trainable:
        p.requires_grad_(True)
    # fused on CUDA: one kernel for the whole update; foreach elsewhere: one kernel per op over all tensors
    # (torch picks it by default on CUDA only; 2x faster steps on CPU).
    fused = acc.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=fused or None, foreach=None if fused else True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    ema = EMAModel(trainable, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    # 3. The checkpoint's optimizer, schedule and EMA.
    if checkpoint is not None:
        saved = torch.load(checkpoint / "trainer.pt", map_location=acc.device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        _match_layouts(optimizer)
        schedule.load_state_dict(saved["schedule"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
            ema.to(acc.device)
    wrapped, optimizer = acc.prepare(module, optimizer)
    wrapped.train()
    # 4. The samples, and what the UNet stage computes once: latents and token ids never change in it.
    stream = SampleStream(len(pixels.dataset), config.seed, STAGES.index(stage), config.data.flip)
    cache = prompts = None
    if stage == "unet":
        cache = encode_latents(nets.models["vae"], pixels, config.data.flip) if config.unet.cache_latents else None
        prompts = tokenize_prompts(nets.tokenizer, PROMPT_LENGTH, config.data, config.seed, pixels.dataset.records, prompt_for, acc.device)
    return StageRun(stage, cfg, wrapped, trainable, optimizer, schedule, ema, stream, cache, prompts)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments in their weights' memory layout: a checkpoint stores them contiguous, and a fused
    update walks a weight and its moments as flat memory, element for element."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


def _loss_module(config: TrainConfig, stage: str, nets: Networks, perceptual_weights: Path | None,
                 device: torch.device) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    if stage == "vae":
        cfg = config.vae
        perceptual = None
        if cfg.perceptual_weight > 0 and perceptual_weights is None:
            log.warning("vae: no --perceptual-weights VGG16 file given; training with reconstruction + KL only")
        elif cfg.perceptual_weight > 0:
            perceptual = VGGPerceptual(perceptual_weights).to(device)
        vae = nets.models["vae"]
        module = AutoencoderLoss(vae, recon=cfg.recon_loss, kl_weight=cfg.kl_weight, perceptual=perceptual, perceptual_weight=cfg.perceptual_weight)
        return module, list(vae.parameters())
    unet, text_encoder = nets.models["unet"], nets.models["text_encoder"]
    loss = DenoiserLoss(unet, text_encoder, nets.noise, snr_gamma=config.unet.snr_gamma)
    if config.lora is not None:
        text_encoder.train(config.lora.text_encoder)
        return loss, nets.lora_params
    text_encoder.train(config.unet.train_text_encoder)
    trainable = list(unet.parameters())
    if config.unet.train_text_encoder:
        trainable += list(text_encoder.parameters())
    return loss, trainable


def finish_stage(run: StageRun) -> None:
    """The EMA weights become the model's weights, and nothing trains any more."""
    if run.ema is not None:
        run.ema.copy_to(run.trainable)
        run.ema = None
    for p in run.trainable:
        p.requires_grad_(False)


def train_step(run: StageRun, step: int, acc: Accelerator, config: TrainConfig, nets: Networks,
               pixels: Pixels) -> dict[str, torch.Tensor]:
    """One optimizer step: grad_accum micro-batches, then clip, step, EMA. Returns the mean loss and its
    parts as tensors on the device: reading them waits for the GPU, so the trainer does so only when it reports."""
    cfg = run.cfg
    world, rank = acc.num_processes, acc.process_index
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        # Sample positions: every process takes its own slice of the same global batch.
        first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
        samples = run.stream.take(first, cfg.batch_size)
        with ExitStack() as sync:
            if micro < cfg.grad_accum - 1:
                sync.enter_context(acc.no_sync(run.module))
            with acc.autocast():
                loss, parts = _forward(run, samples, acc.device, config, nets, pixels)
            acc.backward(loss / cfg.grad_accum)
        for k, v in {"loss": loss.detach(), **parts}.items():
            parts_sum[k] = parts_sum.get(k, 0) + v.float() / cfg.grad_accum
    acc.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.trainable)
    return parts_sum


def check_loss(run: StageRun, loss: float, step: int) -> None:
    """A loss that is no longer a number stops the run: nothing after it can be trusted."""
    if not math.isfinite(loss):
        raise TrainingError(f"{run.name}.lr: the loss became {loss} by step {step}; lower the learning rate")


def _forward(run: StageRun, samples, device: torch.device, config: TrainConfig, nets: Networks, pixels: Pixels):
    generators = [torch.Generator().manual_seed(sample_seed(config.seed, run.index, p)) for p, _, _ in samples]
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if run.name == "vae":
        # Draw order per sample: crop corner (when cropping), then the posterior sample.
        crops = [random_crop(pixels.get(i, flip), config.vae.crop, g) for (_, i, flip), g in zip(samples, generators, strict=True)]
        return run.module(torch.stack(crops).contiguous(memory_format=layout), generators)
    vae = nets.models["vae"]
    shape = (vae.config.latent_channels, *latent_hw(vae, config.resolution))
    # Draw order per sample: posterior sample, noise, timestep, caption dropout, caption variant.
    eps = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    keys = [(i, flip) for _, i, flip in samples]
    if run.cache is not None:
        mean, std = run.cache.take(keys)
    else:
        with torch.no_grad():
            dist = vae.encode(pixels.batch(keys)).latent_dist
        mean, std = dist.mean, dist.std
    latents = ((mean + std * eps) * vae.config.scaling_factor).contiguous(memory_format=layout)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device).contiguous(memory_format=layout)
    timesteps = torch.cat([torch.randint(0, nets.noise.config.num_train_timesteps, (1,), generator=g) for g in generators]).to(device)
    drop = [float(torch.rand((), generator=g)) < config.unet.caption_dropout for g in generators]
    prompts = run.prompts
    variants = [int(torch.randint(0, prompts.variants, (), generator=g)) if prompts.variants > 1 else 0 for g in generators]
    ids = torch.stack([prompts.empty if d else prompts.ids[i, v] for (_, i, _), d, v in zip(samples, drop, variants, strict=True)])
    return run.module(latents, ids, noise, timesteps)


def prompt_for(data: Data, record: ImageRecord) -> str:
    """What a training image is conditioned on: its caption, its label as text, or nothing."""
    label = (record.label or "").replace("_", " ")
    if data.conditioning == "caption" and record.caption:
        return record.caption
    if data.conditioning in ("caption", "label") and label:
        return data.label_template.format(label=label)
    return ""


def latent_hw(vae, resolution: int) -> tuple[int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    return side, side


@torch.no_grad()
def set_latent_scale(vae, pixels: Pixels) -> None:
    """SD's latent scale: 1 / std of the latents (0.18215 for SD's VAE), measured on up to 256 images."""
    count = min(len(pixels.dataset), 256)
    latents = []
    for start in range(0, count, 16):
        batch = pixels.batch([(i, False) for i in range(start, min(count, start + 16))])
        latents.append(vae.encode(batch).latent_dist.mean)
    scale = float(1.0 / torch.cat(latents).float().std())
    vae.register_to_config(scaling_factor=scale)
    log.info("latent scaling factor: %.5f", scale)
