"""The ``lienzo`` command line. Arguments are parsed only inside ``main()``.

Built on click rather than typer: the four generation commands share twenty options, and click's
decorators let them be declared once. Images go to stdout as paths, one per line; progress,
seeds and errors go to stderr.
"""

import logging
import signal
import sys
import threading
import warnings
from datetime import date
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lienzo.errors import GenerationCancelled, LienzoError
from lienzo.settings import Settings

err_console = Console(stderr=True)
log = logging.getLogger("lienzo")

SAMPLER_HELP = "sampler by its AUTOMATIC1111 name (see `lienzo samplers`)"


def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj


def _model_options(f):
    for option in reversed(
        [
            click.option("--model", "-m", help="model name in the models dir, or a path (file or diffusers folder)"),
            click.option("--vae", help="a separate VAE file (name in the models dir or a path)"),
            click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), help="override the model's prediction type"),
            click.option("--device", default=None, help="auto, cpu, cuda or mps [default: auto]"),
            click.option("--dtype", default=None, help="auto, float32, float16 or bfloat16 [default: auto]"),
        ]
    ):
        f = option(f)
    return f


def _generation_options(f):
    for option in reversed(
        [
            click.option("--negative", "-n", default="", help="negative prompt"),
            click.option("--width", "-W", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--height", "-H", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--steps", type=int, default=20, show_default=True),
            click.option("--cfg", type=float, default=7.0, show_default=True, help="classifier-free guidance scale"),
            click.option("--sampler", default="DPM++ 2M", show_default=True, help=SAMPLER_HELP),
            click.option("--schedule", default="Automatic", show_default=True, help="Automatic, Uniform, Karras, Exponential, SGM Uniform"),
            click.option("--seed", type=int, default=-1, show_default=True, help="-1 picks a random seed"),
            click.option("--batch-size", type=int, default=1, show_default=True, help="images per batch (run together)"),
            click.option("--batch-count", type=int, default=1, show_default=True, help="batches, one after another"),
            click.option("--clip-skip", type=int, default=1, show_default=True),
            click.option("--out", "-o", type=click.Path(path_type=Path), help="output folder [default: outputs dir]"),
        ]
    ):
        f = option(f)
    return _model_options(f)


def _inpaint_options(f):
    for option in reversed(
        [
            click.option("--mask-blur", type=int, default=4, show_default=True, help="pixels"),
            click.option("--only-masked", is_flag=True, help="crop around the mask, work at full resolution, paste back"),
            click.option("--padding", type=int, default=32, show_default=True, help="pixels around the mask with --only-masked"),
        ]
    ):
        f = option(f)
    return f


def _fill_option(default: str):
    choices = click.Choice(["fill", "original", "latent noise", "latent nothing"])
    return click.option("--fill", type=choices, default=default, show_default=True, help="what starts under the mask")


def _strength_option(default: float):
    return click.option("--strength", type=float, default=default, show_default=True, help="denoising strength, 0 to 1")


def _request_fields(opts: dict) -> dict:
    """CLI flag names to GenerationRequest fields."""
    names = {
        "negative": "negative_prompt", "width": "width", "height": "height", "steps": "steps", "cfg": "cfg_scale",
        "sampler": "sampler", "schedule": "schedule", "seed": "seed", "batch_size": "batch_size",
        "batch_count": "batch_count", "clip_skip": "clip_skip", "strength": "denoising_strength",
        "mask_blur": "mask_blur", "only_masked": "inpaint_only_masked", "padding": "only_masked_padding",
        "fill": "inpainting_fill", "left": "outpaint_left", "right": "outpaint_right", "up": "outpaint_up",
        "down": "outpaint_down",
    }
    return {field: opts[flag] for flag, field in names.items() if flag in opts and opts[flag] is not None}


