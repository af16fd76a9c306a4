"""The trainer: a Stable Diffusion-architecture latent diffusion model from a folder of images, or a LoRA.

A run is a folder. Once the UNet stage has something to show, the folder itself is a diffusers
model (``lienzo generate --model RUN``); everything about the training lives under ``RUN/training``::

    RUN/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   the model (EMA weights)
    RUN/README.md, RUN/dataset_manifest.json                                   model card, data provenance
    RUN/training/config.toml, state.json, loss.csv, loss.png, samples/, checkpoints/<stage>-<step>/

Exact resume: every random draw is a pure function of (seed, stage, sample position) (see ``stream``),
so a checkpoint needs only the weights, EMA, optimizer, LR schedule and step to continue bit for bit.

The parts: ``folder`` (opening the run folder, checkpoints), ``models`` (the networks), ``loop`` (one
stage's optimizer and steps), ``samples`` (grids), ``state`` (typed records); this module runs them in order.
"""

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from lienzo.devices import pick_device
from lienzo.files import write_atomic
from lienzo.images.io import save_png_atomic
from lienzo.models.components import Components
from lienzo.training import artifacts
from lienzo.training.cache import Pixels
from lienzo.training.config import TrainConfig, to_toml
from lienzo.training.data import DatasetScan, ImageDataset, scan_folder
from lienzo.training.manifest import manifest_summary, read_manifest, write_manifest
from lienzo.training.folder import Opening, open_folder, prune, read_state, start_folder, trainer_state, write_checkpoint
from lienzo.training.lora import save_kohya_lora
from lienzo.training.loop import StageRun, check_loss, finish_stage, prompt_for, stage_config, start_stage, train_step
from lienzo.training.models import Networks, contiguous, device_name, fresh_networks, load_base, lora_networks, speed_up
from lienzo.training.samples import SampleGrids
from lienzo.training.state import STAGES, Clock, RunState, Status, TrainingError, TrainProgress, TrainResult

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything one ``Trainer.run()`` works with, built in one place: ``Trainer._prepare``."""

    acc: Accelerator
    precision: str  # the config's mixed_precision with "auto" decided for this device
    resumed_from: Path | None  # the checkpoint this session continues; None from step 0
    scan: DatasetScan
    dataset: ImageDataset
    pixels: Pixels  # the dataset's pixels, on the device when they fit
    base: Components | None  # a LoRA's base model; None for a model trained from scratch
    nets: Networks
    state: RunState
    grids: SampleGrids
    clock: Clock


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
        export_every: float | None = None,
    ):
        self.config = config
        self.data, self.out, self.resume = (Path(data) if data else None), Path(out), resume
        self.perceptual_weights, self.vae_path = perceptual_weights, vae
        self.device_name = device
        self.progress, self.stop = progress, stop or (lambda: False)
        self.stop_after, self.time_limit = stop_after, time_limit
        # Seconds between model folders written while the UNet trains, so that a run cut off still leaves a model.
        self.export_every = export_every
        self.training = self.out / "training"
        self.log = artifacts.LossLog(self.training / "loss.csv")
        self.session: Session | None = None  # set by run()
        self._reported = 0.0  # perf_counter of the last progress update

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        # 1-4. Devices, the output folder, the data and the models.
        s = self.session = self._prepare(time.perf_counter())
        # 5. Stages, in order, each from where the checkpoint left it.
        checkpoint = s.resumed_from
        status: Status = "finished"
        stopped: StageRun | None = None
        for stage in self.config.stages:
            if stage in s.state.done:
                continue
            status, stopped = self._run_stage(stage, checkpoint if checkpoint is not None and s.state.stage == stage else None)
            checkpoint = None
            if status != "finished":
                break
        # 6. The model folder and its card, whenever there is a UNet to show (a stopped stage's EMA weights).
        s.state.seconds = s.clock.run_seconds()
        if s.acc.is_main_process:
            self._export(finished=status == "finished", run=stopped)
        s.acc.wait_for_everyone()
        s.acc.end_training()
        return TrainResult(self.out, status, self._steps_done(), s.state.seconds)

    def _prepare(self, started: float) -> Session:
        """The session: devices, the opened output folder, the checked data, the run's state and its networks."""
        # 1. Devices: one process, or one per GPU / CPU slot under a distributed launcher.
        device = pick_device(self.device_name)
        precision = self.config.mixed_precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        acc = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
        if acc.device.type == "cuda":
            # Fixed shapes every step: let cuDNN pick its fastest convolutions once.
            torch.backends.cudnn.benchmark = True

        def say(message: str, *args) -> None:
            """Tell the user once, not once per process."""
            if acc.is_main_process:
                log.warning(message, *args)

        # 2. The output folder: new, or the run to continue (same config, same images).
        opening = open_folder(self.config, self.out, resume=self.resume, data=self.data, vae=self.vae_path, say=say)
        checkpoint = opening.checkpoint
        base = load_base(self.config) if self.config.lora is not None else None
        if checkpoint is None:
            # After the base: a LoRA's resolution comes from it and goes into the saved config.
            start_folder(acc, self.config, self.out, opening.take_over)
        # 3. Data: every image checked; broken ones reported and skipped.
        data, scan, manifest_sha256 = self._open_data(opening, acc)
        if checkpoint is not None:
            state = read_state(checkpoint)
        else:
            state = RunState(stage=self.config.stages[0], step=0, done=[], data=str(data.resolve()), manifest_sha256=manifest_sha256)
        # 4. Models: built from the config (or the LoRA base), then the checkpoint's weights.
        if base is not None:
            nets = lora_networks(self.config, base, checkpoint, acc.device)
        else:
            nets = fresh_networks(self.config, self.vae_path, checkpoint, acc.device)
        speed_up(nets, acc.device, self.config.compile)
        dataset = ImageDataset(data, scan.records, self.config.resolution)
        return Session(
            acc=acc, precision=precision, resumed_from=checkpoint, scan=scan,
            dataset=dataset, pixels=Pixels(dataset, acc.device), base=base, nets=nets, state=state,
            grids=SampleGrids(self.config.samples, self.config.resolution, self.training, data, scan.records),
            clock=Clock(run_started=started, seconds_before=state.seconds),
        )

    def _open_data(self, opening: Opening, acc: Accelerator) -> tuple[Path, DatasetScan, str]:
        """The data folder, its scan and (for a new run, on the main process) its manifest's sha256."""
        data = opening.data
        if data is None and opening.resume:
            data = Path(read_state(opening.checkpoint).data)
        if data is None:
            raise TrainingError("data: give the image folder with --data FOLDER")
        scan = scan_folder(data)
        scan.require_images()
        manifest = self.out / "dataset_manifest.json"
        if scan.problems:
            log.warning("data: skipped %d unusable file(s); see %s", len(scan.problems), manifest)
        if opening.resume:
            old = read_manifest(manifest)
            if [r["sha256"] for r in old["images"]] != [r.sha256 for r in scan.records]:
                raise TrainingError(f"resume: the images in {data} differ from the ones this run started with")
            if (old["source"], old["licence"]) != (scan.source, scan.licence) and acc.is_main_process:
                # The same images, better described since (a source or licence added): the record follows.
                log.info("data: the source or licence changed since the run started; %s records the new one", manifest)
                write_manifest(scan, manifest)
            return data, scan, ""
        # The main process writes the manifest; its hash goes into state.json, which only the main process writes.
        return data, scan, write_manifest(scan, manifest) if acc.is_main_process else ""

    def _steps_done(self) -> dict[str, int]:
        state = self.session.state
        done = {s: stage_config(self.config, s).steps for s in state.done}
        if state.stage not in state.done:
            done[state.stage] = state.step
        return done

    def _prompt(self, index: int) -> str:
        """What training image ``index`` is conditioned on."""
        return prompt_for(self.config.data, self.session.scan.records[index])

    # -- 5. one stage ----------------------------------------------------------------------------------------

    def _run_stage(self, stage: str, checkpoint: Path | None) -> tuple[Status, StageRun | None]:
        """Train one stage to its end, or until told to stop: then also the stage, for its EMA weights."""
        s = self.session
        s.state.stage = stage
        step = s.state.step if checkpoint is not None else 0
        run = start_stage(self.config, stage, s.acc, s.nets, s.pixels, checkpoint=checkpoint, perceptual_weights=self.perceptual_weights)
        if checkpoint is not None and s.acc.is_main_process:
            self.log.truncate_after(list(STAGES), stage, step)
        exported = time.perf_counter()
        # 7. The training loop: one optimizer step at a time; samples and checkpoints as often as the config says.
        while step < run.cfg.steps:
            if self._should_stop():
                self._checkpoint(run, step)
                return ("interrupted" if self.stop() else "stopped"), run
            parts = train_step(run, step, s.acc, self.config, s.nets, s.pixels)
            step += 1
            self._report(run, step, parts)
            if _due(self.config.samples.every, step, run.cfg.steps):
                self._samples(run, step)
            if _due(self.config.checkpoint_every, step, run.cfg.steps):
                self._checkpoint(run, step)
            if stage == "unet" and self.export_every is not None and time.perf_counter() - exported >= self.export_every:
                s.state.step, s.state.seconds = step, s.clock.run_seconds()
                if s.acc.is_main_process:
                    self._export(finished=False, run=run)
                exported = time.perf_counter()
        # 8. The stage is done: final samples; the EMA weights become the model's weights.
        self._samples(run, step)
        finish_stage(run)
        s.state.done.append(stage)
        self._checkpoint(run, step)
        return "finished", None

    def _report(self, run: StageRun, step: int, parts: dict[str, torch.Tensor]) -> None:
        """Count the step's images; log every ``log_every`` steps and tell the progress callback.

        Reading a loss waits for the device to finish the step, so on a GPU the losses are read only to
        be logged and for a progress update at most every ``_PROGRESS_EVERY`` seconds; the host meanwhile
        queues the next steps. On a CPU every step is read (it costs nothing there).
        """
        s = self.session
        s.clock.session_steps += 1
        images = run.cfg.batch_size * run.cfg.grad_accum * s.acc.num_processes
        s.state.images_seen[run.name] = s.state.images_seen.get(run.name, 0) + images
        run.images += images
        now = time.perf_counter()
        on_cpu = s.acc.device.type != "cuda"
        log_due = step % self.config.log_every == 0 or step == run.cfg.steps
        progress_due = self.progress is not None and (on_cpu or now - self._reported >= _PROGRESS_EVERY)
        if not (on_cpu or log_due or progress_due):
            return
        values = {k: float(v) for k, v in parts.items()}
        loss = values.pop("loss")
        check_loss(run, loss, step)
        elapsed = now - run.started
        rate = run.images / elapsed if elapsed > 0 else 0.0
        lr = run.schedule.get_last_lr()[0]
        if not s.acc.is_main_process:
            return
        if log_due:
            self.log.append(run.name, step, loss, lr, rate, s.clock.run_seconds(), values)
        if progress_due:
            self._reported = now
            self.progress(TrainProgress(run.name, step, run.cfg.steps, loss, lr, rate, now - s.clock.session_started))

    def _should_stop(self) -> bool:
        s = self.session
        stop = self.stop() or (self.stop_after is not None and s.clock.session_steps >= self.stop_after)
        if self.time_limit is not None:
            stop = stop or time.perf_counter() - s.clock.session_started >= self.time_limit
        if s.acc.num_processes > 1:
            # Every process must stop at the same step, or the others wait forever in the next all-reduce.
            flag = torch.tensor([float(stop)], device=s.acc.device)
            stop = bool(s.acc.reduce(flag, reduction="sum").item() > 0)
        return stop

    # -- samples, checkpoints, export -------------------------------------------------------------------

    def components(self) -> Components:
        """The model as the engine sees it, on the training device."""
        s = self.session
        return Components(
            unet=s.nets.models["unet"], vae=s.nets.models["vae"], text_encoder=s.nets.models["text_encoder"],
            tokenizer=s.nets.tokenizer, scheduler_config=dict(s.nets.noise.config),
            family=s.base.family if s.base is not None else "sd1", name=self.out.name,
        )

    def _samples(self, run: StageRun, step: int) -> None:
        """A grid through the same engine as ``lienzo generate`` (UNet stage) or reconstructions (VAE stage), with the EMA weights."""
        s = self.session
        if not s.acc.is_main_process or (run.name == "unet" and not self.config.samples.prompts):
            return
        with _ema_weights(run):
            if run.name == "unet":
                grid = s.grids.unet(self.components(), step)
            else:
                grid = s.grids.vae(s.nets.models["vae"], s.dataset, s.acc.device)
        save_png_atomic(grid, self.training / "samples" / f"{run.name}-{step:06d}.png")

    def _checkpoint(self, run: StageRun, step: int) -> None:
        """``checkpoints/<stage>-<step>``: weights, EMA, optimizer, LR schedule, state; written then renamed."""
        s = self.session
        s.state.step = step
        s.state.seconds = s.clock.run_seconds()
        s.state.device, s.state.processes, s.state.mixed_precision = device_name(s.acc.device), s.acc.num_processes, s.precision
        s.acc.wait_for_everyone()
        if s.acc.is_main_process:
            final = self.training / "checkpoints" / f"{run.name}-{step:06d}"
            state = json.dumps(asdict(s.state), indent=1).encode()
            if final.is_dir():
                # Stopped right after resuming from this very checkpoint: its weights and optimizer are these
                # already, and writing them anew would mean a moment with no complete checkpoint of this step.
                write_atomic(final / "state.json", lambda file: file.write(state))
            else:
                lora_text_encoder = self.config.lora.text_encoder if self.config.lora is not None else None
                with contiguous(s.nets.models):
                    write_checkpoint(final, s.nets.models, lora_text_encoder, trainer_state(run.optimizer, run.schedule, run.ema), state)
            prune(self.training / "checkpoints", self.config.keep_checkpoints)
            artifacts.plot_losses(self.log, self.training / "loss.png")
        s.acc.wait_for_everyone()

    def _export(self, finished: bool, run: StageRun | None = None) -> None:
        """The diffusers model folder (once a UNet has trained) and the model card; during a stage
        (``run``), with its EMA weights."""
        with _ema_weights(run), contiguous(self.session.nets.models):
            self._write_model(finished)

    def _write_model(self, finished: bool) -> None:
        s = self.session
        trained_unet = "unet" in s.state.done or (s.state.stage == "unet" and s.state.step > 0)
        # The hash of the manifest beside the model, which a resume may have rewritten (a source added).
        manifest_path = self.out / "dataset_manifest.json"
        manifest_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        if trained_unet and s.base is not None:
            lora, models = self.config.lora, s.nets.models
            save_kohya_lora(
                self.out / f"{lora.name}.safetensors", models["unet"], models["text_encoder"] if lora.text_encoder else None,
                family=s.base.family, metadata={"ss_output_name": lora.name, "ss_steps": str(s.state.step),
                "lienzo_base_model": Path(lora.base).name, "lienzo_dataset_manifest_sha256": manifest_sha256},
            )
        elif trained_unet:
            components = self.components()
            if self.config.export_dtype == "float16":
                components = Components(**{**components.__dict__, **{k: _half(v) for k, v in s.nets.models.items()}})
            artifacts.export_diffusers(components, self.out)
        summary = manifest_summary(read_manifest(manifest_path), manifest_sha256)
        compute = artifacts.Compute(s.state.device or device_name(s.acc.device), s.acc.num_processes, s.precision, s.state.seconds, s.state.images_seen)
        base = Path(self.config.lora.base).name if self.config.lora is not None else None
        card = artifacts.model_card(name=self.out.name, config_toml=to_toml(self.config), data=summary, steps=self._steps_done(),
                                    compute=compute, base=base, finished=finished)
        card_path = self.out / "README.md"
        if card_path.is_file():
            card = artifacts.keep_sections(card, card_path.read_text())
        # Atomic: the card holds sections written by hand (an evaluation, known limits) that a torn write would lose.
        write_atomic(card_path, lambda file: file.write(card.encode()))
        artifacts.plot_losses(self.log, self.training / "loss.png")


def _due(every: int, step: int, total: int) -> bool:
    """Every ``every`` steps (0: never) before the last one, which the end of the stage covers."""
    return bool(every) and step % every == 0 and step < total


def _half(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.float16)


_PROGRESS_EVERY = 0.25  # seconds between progress updates on a GPU (each waits for the device)


@contextmanager
def _ema_weights(run: StageRun | None) -> Iterator[None]:
    """The stage's EMA weights in place of its live ones, for a sample grid or a model written mid-stage."""
    ema = run.ema if run is not None else None
    if ema is not None:
        ema.store(run.trainable)
        ema.copy_to(run.trainable)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(run.trainable)
