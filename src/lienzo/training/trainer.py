"""The trainer: a Stable Diffusion-architecture latent diffusion model from a folder of images, or a LoRA.

A run is a folder. Once the UNet stage has something to show, the folder itself is a diffusers
model (``lienzo generate --model RUN``); everything about the training lives under ``RUN/training``::

    RUN/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   the model (EMA weights)
    RUN/README.md, RUN/dataset_manifest.json                                   model card, data provenance
    RUN/training/config.toml, state.json, loss.csv, loss.png, samples/, checkpoints/<stage>-<step>/

Exact resume: every random draw is a pure function of (seed, stage, sample position) — data order,
mirror flips, posterior samples, noise, timesteps, caption dropout — so a checkpoint needs only the
weights, EMA, optimizer, LR schedule and step to continue bit for bit. The same rule makes N processes
with batch B/N see the same samples and noise as one process with batch B.
"""

import copy
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lienzo.devices import pick_device
from lienzo.errors import LienzoError
from lienzo.generation.engine import generate, native_size
from lienzo.generation.request import build_request
from lienzo.images.grid import image_grid
from lienzo.training.memorisation import MemorisationCheck
from lienzo.images.io import save_png_atomic, write_atomic
from lienzo.models.components import Components
from lienzo.models.loading import load_components
from lienzo.models.single_file import bundled_tokenizer
from lienzo.training import artifacts
from lienzo.training.config import Optim, TrainConfig, read_toml, to_toml, validate_config
from lienzo.training.data import DatasetScan, ImageDataset, manifest_summary, read_manifest, scan_folder, write_manifest
from lienzo.training.lora import ADAPTER, add_lora, save_kohya_lora
from lienzo.training.losses import AutoencoderLoss, DenoiserLoss, VGGPerceptual

log = logging.getLogger(__name__)

STAGES = ("vae", "unet")
_CLIP_BOS, _CLIP_EOS = 49406, 49407
_PROMPT_LENGTH = 77  # CLIP's context; the engine encodes prompts in chunks of this length


class TrainingError(LienzoError):
    """A run that cannot start or continue: bad output folder, mismatched resume, diverging loss."""


@dataclass
class TrainProgress:
    stage: str
    step: int
    total: int
    loss: float
    lr: float
    images_per_s: float
    elapsed: float


@dataclass
class TrainResult:
    out: Path
    status: Literal["finished", "stopped", "interrupted"]
    steps: dict[str, int]
    seconds: float


