"""``lienzo info`` and ``lienzo gallery``: the images lienzo made or imported."""

import sys
from pathlib import Path

import click
from rich.markup import escape

from lienzo.cli.common import _settings, app, err_console
from lienzo.errors import LienzoError
from lienzo.gallery.records import CREDENTIALS

@app.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.pass_context
def info(ctx, image):
    """Show the generation parameters stored in an image (lienzo, AUTOMATIC1111, Forge, ...), its
    lienzo provenance record, its Content Credentials (C2PA manifest, validated, with its ingredient
    chain) and whether it carries lienzo's invisible watermark."""
    from lienzo.images.credentials import SELF_MADE_NAME, SELF_MADE_NOTE, UNRECOGNISED, UNSIGNED, describe_state, read_credentials
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
    credentials = read_credentials(image)
    if text is None and provenance is None and credentials is None and not found.detected:
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
    if credentials is None:
        click.echo(f"Content Credentials: {describe_state(UNSIGNED)}")
    else:
        click.echo("Content Credentials:")
        for line in credentials.lines("  "):
            click.echo(line)
        if credentials.state == UNRECOGNISED and credentials.signer == SELF_MADE_NAME:
            click.echo(f"  Note: {SELF_MADE_NOTE}")
    click.echo(f"Watermark: {found.describe()}")
    if found.payload is not None and (credentials is None or credentials.watermark_id != found.payload.hex()):
        _originals(ctx, found.payload.hex())


def _originals(ctx, watermark_id: str) -> None:
    """A copy without its credentials (re-saved, resized, cropped): the gallery's images whose watermark carries
    the same id, with their credentials (the C2PA soft binding, looked up here)."""
    from lienzo.gallery.store import Gallery
    from lienzo.images.credentials import describe_state, read_credentials

    settings = _settings(ctx)
    if not settings.gallery_db.exists():
        return
    with Gallery.for_settings(settings) as gallery:
        originals = gallery.by_watermark(watermark_id)
    for item in originals:
        found = read_credentials(item.path) if item.path.exists() else None
        state = describe_state(found.state) if found is not None else "no credentials"
        click.echo(f"  Made by lienzo: gallery image {item.id}, {item.path} (Content Credentials: {state})")
    if not originals:
        click.echo("  Its id is in no image of this gallery (made elsewhere, or by another lienzo)")


@app.group("gallery")
def gallery_group():
    """The gallery of every image lienzo made or imported (shared with `lienzo serve`)."""


@gallery_group.command("list")
@click.argument("query", required=False, default="")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option(
    "--credentials", type=click.Choice(CREDENTIALS),
    help="only images with lienzo's own Content Credentials (signed, AI-generated), another tool's (or tampered ones), or none",
)
@click.pass_context
def gallery_list(ctx, query, limit, credentials):
    """Images newest first, or those whose prompt holds every word of QUERY: id, date, prompt, path."""
    from datetime import datetime

    from lienzo.gallery.store import Gallery

    with Gallery.for_settings(_settings(ctx)) as gallery:
        page = gallery.search(query, credentials=credentials, limit=limit)
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


@app.group("styles")
def styles_group():
    """Styles: saved prompt and negative prompt pairs (the studio's presets), used by --style NAME; A1111's styles.csv in and out."""


@styles_group.command("list")
@click.pass_context
def styles_list(ctx):
    """Every saved style: name, prompt, negative prompt (tab-separated)."""
    from lienzo.gallery.store import Gallery

    with Gallery.for_settings(_settings(ctx)) as gallery:
        for style in gallery.presets():
            click.echo(f"{style.name}\t{style.prompt}\t{style.negative_prompt}")


@styles_group.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.pass_context
def styles_import(ctx, file):
    """Save every style of an A1111 styles.csv (name, prompt, negative_prompt); a style of the same name is replaced."""
    from lienzo.gallery.store import Gallery
    from lienzo.generation.styles import read_styles_csv

    try:
        rows = read_styles_csv(file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise LienzoError(f"{file}: cannot read it as a UTF-8 CSV: {err}") from None
    # Every row is checked before any is saved: a bad row leaves the styles as they were.
    with Gallery.for_settings(_settings(ctx)) as gallery:
        gallery.put_presets(rows)
    click.echo(f"imported {len(rows)} styles from {file}")


@styles_group.command("export")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def styles_export(ctx, file):
    """Write every saved style to FILE as an A1111 styles.csv."""
    from lienzo.files import write_atomic
    from lienzo.gallery.store import Gallery
    from lienzo.generation.styles import write_styles_csv

    with Gallery.for_settings(_settings(ctx)) as gallery:
        text = write_styles_csv(gallery.presets())
    try:
        write_atomic(file, lambda out: out.write(text.encode("utf-8")))
    except OSError as err:
        raise LienzoError(f"{file}: cannot write it: {err.strerror or err}") from None
    click.echo(str(file))
