"""``lienzo train`` and ``lienzo eval``."""

import os
import subprocess
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lienzo.cli.common import _ctrl_c, _settings, app, err_console

@app.command()
@click.option("--data", type=click.Path(path_type=Path), help="folder of images (captions: same-name .txt; labels: sub-folders)")
@click.option("--out", type=click.Path(path_type=Path), help="run folder; becomes a diffusers model folder")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML recipe (see recipes/)")
@click.option("--preset", type=click.Choice(["tiny", "mini", "base"]), help="model and schedule sizes [default: mini]")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override any config key, e.g. unet.lr=2e-4")
@click.option("--resume", type=click.Path(path_type=Path), help="continue the run in this folder exactly")
@click.option("--stage", multiple=True, type=click.Choice(["vae", "unet"]), help="stages to run [default: vae then unet]")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path), help="a trained VAE folder, for a unet-only run")
@click.option("--perceptual-weights", type=click.Path(path_type=Path), help="local VGG16 weights for the VAE's perceptual loss")
@click.option("--seed", type=int)
@click.option("--resolution", type=int)
@click.option("--conditioning", type=click.Choice(["caption", "label", "none"]))
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]))
@click.option("--vae-steps", type=int)
@click.option("--unet-steps", type=int)
@click.option("--batch-size", type=int, help="UNet stage batch size")
@click.option("--lr", type=float, help="UNet stage learning rate")
@click.option("--sample-every", type=int, help="steps between sample grids")
@click.option("--checkpoint-every", type=int, help="steps between checkpoints")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]))
@click.option("--lora", is_flag=True, help="fine-tune --base with a LoRA instead of training from scratch")
@click.option("--base", help="the checkpoint a LoRA fine-tunes (file, diffusers folder or model name)")
@click.option("--rank", type=int, help="LoRA rank")
@click.option("--lora-alpha", type=float, help="LoRA alpha")
@click.option("--lora-name", help="file name of the saved LoRA")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda")
@click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True, help="processes (one per GPU, or CPU processes)")
@click.option("--stop-after", type=click.IntRange(min=0), help="save a checkpoint and stop after this many steps (resume later)")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="save a checkpoint and stop after this many minutes")
@click.option("--export-every", type=click.FloatRange(min=0, min_open=True), metavar="MINUTES",
              help="also write the model folder (EMA weights) this often while the UNet trains, so that a run cut off leaves a model")
@click.pass_context
def train(ctx, data, out, config_file, preset, overrides, resume, vae_path, perceptual_weights, lora, device, num_processes, stop_after, time_limit,
          export_every, **flags):
    """Train a diffusion model on a folder of images, or a LoRA on an existing model."""
    from lienzo.training.config import build_config, flag_values, nest, parse_override
    from lienzo.training.folder import saved_config
    from lienzo.training.trainer import Trainer

    # 1. The config: the resumed run's, or a preset, then the file, then --set, then flags.
    if resume is not None:
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise click.UsageError("--out and --resume name different folders; a resumed run continues in its own folder")
        out = resume
    if out is None:
        raise click.UsageError("give the run folder with --out DIR (or --resume DIR)")
    layers = [saved_config(resume).model_dump(mode="json")] if resume is not None else []
    layers += [parse_override(o) for o in overrides]
    given = flag_values(flags)
    if lora:
        if not flags.get("base") and resume is None:
            raise click.UsageError("--lora needs --base MODEL to fine-tune")
        given["stages"] = ["unet"]
    elif flags.get("base"):
        raise click.UsageError("--base is for LoRA fine-tuning; add --lora")
    if "lora.base" in given:
        settings = _settings(ctx)
        from lienzo.models.registry import Registry

        given["lora.base"] = str(Registry(settings.models_dir, settings.cache_dir).resolve(given["lora.base"]))
    layers += [nest(key, value) for key, value in given.items()]
    default_preset = None if (resume is not None or config_file is not None or lora) else "mini"
    config = build_config(preset or default_preset, config_file, layers)

    # 2. Several processes: relaunch this command under torch's launcher; accelerate reads its environment.
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        argv = _without_option(sys.argv[1:], "--num-processes")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}", "-m", "lienzo", *argv]
        sys.exit(subprocess.call(command))

    # 3. Train, with a progress bar; Ctrl-C saves a checkpoint after the current step.
    columns = [
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with _ctrl_c("saving a checkpoint after this step (Ctrl-C again to abort without one)") as stop, Progress(*columns, console=err_console) as bar:
        tasks: dict[str, int] = {}

        def on_step(p) -> None:
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task(f"{p.stage} stage", total=p.total, loss=float("nan"), rate=0.0)
            bar.update(tasks[p.stage], completed=p.step, loss=p.loss, rate=p.images_per_s)

        trainer = Trainer(
            config, data=data, out=out, resume=resume is not None, perceptual_weights=perceptual_weights, vae=vae_path,
            device=device, progress=on_step, stop=stop.is_set, stop_after=stop_after,
            time_limit=time_limit * 60 if time_limit else None, export_every=export_every * 60 if export_every else None,
        )
        result = trainer.run()
    steps = ", ".join(f"{stage} {n}" for stage, n in result.steps.items())
    if result.status != "finished":
        err_console.print(f"[yellow]stopped at {steps}; checkpoint saved. Continue with: lienzo train --resume {result.out}")
        sys.exit(130 if result.status == "interrupted" else 0)
    err_console.print(f"trained ({steps}) in {result.seconds / 60:.1f} min; generate with: lienzo generate --model {result.out} \"...\"")
    click.echo(str(result.out))


@app.command("eval")
@click.option("--model", "-m", help="model name or path [default: the default model]")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="a folder made by `lienzo dataset openmoji`")
@click.option("--limit", type=int, help="evaluate only the first N held-out captions")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=5.0, show_default=True)
@click.option("--classifier-epochs", type=int, default=8, show_default=True)
@click.option("--threshold", type=float, default=0.01, show_default=True, help="cosine distance below which an image counts as a copy")
@click.option("--diversity", type=(click.IntRange(1), click.IntRange(2)), default=(20, 4), show_default=True, metavar="PROMPTS SEEDS",
              help="held-out captions and seeds per caption of the collapse check")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="also write the report as JSON")
