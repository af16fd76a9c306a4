"""``lienzo generate``, ``img2img``, ``inpaint`` and ``outpaint``: validate, load the model, generate, save."""

import os
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lienzo.cli.common import (
    _ctrl_c,
    _flag_for,
    control_models_for,
    _generation_options,
    _model_kwargs,
    _request_fields,
    _settings,
    _speed_kwargs,
    app,
    err_console,
)
from lienzo.errors import GenerationCancelled, LienzoError
from lienzo.settings import Settings

_FROM = click.option(
    "--from", "from_image", type=click.Path(path_type=Path),
    help="remake an image from its PNG parameters (flags given here win); img2img, inpaint and outpaint take the same inputs again",
)


@app.command()
@click.argument("prompt", required=False, default="")
@_FROM
@_generation_options("txt2img")
@click.pass_context
def generate(ctx, prompt, from_image, **opts):
    """Text to image."""
    _run(ctx, "txt2img", _remade(ctx, "txt2img", prompt, from_image, opts), opts)


def _remade(ctx: click.Context, mode: str, prompt: str, from_image: Path | None, opts: dict) -> dict:
    """The request's fields from the flags, over an image's parameters (``--from``) when one is given;
    the image's model too, unless ``--model`` names one."""
    fields = _request_fields(opts)
    if from_image is not None:
        from lienzo.generation.infotext import fields_from_image

        remade = fields_from_image(from_image, mode)
        model = remade.pop("model", None)
        # The infotext keeps the reference images' hashes, not the pictures: they must be given again.
        recorded = remade.pop("reference_images", ())
        if recorded:
            from lienzo.generation.fields import check_references

            check_references(recorded, fields.get("reference_images", []), _flag_for("reference_images"))
        # ControlNet units too: their settings come from the picture, their images from --control (in order).
        units = remade.pop("controlnets", [])
        if units:
            from lienzo.generation.control_unit import check_control_images

            given = fields.get("controlnets", [])
            check_control_images(units, [unit.get("image") for unit in given], "--control")
            remade["controlnets"] = [{**recorded, **unit} for recorded, unit in zip(units, given, strict=True)]
        # Flags given explicitly on the command line win over the image's parameters.
        explicit = {k: v for k, v in fields.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        if units:  # merged with the picture's settings above
            explicit.pop("controlnets", None)
        fields = {**fields, **remade, **explicit}
        opts["model"] = opts.get("model") or model
        prompt = prompt or remade.get("prompt", "")
    return {**fields, "prompt": prompt}


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt", required=False, default="")
@_FROM
@_generation_options("img2img")
@click.pass_context
def img2img(ctx, image, prompt, from_image, **opts):
    """Image to image: repaint IMAGE guided by PROMPT."""
    from lienzo.images.io import load_image

    init = load_image(image, max_pixels=_settings(ctx).max_input_pixels)
    _run(ctx, "img2img", {**_remade(ctx, "img2img", prompt, from_image, opts), "init_image": init}, opts)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@click.argument("prompt", required=False, default="")
@_FROM
@_generation_options("inpaint")
@click.pass_context
def inpaint(ctx, image, mask, prompt, from_image, **opts):
    """Repaint the white part of MASK in IMAGE."""
    from lienzo.images.io import load_image, load_mask

    most = _settings(ctx).max_input_pixels
    init = load_image(image, max_pixels=most)
    fields = {**_remade(ctx, "inpaint", prompt, from_image, opts), "init_image": init}
    _run(ctx, "inpaint", {**fields, "mask": load_mask(mask, init.size, max_pixels=most)}, opts)


@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt", required=False, default="")
@_FROM
@_generation_options("outpaint")
@click.pass_context
def outpaint(ctx, image, prompt, from_image, **opts):
    """Grow IMAGE's canvas and paint the new area to match."""
    from lienzo.images.io import load_image

    fields = _remade(ctx, "outpaint", prompt, from_image, opts)
    if not any(fields.get(f"outpaint_{side}") for side in ("left", "right", "up", "down")):
        raise click.UsageError("give at least one of --left, --right, --up, --down")
    init = load_image(image, max_pixels=_settings(ctx).max_input_pixels)
    _run(ctx, "outpaint", {**fields, "init_image": init}, opts)


def _run(ctx: click.Context, mode: str, fields: dict, opts: dict) -> None:
    """Validate the request, load the model, generate with a progress bar, save each image as it is done."""
    from lienzo.generation.limits import check_limits
    from lienzo.generation.request import build_request

    # 1. Validate before the heavy imports: torch, diffusers and transformers take 5 s on a busy
    #    2-core machine, and a typo should not wait for them (nor for the model's 20 s).
    settings = _settings(ctx)
    if fields.get("controlnets"):
        fields["controlnets"] = control_models_for(fields["controlnets"], settings)
    request = build_request(**{"safety": settings.safety_cli, **fields})
    check_limits(request, settings, name=_flag_for, count_batches=False)
    if request.styles:  # merged now, so that an unknown name is reported before the model loads
        request = _with_styles(request, settings)
    _check_models(opts, settings)
    out_option = "--out" if opts.get("out") else "--outputs-dir"
    _make_output_folder(opts.get("out") or settings.outputs_dir, out_option)
    if not request.prompt.strip():
        err_console.print("note: the prompt is empty; generating without one", highlight=False)

    # 2. Load the model, then generate; the studio saves each image as it is done.
    studio, components = load_studio(opts, settings)
    out_dir = opts.get("out")

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


def load_studio(opts: dict, settings: Settings):
    """The Studio for these settings, with its gallery, and the model the options name, loaded."""
    from lienzo.studio import Studio

    device = opts.get("device") or settings.device
    dtype = opts.get("dtype") or settings.dtype
    with err_console.status("loading model"):
        studio = Studio(settings)
        components = studio.load_model(
            opts.get("model"), device=device, dtype=dtype, **_model_kwargs(opts), **_speed_kwargs(opts),
        )
    studio.gallery = _open_gallery(settings)
    return studio, components


def _with_styles(request, settings: Settings):
    from lienzo.studio import apply_styles

    gallery = _open_gallery(settings)
    try:
        return apply_styles(request, gallery)
    finally:
        if gallery is not None:
            gallery.close()


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
