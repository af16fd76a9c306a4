"""``lienzo grid``: an X/Y/Z plot. Every cell is one txt2img request through the same Studio as
``lienzo generate`` (saved with its infotext); then one labelled grid per z value."""

from datetime import date
from pathlib import Path

import click

from lienzo.cli.common import _ctrl_c, _generation_options, _request_fields, _settings, app, err_console
from lienzo.errors import GenerationCancelled, LienzoError

AXIS_HELP = "FIELD=VALUE,VALUE,... (any request field, by name, flag or label; ranges 1-5, 10-30 (+10), 0-1 [5]; or 'Prompt S/R=a,b')"


@app.command()
@click.argument("prompt")
@click.option("--x", "x_axis", required=True, help=f"the columns: {AXIS_HELP}")
@click.option("--y", "y_axis", help="the rows, as --x")
@click.option("--z", "z_axis", help="one grid per value, as --x")
@_generation_options("txt2img")
@click.pass_context
def grid(ctx, prompt, x_axis, y_axis, z_axis, **opts):
    """An X/Y/Z plot of PROMPT: one picture per combination of the axes' values, and a labelled grid per z value.

    Every picture keeps the options' other values (and the seed: one seed makes the plot comparable)."""
    from lienzo.cli.generate import _check_models, _make_output_folder, load_studio
    from lienzo.generation.limits import check_limits
    from lienzo.generation.xyz import parse_axis, plot_cells

    # 1. Every cell validated before anything loads; a seed of -1 is drawn once for the whole plot.
    settings = _settings(ctx)
    axes = [parse_axis(text, option) if text else None for text, option in ((x_axis, "--x"), (y_axis, "--y"), (z_axis, "--z"))]
    fields = {"safety": settings.safety_cli, **_request_fields(opts), "prompt": prompt}
    if fields.get("seed", -1) == -1:
        from lienzo.generation.noise import random_seed

        fields["seed"] = random_seed()
    cells = plot_cells(fields, *axes)
    for cell in cells:
        check_limits(cell.request, settings, count_batches=False)
    _check_models(opts, settings)
    out = opts.get("out") or settings.outputs_dir / "txt2img-grids" / date.today().isoformat()
    _make_output_folder(out, "--out")

    # 2. One model, every cell through the Studio (each picture saved), then the grids.
    studio, components = load_studio(opts, settings)
    pictures = {}
    try:
        with _ctrl_c("stopping after this picture's current step (Ctrl-C again to abort now)") as stop:
            for n, cell in enumerate(cells, 1):
                err_console.print(f"plot: picture {n}/{len(cells)}", highlight=False)
                result = studio.run(components, cell.request, out_dir=opts.get("out"), source="cli", cancel=stop.is_set)
                pictures[(cell.z, cell.y, cell.x)] = result.images[0]
    except GenerationCancelled:
        err_console.print("[yellow]cancelled: the pictures made so far were saved; no grid was drawn")
        raise SystemExit(130) from None
    finally:
        if studio.gallery is not None:
            studio.gallery.close()
    for path in _save_grids(pictures, axes, Path(out)):
        click.echo(str(path))


def _save_grids(pictures: dict, axes: list, out: Path) -> list[Path]:
    """One grid PNG per z value, labelled with the axes' values, carrying its first picture's infotext."""
    from lienzo.images.grid import labelled_grid
    from lienzo.images.io import save_png_numbered
    from lienzo.images.metadata import pnginfo

    x, y, z = axes
    count = lambda axis: len(axis.values) if axis is not None else 1  # noqa: E731
    label = lambda axis, i: axis.label(i) if axis is not None else ""  # noqa: E731
    saved = []
    for zi in range(count(z)):
        rows = [[pictures[(zi, yi, xi)].image for xi in range(count(x))] for yi in range(count(y))]
        image = labelled_grid(rows, [label(x, i) for i in range(count(x))], [label(y, i) for i in range(count(y))], label(z, zi))
        first = pictures[(zi, 0, 0)]
        try:
            saved.append(save_png_numbered(image, out, first.seed, pnginfo(first.infotext), prefix="grid-"))
        except OSError as err:
            raise LienzoError(f"--out: cannot save the grid into {out}: {err.strerror or err}") from None
    return saved
