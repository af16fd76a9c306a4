"""The ``lienzo`` command line. Arguments are parsed only inside ``main()``.

Built on click rather than typer: the four generation commands share twenty options, and click's
decorators let them be declared once. Images go to stdout as paths, one per line; progress,
seeds and errors go to stderr.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
from pydantic import ValidationError
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


def _load_settings(**given) -> Settings:
    """The settings from ``given`` flags, the LIENZO_* environment and the defaults; a bad value is one
    line naming its flag or variable. A data dir that is a file is refused here, before anything uses it."""
    try:
        settings = Settings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0])
        where = f"--{name.replace('_', '-')}" if name in given else f"LIENZO_{name.upper()}"
        raise LienzoError(f"{where}: {first['msg']}, got {first['input']!r}") from None
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        where = "--data-dir" if "data_dir" in given else "LIENZO_DATA_DIR"
        raise LienzoError(f"{where}: {settings.data_dir} is a file, not a folder")
    return settings


class _LoraParam(click.ParamType):
    """``--lora NAME`` or ``--lora NAME:WEIGHT`` → (name, weight); the weight defaults to 1."""

    name = "NAME[:WEIGHT]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, weight = value.partition(":")
        try:
            return name, float(weight) if sep else 1.0
        except ValueError:
            self.fail(f"expected NAME or NAME:WEIGHT such as film-grain:0.6, got {value!r}", param, ctx)


def _model_options(f):
    f = _speed_options(f)
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


def _speed_options(f):
    """Speed and memory switches; unset, they come from the settings (LIENZO_THREADS, LIENZO_COMPILE, ...)."""
    for option in reversed(
        [
            click.option("--vae-dtype", default=None, help="auto, float32, float16 or bfloat16 [default: auto, the model's]"),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: one per physical core]"),
            click.option(
                "--channels-last/--no-channels-last", default=None,
                help="NHWC memory layout for the U-Net and VAE [default: on for CUDA and the CPU]",
            ),
            click.option(
                "--compile", "compile_", is_flag=True, default=None, help="torch.compile the U-Net and VAE (slow first image, cached)"
            ),
            click.option(
                "--int8", is_flag=True, default=None,
                help="CPU: the U-Net's linear layers in int8 (faster, a little less faithful to the model)",
            ),
            click.option(
                "--vae-tiling", type=click.Choice(["auto", "on", "off"]),
                help="VAE in tiles: auto (decodes above 1024x1024), on (decodes and encodes), off [default: auto]",
            ),
            click.option("--low-vram", is_flag=True, default=None, help="VAE tiling and (CUDA) CPU offload of the U-Net and text encoders"),
            click.option(
                "--attention-slicing/--no-attention-slicing", default=None,
                help="attention a few heads at a time [default: with --low-vram, except on CPU and CUDA]",
            ),
        ]
    ):
        f = option(f)
    return f


def _speed_kwargs(opts: dict) -> dict:
    """The speed flags given, as ``load_model`` arguments (None leaves a setting as it is)."""
    return {
        "vae_dtype": opts.get("vae_dtype"), "threads": opts.get("threads"), "channels_last": opts.get("channels_last"),
        "compile": opts.get("compile_"), "vae_tiling": opts.get("vae_tiling"), "low_vram": opts.get("low_vram"),
        "attention_slicing": opts.get("attention_slicing"), "int8": opts.get("int8"),
    }


def _generation_options(f):
    for option in reversed(
        [
            click.option("--negative", "-n", default="", help="negative prompt"),
            click.option("--width", "-W", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--height", "-H", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--steps", type=int, default=20, show_default=True),
            click.option("--cfg", type=float, default=7.0, show_default=True, help="classifier-free guidance scale"),
            click.option("--sampler", default="DPM++ 2M", show_default=True, help=SAMPLER_HELP),
            click.option(
                "--schedule", default="Automatic", show_default=True,
                help="schedule type by its A1111 label or id: Karras, Exponential, SGM Uniform, Align Your Steps, ... "
                "(see `lienzo samplers`)",
            ),
            click.option("--seed", type=int, default=-1, show_default=True, help="-1 picks a random seed"),
            click.option("--batch-size", type=int, default=1, show_default=True, help="images per batch (run together)"),
            click.option("--batch-count", type=int, default=1, show_default=True, help="batches, one after another"),
            click.option("--clip-skip", type=int, default=1, show_default=True),
            click.option(
                "--fast/--no-fast", default=False, show_default=True,
                help="fast mode: reuse deep U-Net features across steps (DeepCache), a little less faithful",
            ),
            click.option(
                "--lora", "loras", type=_LoraParam(), multiple=True,
                help="apply a LoRA from the models dir's Lora folder (repeatable); also <lora:NAME:WEIGHT> in the prompt",
            ),
            click.option(
                "--safety", type=click.Choice(["off", "blur", "block"]),
                help="what to do with images the model's safety checker flags [default: off, or LIENZO_SAFETY_CLI]",
            ),
            click.option(
                "--watermark/--no-watermark", default=None,
                help="invisible watermark in saved images [default: on, or LIENZO_WATERMARK]",
            ),
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
        "down": "outpaint_down", "loras": "loras", "safety": "safety",
        "watermark": "watermark", "fast": "fast",
    }
    return {field: opts[flag] for flag, field in names.items() if flag in opts and opts[flag] is not None}


def _run(ctx: click.Context, mode: str, fields: dict, opts: dict) -> None:
    """Validate the request, load the model, generate with a progress bar, save each image as it is done."""
    from lienzo.generation.limits import check_limits
    from lienzo.generation.request import build_request

    # 1. Validate before the heavy imports: torch, diffusers and transformers take 5 s on a busy
    #    2-core machine, and a typo should not wait for them (nor for the model's 20 s).
    settings = _settings(ctx)
    request = build_request(**{"safety": settings.safety_cli, **fields})
    check_limits(request, settings, name=lambda field: "--" + _flag_for(field).replace("_", "-"), count_batches=False)
    _check_models(opts, settings)
    out_option = "--out" if opts.get("out") else "--outputs-dir"
    _make_output_folder(opts.get("out") or settings.outputs_dir, out_option)
    if not request.prompt.strip():
        err_console.print("note: the prompt is empty; generating without one", highlight=False)

    # 2. Load the model, then generate; the studio saves each image as it is done.
    from lienzo.studio import Studio

    device = opts.get("device") or settings.device
    dtype = opts.get("dtype") or settings.dtype
    with err_console.status("loading model"):
        studio = Studio(settings)
        components = studio.load_model(
            opts.get("model"), vae=opts.get("vae"), prediction_type=opts.get("prediction"), device=device, dtype=dtype,
            **_speed_kwargs(opts),
        )
    out_dir = opts.get("out")
    studio.gallery = _open_gallery(settings)

    def saved(image, output) -> None:
        click.echo(str(output.path))
        if image.filtered:
            err_console.print(f"[yellow]{escape(output.path.name)}: {image.filtered} by the safety filter", highlight=False)

    def save_failed(err: OSError, folder: Path) -> None:  # a disk that filled up, a folder removed or locked meanwhile
        raise LienzoError(f"{out_option}: cannot save into {folder}: {err.strerror or err}") from None

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with _ctrl_c("stopping after this step (Ctrl-C again to abort now)") as stop, Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task(f"{mode} batch 1/{request.batch_count}", total=None)

            def on_step(p) -> None:
                bar.update(task, completed=p.step, total=p.total_steps, description=f"{mode} batch {p.batch + 1}/{p.batch_count}")

            result = studio.run(
                components, request, out_dir=out_dir, source="cli", progress=on_step, cancel=stop.is_set, on_saved=saved,
                save_failed=save_failed,
            )
    except GenerationCancelled:
        err_console.print("[yellow]cancelled: finished images were saved; the unfinished batch was not")
        sys.exit(130)
    finally:
        if studio.gallery is not None:
            studio.gallery.close()
    seeds = ", ".join(str(i.seed) for i in result.images)
    err_console.print(f"seed{'s' if len(result.images) > 1 else ''}: {seeds} ({result.seconds:.1f} s)")


def _make_output_folder(folder: Path, option: str) -> None:
    """Create the output folder now: one that cannot be written fails in one line before the model
    loads, not after the images are made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LienzoError(f"{option}: {folder} is a file, not a folder") from None
    except OSError as err:
        raise LienzoError(f"{option}: cannot create {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LienzoError(f"{option}: cannot write into {folder}: permission denied")


def _check_models(opts: dict, settings: Settings) -> None:
    """``--model`` and ``--vae`` name something that exists. A path is checked without torch, and must be a
    regular file or model folder (a FIFO or /dev/zero would hang the load); a name is looked up by the
    registry, which imports torch (to read model files) but not diffusers or the weights."""
    for flag in ("model", "vae"):
        value = opts.get(flag)
        if value is None:
            continue
        if Path(value).expanduser().exists():
            from lienzo.models.paths import check_model_path

            check_model_path(Path(value).expanduser(), flag)
            continue
        from lienzo.models.registry import Registry

        Registry(settings.models_dir, settings.cache_dir).resolve(value, field=flag)


def _open_gallery(settings: Settings):
    """The settings' gallery, or None when it cannot be opened: images are still saved, and
    ``lienzo gallery reconcile`` indexes them once it can."""
    import sqlite3

    from lienzo.gallery.store import Gallery, GalleryError

    try:
        return Gallery.for_settings(settings)
    except (GalleryError, sqlite3.Error) as err:
        err_console.print(f"[yellow]warning: images will not be added to the gallery: {escape(str(err))}", highlight=False, soft_wrap=True)
        return None


@contextmanager
def _ctrl_c(message: str):
    """The first Ctrl-C sets the event it yields (work stops cleanly after its current step); a second aborts."""
    stop = threading.Event()

    def on_sigint(_signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print(f"[yellow]{message}")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Group(click.Group):
    """Turns lienzo's own errors into one red line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LienzoError as err:
            err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    def format_epilog(self, ctx, formatter):
        """Where this machine's folders are (from the environment and the defaults; --help is answered
        before the other flags are read), so that a user can find the images every command saves."""
        try:
            settings = _load_settings()
        except LienzoError as err:
            with formatter.section("Folders"):
                formatter.write_text(f"unknown: {err}")
            return
        with formatter.section("Folders (--outputs-dir, --models-dir and --data-dir change them)"):
            formatter.write_dl(
                [("outputs", str(settings.outputs_dir)), ("models", str(settings.models_dir)), ("data", str(settings.data_dir))]
            )


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
    ctx.obj = _load_settings(**{k: v for k, v in given.items() if v is not None})


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

    init = load_image(image, max_pixels=_settings(ctx).max_input_pixels)
    _run(ctx, "img2img", {**_request_fields(opts), "prompt": prompt, "init_image": init}, opts)


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

    most = _settings(ctx).max_input_pixels
    init = load_image(image, max_pixels=most)
    fields = {**_request_fields(opts), "prompt": prompt, "init_image": init, "mask": load_mask(mask, init.size, max_pixels=most)}
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
    init = load_image(image, max_pixels=_settings(ctx).max_input_pixels)
    _run(ctx, "outpaint", {**_request_fields(opts), "prompt": prompt, "init_image": init}, opts)


@app.command()
@click.option("--details", is_flag=True, help="also the full sha256 and what each model states about its training data")
@click.pass_context
def models(ctx, details):
    """List lienzo's own model and the models dir's, with their A1111 short hashes."""
    from lienzo.images.provenance import describe_training_data
    from lienzo.models.registry import Registry, embedded_model
    from lienzo.origins import training_data_for

    settings = _settings(ctx)
    registry = Registry(settings.models_dir, settings.cache_dir)
    table = Table(title=f"models in {settings.models_dir}")
    for column in ("name", "architecture", "size", "hash"):
        table.add_column(column)
    embedded = embedded_model()
    entries = ([registry.entry(embedded)] if embedded else []) + registry.scan()
    for entry in entries:
        table.add_row(entry.name, entry.architecture, f"{entry.size_bytes / 2**20:,.1f} MiB", entry.short_hash)
    Console().print(table)
    if details:
        for entry in entries:
            click.echo(f"{entry.name}\n  sha256: {entry.sha256}\n  training data: {describe_training_data(training_data_for(entry.path))}")
    loras = registry.loras()
    if loras:
        table = Table(title="LoRAs (use as <lora:NAME:WEIGHT> or --lora NAME:WEIGHT)")
        for column in ("name", "size", "hash"):
            table.add_column(column)
        for lora in loras:
            table.add_row(lora.name, f"{lora.size_bytes / 2**20:,.1f} MiB", lora.short_hash)
        Console().print(table)


@app.command()
def samplers():
    """List the samplers, the schedule types each runs as asked, and every schedule type's names."""
    from lienzo.generation.samplers import SAMPLERS, SCHEDULES, runs_as

    table = Table(title="samplers (any other schedule runs as the nearest its scheduler can)")
    for column in ("sampler", "schedules", "automatic =", "method"):
        table.add_column(column)
    for s in SAMPLERS.values():
        table.add_row(s.name, ", ".join(s.schedules), s.automatic, s.paper)
    Console().print(table)
    table = Table(title="schedule types (--schedule takes the label or the A1111 id, in any case)")
    for column in ("label", "A1111 id", "aliases", "runs as Uniform, the nearest, on"):
        table.add_column(column)
    for schedule in list(SCHEDULES.values())[1:]:
        nearest = [s.name for s in SAMPLERS.values() if runs_as(s, schedule.label) != schedule.label]
        table.add_row(schedule.label, schedule.name, ", ".join(schedule.aliases), ", ".join(nearest))
    Console().print(table)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
def info(image):
    """Show the generation parameters stored in an image (lienzo, AUTOMATIC1111, Forge, ...), its
    lienzo provenance record and whether it carries lienzo's invisible watermark."""
    from lienzo.images.io import load_image
    from lienzo.images.metadata import parse_infotext, read_parameters
    from lienzo.images.provenance import read_provenance
    from lienzo.images.watermark import detect

    text = read_parameters(image)
    try:
        record = read_provenance(image)
        provenance = record.lines() if record is not None else None
    except LienzoError as err:
        # A damaged record is worth saying, not a reason to hide the rest.
        provenance = [f"unreadable: {err}"]
    found = detect(load_image(image))
    if text is None and provenance is None and not found.detected:
        raise LienzoError(f"image: {image} carries no generation parameters")
    if text is not None:
        parsed = parse_infotext(text)
        click.echo(f"Prompt: {parsed.prompt}")
        if parsed.negative_prompt:
            click.echo(f"Negative prompt: {parsed.negative_prompt}")
        for key, value in parsed.params.items():
            click.echo(f"{key}: {value}")
    if provenance is not None:
        click.echo("Provenance:")
        for line in provenance:
            click.echo(f"  {line}")
    click.echo(f"Watermark: {found.describe()}")


@app.group("gallery")
def gallery_group():
    """The gallery of every image lienzo made or imported (shared with `lienzo serve`)."""


@gallery_group.command("list")
@click.argument("query", required=False, default="")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@click.pass_context
def gallery_list(ctx, query, limit):
    """Images newest first, or those whose prompt holds every word of QUERY: id, date, prompt, path."""
    from datetime import datetime

    from lienzo.gallery.store import Gallery

    with Gallery.for_settings(_settings(ctx)) as gallery:
        page = gallery.search(query, limit=limit)
    for item in page.items:
        when = datetime.fromtimestamp(item.created).strftime("%Y-%m-%d %H:%M")
        prompt = " ".join(item.prompt.split())
        click.echo(f"{item.id}\t{when}\t{prompt[:60] + '...' if len(prompt) > 60 else prompt}\t{item.path}")


@gallery_group.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_context
def gallery_import(ctx, files):
    """Copy images (PNG, JPEG, WebP) into the gallery with the parameters their metadata holds
    (lienzo, AUTOMATIC1111, Forge, InvokeAI, ComfyUI, NovelAI); prints each new path."""
    from lienzo.gallery.store import Gallery

    settings = _settings(ctx)
    failed = 0
    with Gallery.for_settings(settings) as gallery:
        for file in files:
            try:
                item = gallery.import_image(file.read_bytes(), file.name, max_pixels=settings.max_input_pixels)
            except (LienzoError, OSError) as err:
                failed += 1
                message = err.strerror if isinstance(err, OSError) else str(err)
                err_console.print(f"[red]error:[/red] {escape(str(file))}: {escape(str(message))}", highlight=False, soft_wrap=True)
            else:
                click.echo(str(item.path))
    if failed:
        sys.exit(2)


@gallery_group.command("reconcile")
@click.pass_context
def gallery_reconcile(ctx):
    """Make the gallery match the files: add images under the outputs dir that have no row, drop rows
    whose file has gone, remove temporary files an interrupted save left."""
    from lienzo.gallery.store import Gallery

    with Gallery.for_settings(_settings(ctx)) as gallery:
        report = gallery.reconcile()
    click.echo(f"added {report.added} images, removed {report.removed} rows, removed {report.temp_files} temporary files")


@app.group()
def dataset():
    """Check a training folder, or prepare OpenMoji as one."""


@dataset.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=int, default=128, show_default=True, help="pixels per side")
@click.option("--holdout", type=float, default=0.05, show_default=True, help="share held out for evaluation, per subgroup")
@click.option("--seed", type=int, default=0, show_default=True, help="which images are held out")
def openmoji(package, out, size, holdout, seed):
    """Rasterise the OpenMoji npm package (`npm pack openmoji`) into training and held-out folders."""
    from lienzo.training.openmoji import prepare_openmoji

    if not 16 <= size <= 1024 or not 0 <= holdout < 1:
        raise click.BadParameter("--size must be 16 to 1024 and --holdout 0 to below 1")
    columns = [TextColumn("rasterising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("svg", total=None)
        counts = prepare_openmoji(package, out, size=size, holdout=holdout, seed=seed,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    skipped = f"; {counts['failed']} SVGs could not be drawn and were skipped" if counts["failed"] else ""
    err_console.print(f"{counts['train']} training and {counts['holdout']} held-out images, CC BY-SA 4.0 (OpenMoji){skipped}", soft_wrap=True)
    click.echo(str(out))


@dataset.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--licence", help="the data's licence [default: first line of the folder's LICENSE file]")
@click.option("--source", help="where the data came from, for the model card")
@click.option("--manifest", type=click.Path(path_type=Path), help="where to write the manifest [default: FOLDER/lienzo-manifest.json]")
def check(folder, licence, source, manifest):
    """Decode every file in FOLDER, report what cannot be trained on, and write a manifest."""
    from lienzo.training.data import MANIFEST_NAME, scan_folder, write_manifest

    columns = [TextColumn("checking images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("scan", total=None)

        def on_file(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        scan = scan_folder(folder, licence=licence, source=source, progress=on_file)

    console = Console()
    console.print(f"files seen: {scan.files_seen}", highlight=False)
    console.print(f"valid images: {len(scan.records)}", highlight=False)
    if scan.records:
        # Ordered by area; the median of an even count is the lower middle, a size that exists.
        by_area = sorted(scan.records, key=lambda r: (r.width * r.height, r.width))
        sizes = [by_area[0], by_area[(len(by_area) - 1) // 2], by_area[-1]]
        console.print("sizes (min / median / max): " + " / ".join(f"{r.width}x{r.height}" for r in sizes), highlight=False)
        console.print(f"captioned: {scan.captioned} of {len(scan.records)}", highlight=False)
        labels = ", ".join(f"{escape(name)} {n}" for name, n in scan.labels.items()) or "none (no sub-folders)"
        console.print(f"labels: {labels}", highlight=False)
    licence_text = escape(scan.licence) if scan.licence else "[yellow]unknown: pass --licence or add a LICENSE file"
    console.print(f"licence: {licence_text}", highlight=False, soft_wrap=True)
    if scan.problems:
        table = Table(title="skipped files")
        for column in ("path", "kind", "detail"):
            table.add_column(column)
        for p in scan.problems:
            table.add_row(escape(p.path), p.kind, escape(p.detail))
        console.print(table)
    for kept, *dropped in scan.duplicates:
        console.print(f"duplicate: kept {escape(kept)}, skipped {escape(', '.join(dropped))}", highlight=False, soft_wrap=True)
    scan.require_images()

    path = manifest or folder / MANIFEST_NAME
    digest = write_manifest(scan, path, field="--manifest")
    console.print(f"manifest: {escape(str(path))}", highlight=False, soft_wrap=True)
    console.print(f"sha256: {digest}", highlight=False)


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
@click.pass_context
def train(ctx, data, out, config_file, preset, overrides, resume, vae_path, perceptual_weights, lora, device, num_processes, stop_after, time_limit, **flags):
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
            time_limit=time_limit * 60 if time_limit else None,
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
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="also write the report as JSON")
@click.option("--card", is_flag=True, help="write the report into the model folder's card (README.md), as its Evaluation section")
@click.pass_context
def evaluate(ctx, model, data, limit, steps, cfg, classifier_epochs, threshold, json_out, card):
    """Fréchet distance, prompt accuracy and memorisation on OpenMoji's held-out split."""
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
                                   classifier_epochs=classifier_epochs, threshold=threshold, progress=on_image)
    click.echo(report.table())
    click.echo(f"{report.images} held-out captions; classifier accuracy on held-out real images {report.classifier_accuracy:.1%}; "
               f"memorised = nearest training image within cosine distance {report.threshold}")
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


@app.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--listen", is_flag=True, help="listen on all interfaces (0.0.0.0); needs --auth or --api-key")
@click.option("--auth", envvar="LIENZO_AUTH", metavar="USER:PASS", help="require HTTP Basic credentials [env LIENZO_AUTH]")
@click.option("--api-key", envvar="LIENZO_API_KEY", metavar="KEY", help="require 'Authorization: Bearer KEY' [env LIENZO_API_KEY]")
@click.option("--insecure", is_flag=True, help="allow listening beyond this machine without authentication")
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
    help="also answer to this Host name (besides localhost, IP addresses and this machine's name); repeatable; "
    ".example.com: a domain and its subdomains; '*': any [env LIENZO_ALLOWED_HOSTS, comma-separated]",
)
@click.option(
    "--public-url", metavar="URL",
    help="the address clients reach this server at, for links in answers, e.g. https://studio.example behind a proxy "
    "[env LIENZO_PUBLIC_URL; default: the address a request arrived at]",
)
@click.option("-m", "--model", help="model for requests that name none (default: lienzo's own, else the models dir's first)")
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
@click.option("--dtype", help="auto, float32, float16 or bfloat16 [default: auto]")
@_speed_options
@click.pass_context
def serve(ctx, host, port, listen, auth, api_key, insecure, allowed_hosts, public_url, model, device, dtype, **speed):
    """HTTP server: lienzo's API (/api/v1), AUTOMATIC1111's (/sdapi/v1) and OpenAI's (/v1/images); docs at /docs."""
    import ipaddress

    import uvicorn

    from lienzo.server.app import Auth, create_app
    from lienzo.settings import parse_allowed_hosts, parse_public_url

    settings = _settings(ctx)
    if device:
        settings.device = device
    if dtype:
        settings.dtype = dtype
    for name, value in _speed_kwargs(speed).items():
        if value is not None:
            setattr(settings, name, value)
    try:
        settings.allowed_hosts = [*settings.allowed_hosts, *parse_allowed_hosts(list(allowed_hosts))]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--allowed-host") from None
    if public_url is not None:
        try:
            settings.public_url = parse_public_url(public_url)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--public-url") from None
    host = "0.0.0.0" if listen else host
    user, sep, password = (auth or "").partition(":")
    if auth is not None and (not sep or not user):
        raise click.BadParameter("give USER:PASS", param_hint="--auth")
    credentials = Auth(user=user or None, password=password or None, api_key=api_key or None)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
        settings.allowed_hosts.append(host.lower())  # the name it listens on is its own
    if not loopback and not credentials.enabled and not insecure:
        raise click.UsageError(
            f"refusing to listen on {host} without authentication: give --auth USER:PASS or --api-key KEY "
            "(or --insecure to accept that anyone on the network can use this server)"
        )
    if model is not None:
        from lienzo.models.registry import Registry

        Registry(settings.models_dir, settings.cache_dir).resolve(model)  # an unknown name fails before the server starts
    err_console.print(f"lienzo serving on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port} (docs at /docs)")
    # A client waiting on a long job must not hold Ctrl-C up: after 5 s its connection is closed and
    # the lifespan's shutdown cancels what is queued or running.
    uvicorn.run(create_app(settings, model=model, auth=credentials), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


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


def main() -> None:
    # lienzo draws its own progress bars; the hub libraries' tqdm bars ("Loading weights") would interleave.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers warns on import that torchvision is missing for image processors lienzo never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torchsde (DPM++ SDE) warns about float rounding at the ends of its interval on every run.
    warnings.filterwarnings("ignore", category=UserWarning, module="torchsde")
    app(prog_name="lienzo")


if __name__ == "__main__":
    main()
