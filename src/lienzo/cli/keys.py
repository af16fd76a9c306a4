"""``lienzo keys``: the named API keys ``lienzo serve`` lets in, each with its own jobs, gallery and limits.
They live in the data dir's keys.db; a running server sees a change from its next request on."""

from datetime import datetime

import click

from lienzo.cli.common import _settings, app


def _store(ctx: click.Context):
    # Imported here, like every command's heavy lifting: `lienzo --help` reads no database.
    from lienzo.server.keys import KeyStore

    return KeyStore(_settings(ctx).keys_db)


@app.group("keys")
def keys_group():
    """Named API keys for `lienzo serve`: once one exists, every request must carry a key (or the
    --auth / --api-key admin credentials); each key sees its own images and may have its own limits."""


@keys_group.command("add")
@click.argument("name")
@click.option("--max-queued", type=int, metavar="N", help="jobs this key may have waiting [default: only the server's max_queue]")
@click.option("--max-pixels", type=int, metavar="N", help="width x height of one image [default: only the server's max_pixels]")
@click.pass_context
def keys_add(ctx, name, max_queued, max_pixels):
    """Make a key called NAME (letters, digits, _ . -) and print its secret, which is shown only this once."""
    with _store(ctx) as store:
        secret = store.add(name, max_queued=max_queued, max_pixels=max_pixels)
    click.echo(secret)
    click.echo(
        f"This is {name}'s key; it is not stored and cannot be shown again. Clients send it as the header\n"
        f"  Authorization: Bearer {secret}",
        err=True,
    )


@keys_group.command("list")
@click.pass_context
def keys_list(ctx):
    """Every key: name, when it was made, its limits (tab-separated; '-': none of its own)."""
    with _store(ctx) as store:
        keys = store.list()
    for key in keys:
        made = datetime.fromtimestamp(key.created).strftime("%Y-%m-%d %H:%M")
        limits = [f"{label}={'-' if value is None else value}" for label, value in (("max_queued", key.max_queued), ("max_pixels", key.max_pixels))]
        click.echo("\t".join([key.name, made, *limits]))


@keys_group.command("limits")
@click.argument("name")
@click.option("--max-queued", type=int, metavar="N", help="jobs this key may have waiting [default: no limit of its own]")
@click.option("--max-pixels", type=int, metavar="N", help="width x height of one image [default: no limit of its own]")
@click.pass_context
def keys_limits(ctx, name, max_queued, max_pixels):
    """Set both of NAME's limits; a limit not given is lifted (the server's own still apply)."""
    with _store(ctx) as store:
        store.set_limits(name, max_queued=max_queued, max_pixels=max_pixels)


@keys_group.command("remove")
@click.argument("name")
@click.pass_context
def keys_remove(ctx, name):
    """Remove the key called NAME: its secret no longer lets anyone in (its images stay in the gallery)."""
    with _store(ctx) as store:
        store.remove(name)