def _run(ctx: click.Context, mode: str, fields: dict, opts: dict) -> None:
    """Build the request, load the model, generate with a progress bar, save each image as it is done."""
    from lienzo.api import load_model
    from lienzo.generation.engine import generate
    from lienzo.generation.request import build_request
    from lienzo.images.io import next_image_path, save_png_atomic
    from lienzo.images.metadata import pnginfo

    settings = _settings(ctx)
    request = build_request(**fields)
    device = opts.get("device") or settings.device
    dtype = opts.get("dtype") or settings.dtype
    with err_console.status("loading model"):
        components = load_model(
            opts.get("model"), vae=opts.get("vae"), prediction_type=opts.get("prediction"), device=device, dtype=dtype, settings=settings
        )
    out_dir = opts.get("out") or settings.outputs_dir / f"{mode}-images" / date.today().isoformat()

    stop = threading.Event()

    def on_sigint(_signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print("[yellow]stopping after this step (Ctrl-C again to abort now)")

    def save(image) -> None:
        path = save_png_atomic(image.image, next_image_path(out_dir, image.seed), pnginfo(image.infotext))
        click.echo(str(path))

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task(f"{mode} batch 1/{request.batch_count}", total=None)

            def on_step(p) -> None:
                bar.update(task, completed=p.step, total=p.total_steps, description=f"{mode} batch {p.batch + 1}/{p.batch_count}")

            result = generate(components, request, progress=on_step, cancel=stop.is_set, on_image=save)
    except GenerationCancelled:
        err_console.print("[yellow]cancelled: finished images were saved; the unfinished batch was not")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    seeds = ", ".join(str(i.seed) for i in result.images)
    err_console.print(f"seed{'s' if len(result.images) > 1 else ''}: {seeds} ({result.seconds:.1f} s)")


class _Group(click.Group):
    """Turns lienzo's own errors into one red line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LienzoError as err:
            err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models-dir", type=click.Path(path_type=Path), help="[env LIENZO_MODELS_DIR]")
@click.option("--outputs-dir", type=click.Path(path_type=Path), help="[env LIENZO_OUTPUTS_DIR]")
@click.option("--data-dir", type=click.Path(path_type=Path), help="gallery and caches [env LIENZO_DATA_DIR]")
@click.option("-v", "--verbose", is_flag=True, help="log details to stderr")
@click.version_option(package_name="lienzo")
@click.pass_context
def app(ctx, models_dir, outputs_dir, data_dir, verbose):
    """lienzo: create art with diffusion models, offline."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {"models_dir": models_dir, "outputs_dir": outputs_dir, "data_dir": data_dir}
    ctx.obj = Settings(**{k: v for k, v in given.items() if v is not None})


@app.command()
@click.argument("prompt", required=False, default="")
@click.option("--from", "from_image", type=click.Path(path_type=Path), help="remake an image from its PNG parameters")
@_generation_options
@click.pass_context
def generate(ctx, prompt, from_image, **opts):
    """Text to image."""
    fields = _request_fields(opts)
    if from_image is not None:
        from lienzo.generation.remake import fields_from_image

        remade = fields_from_image(from_image)
        model = remade.pop("model", None)
        # Flags given explicitly on the command line win over the image's parameters.
        explicit = {k: v for k, v in fields.items() if ctx.get_parameter_source(_flag_for(k)) == click.core.ParameterSource.COMMANDLINE}
        fields = {**fields, **remade, **explicit}
        opts["model"] = opts.get("model") or model
        prompt = prompt or remade.get("prompt", "")
    _run(ctx, "txt2img", {**fields, "prompt": prompt}, opts)


def _flag_for(field: str) -> str:
    reverse = {"negative_prompt": "negative", "cfg_scale": "cfg", "denoising_strength": "strength"}
    return reverse.get(field, field)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@_strength_option(0.75)
@_generation_options
@click.pass_context
def img2img(ctx, image, prompt, **opts):
    """Image to image: repaint IMAGE guided by PROMPT."""
    from lienzo.images.io import load_image

    _run(ctx, "img2img", {**_request_fields(opts), "prompt": prompt, "init_image": load_image(image)}, opts)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@click.argument("prompt")
@_strength_option(0.75)
@_fill_option("original")
@_inpaint_options
@_generation_options
@click.pass_context
def inpaint(ctx, image, mask, prompt, **opts):
    """Repaint the white part of MASK in IMAGE."""
    from lienzo.images.io import load_image, load_mask

    init = load_image(image)
    fields = {**_request_fields(opts), "prompt": prompt, "init_image": init, "mask": load_mask(mask, init.size)}
    _run(ctx, "inpaint", fields, opts)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--left", type=int, default=0, help="pixels to add on the left (multiple of 8)")
@click.option("--right", type=int, default=0, help="pixels to add on the right (multiple of 8)")
@click.option("--up", type=int, default=0, help="pixels to add at the top (multiple of 8)")
@click.option("--down", type=int, default=0, help="pixels to add at the bottom (multiple of 8)")
@click.option("--mask-blur", type=int, default=8, show_default=True, help="pixels")
@_strength_option(0.8)
@_fill_option("fill")
@_generation_options
@click.pass_context
def outpaint(ctx, image, prompt, **opts):
    """Grow IMAGE's canvas and paint the new area to match."""
    from lienzo.images.io import load_image

    if not any(opts[k] for k in ("left", "right", "up", "down")):
        raise click.UsageError("give at least one of --left, --right, --up, --down")
    _run(ctx, "outpaint", {**_request_fields(opts), "prompt": prompt, "init_image": load_image(image)}, opts)


@app.command()
@click.pass_context
def models(ctx):
    """List the models in the models dir with their A1111 short hashes."""
    from lienzo.models.registry import Registry

    settings = _settings(ctx)
    registry = Registry(settings.models_dir, settings.cache_dir)
    table = Table(title=f"models in {settings.models_dir}")
    for column in ("name", "architecture", "size", "hash"):
        table.add_column(column)
    for entry in registry.scan():
        table.add_row(entry.name, entry.architecture, f"{entry.size_bytes / 2**20:,.1f} MiB", entry.short_hash)
    Console().print(table)


@app.command()
def samplers():
    """List the samplers and the schedule types each can use."""
    from lienzo.generation.samplers import SAMPLERS

    table = Table()
    for column in ("sampler", "schedules", "automatic =", "method"):
        table.add_column(column)
    for s in SAMPLERS.values():
        table.add_row(s.name, ", ".join(s.schedules), s.automatic, s.paper)
    Console().print(table)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
def info(image):
    """Show the generation parameters stored in an image (lienzo, AUTOMATIC1111, Forge, ...)."""
    from lienzo.images.metadata import parse_infotext, read_parameters

    text = read_parameters(image)
    if text is None:
        raise LienzoError(f"image: {image} carries no generation parameters")
    parsed = parse_infotext(text)
    click.echo(f"Prompt: {parsed.prompt}")
    if parsed.negative_prompt:
        click.echo(f"Negative prompt: {parsed.negative_prompt}")
    for key, value in parsed.params.items():
        click.echo(f"{key}: {value}")


def main() -> None:
    # torchsde (DPM++ SDE) warns about float rounding at the ends of its interval on every run.
    warnings.filterwarnings("ignore", category=UserWarning, module="torchsde")
    app(prog_name="lienzo")


if __name__ == "__main__":
    main()
