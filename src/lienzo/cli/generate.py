"""``lienzo generate``, ``img2img``, ``inpaint`` and ``outpaint``: validate, load the model, generate, save.

With a ``lienzo serve`` running on this machine for the same folders and load options, the validated request
goes to it instead (lienzo.cli.remote): the server holds the model already, and the job is the same request
through the same engine with its seed drawn at submit, so it makes the same picture, saved to the same gallery
and outputs folder. That happens on its own, with a note on stderr saying where the job went and that
``--local`` (LIENZO_LOCAL=1) runs it here; ``--server URL`` insists on the server.
"""

import os
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lienzo.cli import remote
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


def _where(f):
    """``--local`` and ``--server``: where the job runs (module docstring). Here, not among the shared options:
    ``lienzo grid`` runs its cells here."""
    f = click.option(
        "--server", metavar="URL", envvar="LIENZO_SERVER",
        help="send the job to this lienzo serve (the one the data dir's server.json describes), or fail saying why "
        "[env LIENZO_SERVER; default: that server when it can make the same picture, else here]",
    )(f)
    return click.option(
        "--local", is_flag=True, envvar="LIENZO_LOCAL",
        help="load the model and generate in this process, even with a lienzo serve running [env LIENZO_LOCAL=1]",
    )(f)


@app.command()
@click.argument("prompt", required=False, default="")
@_FROM
@_generation_options("txt2img")
@_where
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
@_where
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
@_where
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
@_where
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
    """Validate the request; then send it to a running server that can make the same picture, or load the
    model and generate here with a progress bar, saving each image as it is done."""
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

    # 2. A lienzo serve for these folders and load options holds the model already: it makes the same picture.
    server = remote.find_server(settings, mode, opts)
    if server is not None and _run_on(server, mode, request, settings):
        return

    # 3. Load the model, then generate; the studio saves each image as it is done.
    studio, components = load_studio(opts, settings)
    out_dir = opts.get("out")

    def saved(image, output) -> None:
        _saved(output.path, image.filtered)

    def save_failed(err: OSError, folder: Path) -> None:  # a disk that filled up, a folder removed or locked meanwhile
        raise LienzoError(f"{out_option}: cannot save into {folder}: {err.strerror or err}") from None

    try:
        with _ctrl_c(_STOPPING) as stop, _progress() as bar:
            task = bar.add_task(f"{mode} batch 1/{request.batch_count}", total=None)

            def on_step(p) -> None:
                bar.update(task, completed=p.step, total=p.total_steps, description=f"{mode} batch {p.batch + 1}/{p.batch_count}")

            result = studio.run(
                components, request, out_dir=out_dir, source="cli", progress=on_step, cancel=stop.is_set, on_saved=saved,
                save_failed=save_failed,
            )
    except GenerationCancelled:
        _cancelled()
    finally:
        if studio.gallery is not None:
            studio.gallery.close()
    _seeds([i.seed for i in result.images], result.seconds)


_STOPPING = "stopping after this step (Ctrl-C again to abort now)"


def _progress() -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err_console, transient=True)


def _saved(path: Path | str, filtered: str | None) -> None:
    """An image is saved: its path on stdout, a word on stderr when the safety filter changed it."""
    click.echo(str(path))
    if filtered:
        err_console.print(f"[yellow]{escape(Path(path).name)}: {filtered} by the safety filter", highlight=False)


def _cancelled() -> None:
    err_console.print("[yellow]cancelled: finished images were saved; the unfinished batch was not")
    sys.exit(130)


def _seeds(seeds: list[int], seconds: float) -> None:
    err_console.print(f"seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))} ({seconds:.1f} s)")


def _run_on(server: remote.Server, mode: str, request, settings: Settings) -> bool:
    """Run the job on ``server`` as it would run here: the same progress bar, each saved image's path on stdout,
    the seeds; Ctrl-C cancels it there. False: the server refused it, and it is to run here."""
    job = remote.submit(server, mode, remote.request_body(mode, request, settings))
    if job is None:
        return False
    err_console.print(f"note: sent to lienzo serve at {server.url} (pid {server.pid}); --local runs it here", highlight=False, soft_wrap=True)
    printed = 0
    with _ctrl_c(_STOPPING) as stop, _progress() as bar:
        task = bar.add_task(f"{mode}: sent", total=None)

        def on_change(current: dict) -> None:
            nonlocal printed
            for image in current["images"][printed:]:
                _saved(image["file"], image.get("filtered"))
            printed = len(current["images"])
            p = current["progress"]
            if current["status"] == "queued":
                bar.update(task, description=f"{mode}: queued on the server, {current['position'] or 0} jobs ahead")
            elif p["total_steps"]:
                bar.update(task, completed=p["step"], total=p["total_steps"], description=f"{mode} batch {p['batch'] + 1}/{p['batch_count']}")

        job = remote.follow(server, job, on_change=on_change, stop=stop)
    if job["status"] == "failed":
        raise LienzoError(job.get("error") or f"job {job['id']} failed on the server")
    if job["status"] != "done":  # cancelled: by Ctrl-C here, or by someone on the server
        _cancelled()
    _seeds([image["seed"] for image in job["images"]], job["finished"] - (job["started"] or job["finished"]))
    return True


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
