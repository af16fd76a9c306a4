"""``lienzo dataset``: check a training folder, or prepare OpenMoji as one."""

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lienzo.cli.common import app, err_console

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
    from lienzo.training.data import scan_folder
    from lienzo.training.manifest import MANIFEST_NAME, write_manifest

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
