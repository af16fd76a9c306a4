"""``lienzo upscale``: A1111's extras upscale from the command line. Each image is enlarged by the named
upscaler (a built-in or a model file in the models dir) and saved as a new numbered PNG with its text kept
and the step added (lienzo.upscale.postprocess)."""

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lienzo.cli.common import _ctrl_c, _settings, app, err_console
from lienzo.errors import GenerationCancelled, LienzoError


@app.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--upscaler", "-u", default="Lanczos", show_default=True, help="a name --list shows (any case)")
@click.option("--scale", "-s", type=click.FloatRange(1, 8), default=2, show_default=True, help="how much larger, 1 to 8")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="output folder [default: outputs dir's extras-images]")
@click.option("--tile", type=click.IntRange(min=32), default=192, show_default=True, help="a model's window, in input pixels (less: less memory)")
@click.option("--device", default=None, help="auto, cpu, cuda or mps [default: auto]")
@click.option("--list", "list_", is_flag=True, help="list the upscalers and exit")
@click.pass_context
def upscale(ctx, images, upscaler, scale, out, tile, device, list_):
    """Enlarge IMAGES by --scale with --upscaler; prints the saved PNGs' paths.

    Model upscalers (ESRGAN, RealESRGAN, SwinIR, DAT, HAT, ... as .pth or .safetensors) are read from the models
    dir's ESRGAN, RealESRGAN, SwinIR, DAT, HAT, ScuNET or upscale_models folder."""
    from lienzo.upscale.upscalers import find_upscaler, list_upscalers

    settings = _settings(ctx)
    if list_:
        _print_list(list_upscalers(settings.models_dir))
        return
    if not images:
        raise click.UsageError("give one or more IMAGES (or --list)")
    chosen = find_upscaler(upscaler, settings.models_dir, field="--upscaler")
    inputs = [_read(path, settings.max_input_pixels) for path in images]  # every image checked before any work
    out = out or settings.outputs_dir / "extras-images"
    from lienzo.cli.generate import _make_output_folder

    _make_output_folder(out, "--out")
    from lienzo.devices import pick_device

    where = str(pick_device(device or settings.device))
    try:
        with _ctrl_c("stopping after the current tile (Ctrl-C again to abort now)") as stop:
            for path, (image, text) in zip(images, inputs):
                err_console.print(f"upscale: {path} ({image.width}x{image.height}) x{scale:g} with {chosen.name}", highlight=False)
                click.echo(str(_upscale_one(image, text, chosen, scale, out, where, tile, stop.is_set)))
    except GenerationCancelled:
        err_console.print("[yellow]cancelled: the images finished so far were saved")
        raise SystemExit(130) from None


def _read(path: Path, max_pixels: int):
    """The image (RGB, upright) and the text that travels with it."""
    from PIL import Image

    from lienzo.images.io import load_image
    from lienzo.upscale.postprocess import source_text

    image = load_image(path, field="IMAGES", max_pixels=max_pixels)
    with Image.open(path) as raw:
        return image, source_text(raw)


def _upscale_one(image, text: dict[str, str], upscaler, scale: float, out: Path, device: str, tile: int, cancel) -> Path:
    from lienzo.images.io import save_png_numbered
    from lienzo.images.metadata import PARAMETERS_KEY, parse_infotext
    from lienzo.upscale.postprocess import Resize, infotext, output_text, png_info, run_upscale

    result, info = run_upscale(image, Resize(scale=scale, field="--scale"), upscaler, device=device, tile=tile, cancel=cancel)
    seed = parse_infotext(text.get(PARAMETERS_KEY, "")).params.get("Seed", "0")  # named after its seed, as generated images are
    try:
        return save_png_numbered(result, out, int(seed) if seed.isdigit() else 0, png_info(output_text(text, infotext(info))))
    except OSError as err:
        raise LienzoError(f"--out: cannot save into {out}: {err.strerror or err}") from None


def _print_list(upscalers) -> None:
    table = Table(title="upscalers (--upscaler NAME)")
    for column in ("name", "scale", "file"):
        table.add_column(column)
    for u in upscalers:
        table.add_row(u.name, f"{u.scale}x" if u.scale else "", str(u.path or "built in"))
    Console().print(table)