@dataclass
class RunState:
    """``state.json`` in every checkpoint: where the run is and what it has cost so far."""

    stage: str
    step: int
    done: list[str]
    data: str
    manifest_sha256: str
    seconds: float = 0.0
    images_seen: dict[str, int] = field(default_factory=dict)
    device: str = ""
    processes: int = 1
    mixed_precision: str = "no"


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stage, position), the same on every machine."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SampleStream:
    """The endless sequence of (record index, mirror) pairs a stage trains on: one shuffled epoch after another."""

    def __init__(self, size: int, seed: int, stage: int, flip: bool):
        self.size, self.seed, self.stage, self.flip = size, seed, stage, flip
        self._epochs: dict[int, tuple[list[int], list[bool]]] = {}

    def _epoch(self, epoch: int) -> tuple[list[int], list[bool]]:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.stage, 2**40 + epoch))
            order = torch.randperm(self.size, generator=g).tolist()
            flips = (torch.rand(self.size, generator=g) < 0.5).tolist() if self.flip else [False] * self.size
            self._epochs = {epoch: (order, flips)}  # only the current epoch is ever needed again
        return self._epochs[epoch]

    def take(self, position: int, count: int) -> list[tuple[int, int, bool]]:
        """``count`` samples from ``position`` on, as (position, record index, mirror)."""
        out = []
        for p in range(position, position + count):
            order, flips = self._epoch(p // self.size)
            i = order[p % self.size]
            out.append((p, i, flips[p % self.size]))
        return out


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


def noise_scheduler(config: TrainConfig, base: dict | None = None) -> DDPMScheduler:
    """The training noise schedule: the base model's for a LoRA, the config's otherwise."""
    if base is not None:
        return DDPMScheduler.from_config(base)
    m = config.model
    return DDPMScheduler(
        num_train_timesteps=m.num_train_timesteps, beta_start=m.beta_start, beta_end=m.beta_end,
        beta_schedule=m.beta_schedule, prediction_type=m.prediction_type, clip_sample=False,
        steps_offset=1, timestep_spacing="leading",
    )


def _random_crop(pixels: torch.Tensor, side: int | None, generator: torch.Generator) -> torch.Tensor:
    """A ``side`` x ``side`` window of a C,H,W image at a corner drawn from ``generator``; the image when ``side`` is None."""
    if side is None:
        return pixels
    height, width = pixels.shape[-2:]
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    return pixels[:, top : top + side, left : left + side]


def build_models(config: TrainConfig) -> dict[str, torch.nn.Module]:
    """Fresh seeded VAE, text encoder and UNet with the Stable Diffusion architecture (SD 1.x layout)."""
    torch.manual_seed(config.seed)
    v, u, t = config.model.vae, config.model.unet, config.model.text_encoder
    levels = len(v.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=v.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups, sample_size=config.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
            num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=_PROMPT_LENGTH,
            hidden_act="quick_gelu", bos_token_id=_CLIP_BOS, eos_token_id=_CLIP_EOS, pad_token_id=_CLIP_EOS,
        )
    )
    latent_size = config.resolution // 2 ** (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=v.latent_channels, out_channels=v.latent_channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention)),
        cross_attention_dim=t.hidden_size, attention_head_dim=u.attention_heads, norm_num_groups=u.norm_num_groups,
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run (stage order first, then step). A checkpoint is complete
    once it has its name: it is written as ``<name>.tmp`` and renamed, and loses its ``state.json``
    first when it is deleted, so a kill at any moment leaves the previous complete one to resume from."""
    found = []
    for state_file in (run / "training" / "checkpoints").glob("*/state.json"):
        if _is_temp(state_file.parent):
            continue
        state = json.loads(state_file.read_text())
        found.append(((STAGES.index(state["stage"]), state["step"]), state_file.parent))
    return max(found)[1] if found else None


def saved_config(run: Path) -> TrainConfig:
    """The config a run was started with (``training/config.toml``), for ``--resume``."""
    path = run / "training" / "config.toml"
    if not path.is_file() and (run / "training").is_dir():
        raise TrainingError(f"resume: {run} was stopped before it saved its config; start it again with --data FOLDER --out {run}")
    if not path.is_file():
        raise TrainingError(f"resume: {run} is not a lienzo training run (no training/config.toml)")
    return validate_config(read_toml(path))


class Trainer:
    """Runs the stages of a config on a data folder into an output folder; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        data: Path | None,
        out: Path,
        resume: bool = False,
        perceptual_weights: Path | None = None,
        vae: Path | None = None,
        device: str = "auto",
        progress: Callable[[TrainProgress], None] | None = None,
        stop: Callable[[], bool] | None = None,
        stop_after: int | None = None,
        time_limit: float | None = None,
    ):
        self.config = config
        self.data, self.out, self.resume = (Path(data) if data else None), Path(out), resume
        self.perceptual_weights, self.vae_path = perceptual_weights, vae
        self.device_name = device
        self.progress, self.stop = progress, stop or (lambda: False)
        self.stop_after, self.time_limit = stop_after, time_limit
        self.training = self.out / "training"
        self.take_over = False  # out holds a run killed before its first checkpoint; this one replaces it
        self.log = artifacts.LossLog(self.training / "loss.csv")
        self._memorisation: MemorisationCheck | None = None

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        started = self.run_started = time.perf_counter()
        # 1. Devices: one process, or one per GPU / CPU slot under a distributed launcher.
        device = pick_device(self.device_name)
        precision = self.config.mixed_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
        self.precision = precision
        # 2. The output folder: new, or the run to continue (same config, same images).
        checkpoint = self._check_out()
        self.base = self._load_base() if self.config.lora is not None else None
        if checkpoint is None:
            self._start_out()  # after the base: a LoRA's resolution comes from it and goes into the config
        # 3. Data: every image checked; broken ones reported and skipped.
        self.scan = self._scan()
        # 4. Models: built from the config (or the LoRA base), then the checkpoint's weights.
        self.state = self._start_state(checkpoint)
        self._build(checkpoint)
        # 5. Stages, in order, each from where the checkpoint left it.
        self.session_steps, self.session_started = 0, time.perf_counter()
        self.seconds_before = self.state.seconds
        status: Literal["finished", "stopped", "interrupted"] = "finished"
        for stage in self.config.stages:
            if stage in self.state.done:
                continue
            status = self._run_stage(stage, checkpoint if checkpoint is not None and self.state.stage == stage else None)
            checkpoint = None
            if status != "finished":
                break
        # 6. The model folder and its card, whenever there is a UNet to show.
        self.state.seconds = self.seconds_before + time.perf_counter() - started
        if self.acc.is_main_process:
            self._export(finished=status == "finished")
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return TrainResult(self.out, status, self._steps_done(), self.state.seconds)

    def _steps_done(self) -> dict[str, int]:
        done = {s: self._stage_cfg(s).steps for s in self.state.done}
        if self.state.stage not in self.state.done:
            done[self.state.stage] = self.state.step
        return done

    def _stage_cfg(self, stage: str) -> Optim:
        return self.config.vae if stage == "vae" else self.config.unet

    # -- 2. output folder ---------------------------------------------------------------------------

    def _check_out(self) -> Path | None:
        """The checkpoint to continue from, or None for a run that starts at step 0; writes nothing."""
        if self.vae_path is not None and not (Path(self.vae_path) / "config.json").is_file():
            raise TrainingError(f"vae: {self.vae_path} is not a diffusers VAE folder (no config.json); give one such as RUN/vae")
        if self.resume:
            checkpoint = latest_checkpoint(self.out)
            old, new = saved_config(self.out).identity(), self.config.identity()
            if old != new:
                raise TrainingError(f"resume: {self.out} was trained with a different config ({_first_difference(old, new)})")
            if checkpoint is not None:
                return checkpoint
            # Killed before its first checkpoint: nothing to continue, so the run starts again as it began.
            self._say("resume: %s was stopped before its first checkpoint; starting it again from step 0 with its saved config", self.out)
            self.data = self.data or self._recorded_data()
            self.resume, self.take_over = False, True
            return None
        if self.out.exists() and not self.out.is_dir():
            raise TrainingError(f"out: {self.out} is a file, not a folder")
        self.take_over = self._unstarted()
        if self.take_over:
            self._say("out: %s holds a run stopped before its first checkpoint; starting afresh in its place", self.out)
        elif (self.training / "config.toml").exists():
            raise TrainingError(f"out: {self.out} already holds a training run; continue it with --resume {self.out} or choose another --out")
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise TrainingError(f"out: {self.out} is not empty; choose a new or empty folder")
        return None

    def _say(self, message: str, *args) -> None:
        """Tell the user once, not once per process."""
        if self.acc.is_main_process:
            log.warning(message, *args)

    def _unstarted(self) -> bool:
        """``out`` holds only a run killed before its first checkpoint: its ``training`` folder, with the
        run's config (written first) or, killed sooner, nothing but temporary files; perhaps its manifest."""
        if not self.training.is_dir() or latest_checkpoint(self.out) is not None:
            return False
        if not {p.name for p in self.out.iterdir()} <= {"training", "dataset_manifest.json"}:
            return False
        return (self.training / "config.toml").is_file() or all(_is_temp(p) for p in self.training.iterdir())

    def _recorded_data(self) -> Path:
        """The data folder named by the manifest of a run killed before its first checkpoint."""
        manifest = self.out / "dataset_manifest.json"
        if not manifest.is_file():
            raise TrainingError(f"resume: {self.out} was stopped before it recorded its data folder; give it with --data FOLDER")
        return Path(read_manifest(manifest)["root"])

    def _start_out(self) -> None:
        """A new run's folder: the config first, the mark of a lienzo run, so that a run killed at any
        later moment can be resumed or taken over. A run taken over is cleared around its config, which
        stays in place until the new one replaces it."""
        # Every process checks before the first one writes, or the others would find the folder taken.
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            try:
                if self.take_over:
                    for entry in self.training.iterdir():
                        if entry.is_dir():
                            shutil.rmtree(entry)
                        elif entry.name != "config.toml":
                            entry.unlink()
                    (self.out / "dataset_manifest.json").unlink(missing_ok=True)
                write_atomic(self.training / "config.toml", lambda file: file.write(to_toml(self.config).encode()))
                (self.training / "samples").mkdir(exist_ok=True)
                (self.training / "checkpoints").mkdir(exist_ok=True)
            except OSError as err:
                raise TrainingError(f"out: cannot write to {self.out}: {err.strerror or err}") from None
        self.acc.wait_for_everyone()

    # -- 3. data --------------------------------------------------------------------------------------

    def _scan(self) -> DatasetScan:
        data = self.data
        if data is None and self.resume:
            data = Path(json.loads((latest_checkpoint(self.out) / "state.json").read_text())["data"])
        if data is None:
            raise TrainingError("data: give the image folder with --data FOLDER")
        scan = scan_folder(data)
        scan.require_images()
        if scan.problems:
            log.warning("data: skipped %d unusable file(s); see %s", len(scan.problems), self.out / "dataset_manifest.json")
        if self.resume:
            old = read_manifest(self.out / "dataset_manifest.json")
            if [r["sha256"] for r in old["images"]] != [r.sha256 for r in scan.records]:
                raise TrainingError(f"resume: the images in {data} differ from the ones this run started with")
            if (old["source"], old["licence"]) != (scan.source, scan.licence) and self.acc.is_main_process:
                # The same images, better described since (a source or licence added): the record follows.
                log.info("data: the source or licence changed since the run started; %s records the new one", self.out / "dataset_manifest.json")
                write_manifest(scan, self.out / "dataset_manifest.json")
        elif self.acc.is_main_process:
            self.manifest_sha256 = write_manifest(scan, self.out / "dataset_manifest.json")
        self.data = data
        self.dataset = ImageDataset(data, scan.records, self.config.resolution)
        return scan

    def _start_state(self, checkpoint: Path | None) -> RunState:
        if checkpoint is not None:
            return RunState(**json.loads((checkpoint / "state.json").read_text()))
        sha = getattr(self, "manifest_sha256", "")
        return RunState(stage=self.config.stages[0], step=0, done=[], data=str(self.data.resolve()), manifest_sha256=sha)

    # -- 4. models ----------------------------------------------------------------------------------------

    def _load_base(self) -> Components:
        """A LoRA's base model; its native size is the training resolution unless the config names one."""
        base = load_components(Path(self.config.lora.base))
        if base.family == "sdxl" or base.is_inpainting:
            raise TrainingError("lora.base: LoRA training supports SD 1.x and 2.x text-to-image models; this one is "
                                f"{'SDXL' if base.family == 'sdxl' else 'an inpainting model'}")
        if "resolution" not in self.config.model_fields_set:
            self.config.resolution = max(64, native_size(base))
        return base

    def _build(self, checkpoint: Path | None) -> None:
        if self.base is not None:
            self._build_lora(checkpoint)
            return
        self.noise = noise_scheduler(self.config)
        self.models = build_models(self.config)
        self.tokenizer = bundled_tokenizer()
        if self.vae_path is not None:
            self.models["vae"] = AutoencoderKL.from_pretrained(self.vae_path, local_files_only=True)
        if checkpoint is not None:
            for name in self.models:
                if (checkpoint / name).is_dir():
                    cls = type(self.models[name])
                    self.models[name] = cls.from_pretrained(checkpoint / name, local_files_only=True)
        if "vae" not in self.config.stages and self.vae_path is None and checkpoint is None:
            raise TrainingError("vae: a run without the vae stage needs a trained VAE: pass --vae FOLDER")
        for module in self.models.values():
            module.to(self.acc.device).requires_grad_(False)

    def _build_lora(self, checkpoint: Path | None) -> None:
        """The base model, frozen, with a trainable LoRA; a checkpoint holds only the LoRA's weights."""
        base, lora = self.base, self.config.lora
        self.noise = noise_scheduler(self.config, base.scheduler_config)
        self.tokenizer = base.tokenizer
        self.models = {"vae": base.vae, "text_encoder": base.text_encoder, "unet": base.unet}
        torch.manual_seed(self.config.seed)
        text_encoder = base.text_encoder if lora.text_encoder else None
        self.lora_params = add_lora(base.unet, rank=lora.rank, alpha=lora.alpha, text_encoder=text_encoder)
        if checkpoint is not None:
            set_peft_model_state_dict(base.unet, load_file(checkpoint / "unet_lora.safetensors"), adapter_name=ADAPTER)
            if text_encoder is not None:
                set_peft_model_state_dict(text_encoder, load_file(checkpoint / "text_encoder_lora.safetensors"), adapter_name=ADAPTER)
        for module in self.models.values():
            module.to(self.acc.device)

    # -- 5. one stage ----------------------------------------------------------------------------------------

    def _run_stage(self, stage: str, checkpoint: Path | None) -> str:
        cfg = self._stage_cfg(stage)
        stage_index = STAGES.index(stage)
        self.state.stage = stage
        step = self.state.step if checkpoint is not None else 0
        if checkpoint is None and stage == "unet" and "vae" in self.config.stages:
            self._set_latent_scale()  # a VAE trained in this run; a given one keeps its own scale
        module, trainable = self._loss_module(stage)
        for p in trainable:
            p.requires_grad_(True)
        # foreach: one kernel per op over all tensors; torch picks it by default on CUDA only (2x faster steps on CPU).
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
        ema = EMAModel(trainable, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
        if checkpoint is not None:
            saved = torch.load(checkpoint / "trainer.pt", map_location=self.acc.device, weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            if ema is not None:
                ema.load_state_dict(saved["ema"])
                ema.to(self.acc.device)
            if self.acc.is_main_process:
                self.log.truncate_after(list(STAGES), stage, step)
        wrapped, optimizer = self.acc.prepare(module, optimizer)
        wrapped.train()
        stream = SampleStream(len(self.dataset), self.config.seed, stage_index, self.config.data.flip)
        cache = self._latent_cache() if stage == "unet" and self.config.unet.cache_latents else None
        if stage == "unet":
            self._tokenize()
        world, rank = self.acc.num_processes, self.acc.process_index
        per_step = cfg.batch_size * cfg.grad_accum
        ctx = dict(stage=stage, cfg=cfg, optimizer=optimizer, schedule=schedule, ema=ema, trainable=trainable)

        # 7. The training loop: grad_accum micro-batches per optimizer step, then clip, step, EMA.
        last_loss, window_started, window_images = float("nan"), time.perf_counter(), 0
        while step < cfg.steps:
            if self._should_stop():
                self._checkpoint(step, ctx)
                return "interrupted" if self.stop() else "stopped"
            parts_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
                samples = stream.take(first, cfg.batch_size)
                with ExitStack() as sync:
                    if micro < cfg.grad_accum - 1:
                        sync.enter_context(self.acc.no_sync(wrapped))
                    with self.acc.autocast():
                        loss, parts = self._forward(stage, wrapped, samples, cache, stage_index)
                    self.acc.backward(loss / cfg.grad_accum)
                for k, v in {"loss": loss.detach(), **parts}.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / cfg.grad_accum
            if not math.isfinite(parts_sum["loss"]):
                raise TrainingError(f"{stage}.lr: the loss became {parts_sum['loss']} at step {step + 1}; lower the learning rate")
            self.acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable)
            step += 1
            self.session_steps += 1
            images = per_step * world
            self.state.images_seen[stage] = self.state.images_seen.get(stage, 0) + images
            window_images += images
            last_loss = parts_sum.pop("loss")
            elapsed = time.perf_counter() - window_started
            rate = window_images / elapsed if elapsed > 0 else 0.0
            lr = schedule.get_last_lr()[0]
            if self.acc.is_main_process:
                if step % self.config.log_every == 0 or step == cfg.steps:
                    self.log.append(stage, step, last_loss, lr, rate, self.seconds_before + time.perf_counter() - self.run_started, parts_sum)
                if self.progress is not None:
                    self.progress(TrainProgress(stage, step, cfg.steps, last_loss, lr, rate, time.perf_counter() - self.session_started))
            if self.config.samples.every and step % self.config.samples.every == 0 and step < cfg.steps:
                self._samples(stage, step, ema, trainable)
            if self.config.checkpoint_every and step % self.config.checkpoint_every == 0 and step < cfg.steps:
                self._checkpoint(step, ctx)
        # 8. The stage is done: final samples; the EMA weights become the model's weights.
        self._samples(stage, step, ema, trainable)
        if ema is not None:
            ema.copy_to(trainable)
        for p in trainable:
            p.requires_grad_(False)
        self.state.done.append(stage)
        self._checkpoint(step, {**ctx, "ema": None})
        return "finished"

    def _should_stop(self) -> bool:
        stop = self.stop() or (self.stop_after is not None and self.session_steps >= self.stop_after)
        if self.time_limit is not None:
            stop = stop or time.perf_counter() - self.session_started >= self.time_limit
        if self.acc.num_processes > 1:
            # Every process must stop at the same step, or the others wait forever in the next all-reduce.
            flag = torch.tensor([float(stop)], device=self.acc.device)
            stop = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        return stop

    def _loss_module(self, stage: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        if stage == "vae":
            cfg = self.config.vae
            perceptual = None
            if cfg.perceptual_weight > 0 and self.perceptual_weights is None:
                log.warning("vae: no --perceptual-weights VGG16 file given; training with reconstruction + KL only")
            elif cfg.perceptual_weight > 0:
                perceptual = VGGPerceptual(self.perceptual_weights).to(self.acc.device)
            vae = self.models["vae"]
            module = AutoencoderLoss(vae, recon=cfg.recon_loss, kl_weight=cfg.kl_weight, perceptual=perceptual, perceptual_weight=cfg.perceptual_weight)
            return module, list(vae.parameters())
        unet, text_encoder = self.models["unet"], self.models["text_encoder"]
        if self.config.lora is not None:
            text_encoder.train(self.config.lora.text_encoder)
            return DenoiserLoss(unet, text_encoder, self.noise, snr_gamma=self.config.unet.snr_gamma), self.lora_params
        text_encoder.train(self.config.unet.train_text_encoder)
        trainable = list(unet.parameters())
        if self.config.unet.train_text_encoder:
            trainable += list(text_encoder.parameters())
        return DenoiserLoss(unet, text_encoder, self.noise, snr_gamma=self.config.unet.snr_gamma), trainable

    def _forward(self, stage: str, module, samples, cache, stage_index: int):
        generators = [torch.Generator().manual_seed(sample_seed(self.config.seed, stage_index, p)) for p, _, _ in samples]
        device = self.acc.device
        if stage == "vae":
            # Draw order per sample: crop corner (when cropping), then the posterior sample.
            crops = [_random_crop(self.dataset[(i, flip)]["pixels"], self.config.vae.crop, g) for (_, i, flip), g in zip(samples, generators, strict=True)]
            return module(torch.stack(crops).to(device), generators)
        vae = self.models["vae"]
        shape = (vae.config.latent_channels, *self._latent_hw())
        # Draw order per sample: posterior sample, noise, timestep, caption dropout.
        eps = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        if cache is not None:
            mean = torch.stack([cache[(i, flip)][0] for _, i, flip in samples])
            std = torch.stack([cache[(i, flip)][1] for _, i, flip in samples])
        else:
            pixels = torch.stack([self.dataset[(i, flip)]["pixels"] for _, i, flip in samples]).to(device)
            with torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean, dist.std
        latents = (mean + std * eps) * vae.config.scaling_factor
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        timesteps = torch.cat([torch.randint(0, self.noise.config.num_train_timesteps, (1,), generator=g) for g in generators]).to(device)
        drop = [float(torch.rand((), generator=g)) < self.config.unet.caption_dropout for g in generators]
        ids = torch.stack([self._empty_ids if d else self._token_ids[i] for (_, i, _), d in zip(samples, drop, strict=True)])
        return module(latents, ids.to(device), noise, timesteps)

    def _tokenize(self) -> None:
        """Token ids of every image's prompt, and of the empty prompt, once: they never change during a run."""
        prompts = [self._prompt(i) for i in range(len(self.scan.records))] + [""]
        ids = self.tokenizer(prompts, padding="max_length", max_length=_PROMPT_LENGTH, truncation=True, return_tensors="pt").input_ids
        self._token_ids, self._empty_ids = ids[:-1], ids[-1]

    def _prompt(self, index: int) -> str:
        """What a training image is conditioned on: its caption, its label as text, or nothing."""
        record = self.scan.records[index]
        mode = self.config.data.conditioning
        label = (record.label or "").replace("_", " ")
        if mode == "caption" and record.caption:
            return record.caption
        if mode in ("caption", "label") and label:
            return self.config.data.label_template.format(label=label)
        return ""

    def _latent_hw(self) -> tuple[int, int]:
        factor = 2 ** (len(self.models["vae"].config.block_out_channels) - 1)
        side = self.config.resolution // factor
        return side, side

    @torch.no_grad()
    def _latent_cache(self) -> dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]:
        """Posterior mean and std of every image (and its mirror), encoded once in fixed chunks."""
        vae = self.models["vae"]
        keys = [(i, f) for i in range(len(self.dataset)) for f in ((False, True) if self.config.data.flip else (False,))]
        cache = {}
        for start in range(0, len(keys), 16):
            chunk = keys[start : start + 16]
            pixels = torch.stack([self.dataset[k]["pixels"] for k in chunk]).to(self.acc.device)
            dist = vae.encode(pixels).latent_dist
            for k, mean, std in zip(chunk, dist.mean, dist.std, strict=True):
                cache[k] = (mean, std)
        return cache

    @torch.no_grad()
    def _set_latent_scale(self) -> None:
        """SD's latent scale: 1 / std of the latents (0.18215 for SD's VAE), measured on up to 256 images."""
        vae = self.models["vae"]
        count = min(len(self.dataset), 256)
        latents = []
        for start in range(0, count, 16):
            pixels = torch.stack([self.dataset[(i, False)]["pixels"] for i in range(start, min(count, start + 16))])
            latents.append(vae.encode(pixels.to(self.acc.device)).latent_dist.mean)
        scale = float(1.0 / torch.cat(latents).float().std())
        vae.register_to_config(scaling_factor=scale)
        log.info("latent scaling factor: %.5f", scale)

    # -- samples, checkpoints, export -------------------------------------------------------------------

    def components(self) -> Components:
        """The model as the engine sees it, on the training device."""
        return Components(
            unet=self.models["unet"], vae=self.models["vae"], text_encoder=self.models["text_encoder"],
            tokenizer=self.tokenizer, scheduler_config=dict(self.noise.config),
            family=self.base.family if self.base is not None else "sd1", name=self.out.name,
        )

    def _samples(self, stage: str, step: int, ema: EMAModel | None, trainable) -> None:
        """A grid through the same engine as ``lienzo generate`` (UNet stage) or reconstructions (VAE stage)."""
        if not self.acc.is_main_process or (stage == "unet" and not self.config.samples.prompts):
            return
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        try:
            grid = self._unet_grid(step) if stage == "unet" else self._vae_grid()
        finally:
            if ema is not None:
                ema.restore(trainable)
        save_png_atomic(grid, self.training / "samples" / f"{stage}-{step:06d}.png")

    def _unet_grid(self, step: int):
        s = self.config.samples
        rows = []
        components = self.components()
        for prompt in s.prompts:
            request = build_request(
                prompt=prompt, steps=s.steps, cfg_scale=s.cfg_scale, sampler=s.sampler, seed=s.seed,
                batch_size=s.per_prompt, width=self.config.resolution, height=self.config.resolution,
            )
            rows.append([i.image for i in generate(components, request).images])
        if s.memorisation > 0:
            self._check_memorisation(step, rows)
        return image_grid(rows, labels=s.prompts)

    def _check_memorisation(self, step: int, rows: list[list[Image.Image]]) -> None:
        """Warn when samples copy training images; every sample's nearest file goes to memorisation.csv."""
        if self._memorisation is None:
            self._memorisation = MemorisationCheck(self.data, self.scan.records, self.config.samples.memorisation)
        images = [image for row in rows for image in row]
        matches = self._memorisation.nearest(images)
        self._memorisation.copies(images, f"samples at unet step {step}")
        path = self.training / "memorisation.csv"
        new = not path.exists()
        per_prompt, threshold = self.config.samples.per_prompt, self._memorisation.threshold
        with path.open("a", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "sample", "nearest_training_file", "distance", "copy"])
            for m in matches:
                prompt = self.config.samples.prompts[m.index // per_prompt]
                writer.writerow([step, prompt, m.index % per_prompt, m.file, f"{m.distance:.5f}", int(m.is_copy(threshold))])

    @torch.no_grad()
    def _vae_grid(self):
        vae = self.models["vae"]
        count = min(8, len(self.dataset))
        pixels = torch.stack([self.dataset[(i, False)]["pixels"] for i in range(count)]).to(self.acc.device)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        return image_grid([[_to_pil(p) for p in pixels], [_to_pil(d) for d in decoded]], labels=["images", "reconstructions"])

    def _checkpoint(self, step: int, ctx: dict) -> None:
        """``checkpoints/<stage>-<step>``: weights, EMA, optimizer, LR schedule, state; written then renamed."""
        self.state.step = step
        self.state.seconds = self.seconds_before + time.perf_counter() - self.run_started
        self.state.device, self.state.processes, self.state.mixed_precision = str(self.acc.device), self.acc.num_processes, self.precision
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            final = self.training / "checkpoints" / f"{ctx['stage']}-{step:06d}"
            state = json.dumps(asdict(self.state), indent=1).encode()
            if final.is_dir():
                # Stopped right after resuming from this very checkpoint: its weights and optimizer are these
                # already, and writing them anew would mean a moment with no complete checkpoint of this step.
                write_atomic(final / "state.json", lambda file: file.write(state))
            else:
                self._write_checkpoint(final, ctx, state)
            self._prune()
            artifacts.plot_losses(self.log, self.training / "loss.png")
        self.acc.wait_for_everyone()

    def _write_checkpoint(self, final: Path, ctx: dict, state: bytes) -> None:
        """Everything into ``<final>.tmp``, then one rename: a kill mid-way leaves only a temporary folder,
        which resuming ignores and the next checkpoint removes."""
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.base is not None:
            save_file(get_peft_model_state_dict(self.models["unet"], adapter_name=ADAPTER), tmp / "unet_lora.safetensors")
            if self.config.lora.text_encoder:
                te = get_peft_model_state_dict(self.models["text_encoder"], adapter_name=ADAPTER)
                save_file(te, tmp / "text_encoder_lora.safetensors")
        else:
            for name, module in self.models.items():
                module.save_pretrained(tmp / name)
        ema = ctx["ema"]
        torch.save(
            {"optimizer": ctx["optimizer"].state_dict(), "schedule": ctx["schedule"].state_dict(),
             "ema": ema.state_dict() if ema is not None else None},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_bytes(state)
        os.replace(tmp, final)

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoints`` complete checkpoints; remove older ones and what killed
        writes and deletions left. Each loses its state.json first: half deleted, it is not taken for complete."""
        folder = self.training / "checkpoints"
        complete = sorted(
            (STAGES.index(json.loads((p / "state.json").read_text())["stage"]), p.name, p)
            for p in folder.iterdir()
            if not _is_temp(p) and (p / "state.json").is_file()
        )
        kept = {path for *_, path in complete[-self.config.keep_checkpoints :]}
        for path in folder.iterdir():
            if path.is_dir() and path not in kept:
                (path / "state.json").unlink(missing_ok=True)
                shutil.rmtree(path)

    def _export(self, finished: bool) -> None:
        """The diffusers model folder (once a UNet has trained) and the model card."""
        trained_unet = "unet" in self.state.done or (self.state.stage == "unet" and self.state.step > 0)
        # The hash of the manifest beside the model, which a resume may have rewritten (a source added).
        manifest_path = self.out / "dataset_manifest.json"
        manifest_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        if trained_unet and self.base is not None:
            lora = self.config.lora
            save_kohya_lora(
                self.out / f"{lora.name}.safetensors", self.models["unet"], self.models["text_encoder"] if lora.text_encoder else None,
                family=self.base.family, metadata={"ss_output_name": lora.name, "ss_steps": str(self.state.step),
                "lienzo_base_model": Path(lora.base).name, "lienzo_dataset_manifest_sha256": manifest_sha256},
            )
        elif trained_unet:
            components = self.components()
            if self.config.export_dtype == "float16":
                components = Components(**{**components.__dict__, **{k: _half(v) for k, v in self.models.items()}})
            artifacts.export_diffusers(components, self.out)
        summary = manifest_summary(read_manifest(manifest_path), manifest_sha256)
        steps = self._steps_done()
        compute = artifacts.Compute(self.state.device or str(self.acc.device), self.acc.num_processes, self.precision, self.state.seconds, self.state.images_seen)
        base = Path(self.config.lora.base).name if self.config.lora is not None else None
        card = artifacts.model_card(name=self.out.name, config_toml=to_toml(self.config), data=summary, steps=steps, compute=compute, base=base, finished=finished)
        card_path = self.out / "README.md"
        if card_path.is_file():
            card = artifacts.keep_sections(card, card_path.read_text())
        # Atomic: the card holds sections written by hand (an evaluation, known limits) that a torn write would lose.
        write_atomic(card_path, lambda file: file.write(card.encode()))
        artifacts.plot_losses(self.log, self.training / "loss.png")


def _is_temp(path: Path) -> bool:
    """What a write in progress (or killed) is named: ``<name>.tmp``, or write_atomic's ``.<name>.<random>.tmp``."""
    return path.name.endswith(".tmp")


def _half(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.float16)


def _to_pil(t: torch.Tensor) -> Image.Image:
    array = ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} was {old!r}, now {new!r}"
