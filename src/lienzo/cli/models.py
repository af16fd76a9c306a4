"""``lienzo models`` and ``lienzo samplers``: what can be generated with."""

import click
from rich.console import Console
from rich.table import Table

from lienzo.cli.common import _settings, app

@app.command()
@click.option("--details", is_flag=True, help="also the full sha256 and what each model states about its training data")
@click.pass_context
def models(ctx, details):
    """List lienzo's own model and the models dir's: family or kind, weight format, size and A1111 short hash.
    SD 3.x and Flux.1 transformer files (ComfyUI's diffusion_models) load with the text encoders and VAE listed here."""
    from lienzo.images.provenance import describe_training_data
    from lienzo.models.registry import Registry, embedded_model
    from lienzo.origins import training_data_for

    settings = _settings(ctx)
    registry = Registry(settings.models_dir, settings.cache_dir)
    table = Table(title=f"models in {settings.models_dir}")
    for column in ("name", "family / kind", "weights", "size", "hash"):
        table.add_column(column)
    embedded = embedded_model()
    entries = ([registry.entry(embedded)] if embedded else []) + registry.scan()
    for entry in entries:
        table.add_row(entry.name, entry.architecture, entry.quantization or "?", _size(entry.size_bytes), entry.short_hash)
    Console().print(table)
    if details:
        for entry in entries:
            click.echo(f"{entry.name}\n  sha256: {entry.sha256}\n  training data: {describe_training_data(training_data_for(entry.path))}")
    _files_table("LoRAs (use as <lora:NAME:WEIGHT> or --lora NAME:WEIGHT)", registry.loras())
    _files_table("textual-inversion embeddings (write the NAME in a prompt: SD 1.x/2.x and SDXL, of their width)", registry.embeddings())


def _files_table(title: str, entries) -> None:
    """Name, size and short hash of each file (LoRAs, embeddings), under ``title``; nothing when there are none."""
    if not entries:
        return
    table = Table(title=title)
    for column in ("name", "size", "hash"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.name, _size(entry.size_bytes), entry.short_hash)
    Console().print(table)


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:,.2f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:,.1f} MiB"


@app.command()
def samplers():
    """List the samplers, the schedule types each runs as asked, and every schedule type's names."""
    from lienzo.generation.samplers import SAMPLERS, SCHEDULES, flow_samplers, runs_as
    from lienzo.models.families import FAMILIES

    flow = set(flow_samplers())
    config = FAMILIES["sd3"].scheduler  # a flow model's schedule: which schedule types its samplers run
    table = Table(title="samplers (any other schedule runs as the nearest its scheduler can)")
    for column in ("sampler", "schedules", "automatic =", "on SD 3.x / Flux.1 (flow models)", "method"):
        table.add_column(column)
    for s in SAMPLERS.values():
        on_flow = ", ".join(s.schedules_on(config)) if s.name in flow else "no"
        table.add_row(s.name, ", ".join(s.schedules), s.automatic, on_flow, s.paper)
    Console().print(table)
    table = Table(title="schedule types (--schedule takes the label or the A1111 id, in any case)")
    for column in ("label", "A1111 id", "aliases", "runs as Uniform, the nearest, on"):
        table.add_column(column)
    for schedule in list(SCHEDULES.values())[1:]:
        nearest = [s.name for s in SAMPLERS.values() if runs_as(s, schedule.label) != schedule.label]
        table.add_row(schedule.label, schedule.name, ", ".join(schedule.aliases), ", ".join(nearest))
    Console().print(table)
