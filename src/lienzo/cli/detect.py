"""``lienzo detect``: one ControlNet preprocessor on one picture, the control map saved as a PNG.

The module, its slider values, the mask and the annotator file are checked before the picture is read;
torch is imported only by the neural modules, when they run."""

import secrets
from contextlib import contextmanager
from pathlib import Path

import click

from lienzo.cli.common import _settings, app, err_console
from lienzo.errors import InvalidRequestError, LienzoError

# The preprocessor's field names (the extension's unit fields) as this command's flags.
_FLAGS = {
    "processor_res": "--resolution", "threshold_a": "--threshold-a", "threshold_b": "--threshold-b", "mask": "--mask", "seed": "--seed",
}


@app.command()
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--module", "-M", help="the preprocessor: its sd-webui-controlnet name or alias, in any case (--list shows them)")
@click.option("--resolution", type=int, help="short side the picture is scaled to first [default: the module's, 512]")
@click.option("--threshold-a", type=float, help="the module's first slider [default: the module's]")
@click.option("--threshold-b", type=float, help="the module's second slider [default: the module's]")
@click.option("--mask", type=click.Path(path_type=Path), help="inpaint modules: the mask (white: repaint, black: keep)")
@click.option("--seed", type=int, help="shuffle: the seed of its random flow [default: a random one]")
@click.option("--device", default="auto", show_default=True, help="where neural modules run: auto, cpu, cuda or mps")
@click.option(
    "--out", "-o", type=click.Path(path_type=Path),
    help="the PNG to write, or a folder for it [default: the outputs dir's detect folder, as IMAGE-MODULE.png, "
    "numbered -2, -3, ... rather than overwrite]",
)
@click.option("--list", "list_modules", is_flag=True, help="list the modules, their sliders and what they need, and exit")
@click.pass_context
def detect(ctx, image, module, resolution, threshold_a, threshold_b, mask, seed, device, out, list_modules):
    """Make the ControlNet control map of IMAGE with a preprocessor.

    The map is saved as a PNG and its path printed. Neural modules (softedge_hed, lineart_realistic, lineart_coarse) read their file from lllyasviel/Annotators,
    placed in the models dir's annotators folder; lienzo never downloads it."""
    from lienzo.control.preprocessors import find_preprocessor

    settings = _settings(ctx)
    if list_modules:
        _print_modules(settings.models_dir)
        return
    if image is None or module is None:
        raise click.UsageError("give IMAGE and --module (or --list to see the modules)")
    with _as_flags():
        preprocessor = find_preprocessor(module, field="--module")
        preprocessor.slider_values(resolution, threshold_a, threshold_b)
        if preprocessor.takes_mask and mask is None:
            raise InvalidRequestError("--mask", f"{preprocessor.alias} needs a mask (white: repaint, black: keep)")
        if mask is not None and not preprocessor.takes_mask:
            raise InvalidRequestError("--mask", f"{preprocessor.alias} takes no mask")
        preprocessor.annotator_path(settings.models_dir)
    drawn = preprocessor.seeded and seed is None  # drawn here, to be told: the map can be made again
    seed = secrets.randbelow(2**32) if drawn else seed
    path = _out_path(out, settings.outputs_dir / "detect", image, preprocessor.name)
    _write(_run(preprocessor.name, image, mask, resolution, threshold_a, threshold_b, seed, device, settings), path)
    click.echo(str(path))
    if drawn:
        err_console.print(f"seed: {seed}", highlight=False)


def _run(module, image_path, mask_path, resolution, threshold_a, threshold_b, seed, device, settings):
    from lienzo.control.preprocessors import preprocess
    from lienzo.images.io import load_image, load_mask

    picture = load_image(image_path, field="IMAGE", max_pixels=settings.max_input_pixels)
    mask = load_mask(mask_path, picture.size, field="--mask", max_pixels=settings.max_input_pixels) if mask_path else None
    with _as_flags():
        return preprocess(
            module, picture, resolution, threshold_a, threshold_b,
            mask=mask, seed=seed, models_dir=settings.models_dir, device=device, field="--module",
        )


@contextmanager
def _as_flags():
    """Errors about a preprocessor field name the flag that sets it."""
    try:
        yield
    except InvalidRequestError as err:
        flag = _FLAGS.get(err.field)
        if flag is None:
            raise
        raise InvalidRequestError(flag, str(err).removeprefix(f"{err.field}: ")) from None


def _out_path(out: Path | None, default_folder: Path, image: Path, module: str) -> Path:
    """``out`` as given (a folder: the default name inside it), or the first free ``IMAGE-MODULE[-N].png``
    in the default folder: a map made before is never overwritten unless asked for by name."""
    if out is not None and not out.is_dir():
        return out
    folder = out if out is not None else default_folder
    stem = f"{image.stem}-{module}"
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def _write(picture, path: Path) -> None:
    from lienzo.images.io import save_png_atomic

    try:
        save_png_atomic(picture, path)
    except OSError as err:
        raise LienzoError(f"--out: cannot write {path}: {err.strerror or err}") from None


def _print_modules(models_dir: Path) -> None:
    """One row per module: name, alias, the sliders with the flag that sets each, what else it needs."""
    from rich.console import Console
    from rich.table import Table

    from lienzo.control.preprocessors import ANNOTATORS_FOLDER, PREPROCESSORS

    table = Table(title=f"ControlNet preprocessors (annotator files go in {models_dir / ANNOTATORS_FOLDER})")
    table.add_column("module", no_wrap=True)
    for column in ("alias", "sliders: default (range)", "needs"):
        table.add_column(column)
    for p in PREPROCESSORS.values():
        flags = ["--resolution"] if p.has_resolution else []
        flags += ["--threshold-a", "--threshold-b"]
        sliders = "\n".join(
            f"{flag} {s.value:g} ({s.min:g}-{s.max:g})" + ("" if s.name == "Resolution" else f": {s.name}") for flag, s in zip(flags, p.sliders)
        )
        if p.annotator:
            needs = p.annotator + ("" if (models_dir / ANNOTATORS_FOLDER / p.annotator).is_file() else " (missing)")
        else:
            needs = "--mask" if p.takes_mask else ""
        table.add_row(p.name, p.alias if p.alias != p.name else "", sliders, needs)
    Console().print(table)