@click.option("--card", is_flag=True, help="write the report into the model folder's card (README.md), as its Evaluation section")
@click.pass_context
def evaluate(ctx, model, data, limit, steps, cfg, classifier_epochs, threshold, diversity, json_out, card):
    """Fréchet distance, prompt accuracy, memorisation and collapse on OpenMoji's held-out split."""
    import json
    from dataclasses import asdict

    from lienzo import __version__
    from lienzo.api import load_model
    from lienzo.files import write_atomic
    from lienzo.training.artifacts import set_section
    from lienzo.training.evaluate import evaluate_openmoji, untrained_like

    components = load_model(model, device="cpu", settings=_settings(ctx))
    card_path = Path(components.source) / "README.md"
    if card and not card_path.is_file():
        raise click.BadParameter(f"{card_path} does not exist; --card needs a model folder with a model card", param_hint="--card")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_image(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"generating ({name})", total=total)
            bar.update(tasks[name], completed=done)

        report = evaluate_openmoji(components, data, untrained=untrained_like(components), limit=limit, steps=steps, cfg_scale=cfg,
                                   classifier_epochs=classifier_epochs, threshold=threshold, diversity=diversity, progress=on_image)
    click.echo(report.table())
    click.echo(f"{report.images} held-out captions; classifier accuracy on held-out real images {report.classifier_accuracy:.1%}; "
               f"memorised = nearest training image within cosine distance {report.threshold}; collapsed = same-prompt pairs "
               f"that close to each other ({report.diversity[0]} captions x {report.diversity[1]} seeds)")
    for caption, path, distance in report.closest[:3]:
        click.echo(f"closest: {caption!r} -> {path} ({distance:.4f})")
    if report.rows[0].memorised > 0:
        copied = ", ".join(path for _, path, distance in report.closest if distance < report.threshold)
        err_console.print(f"[yellow]warning: {report.rows[0].memorised:.1%} of the generated images copy training images: {escape(copied)}")
    if json_out is not None:
        json_out.write_text(json.dumps(asdict(report), indent=1))
    if card:
        how = f"`lienzo eval --data {data.name}{f' --limit {limit}' if limit else ''} --steps {steps} --cfg {cfg}`, lienzo {__version__}"
        text = set_section(card_path.read_text(), "Evaluation", report.markdown(how))
        write_atomic(card_path, lambda file: file.write(text.encode()))
        click.echo(f"wrote the evaluation into {card_path}")


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
