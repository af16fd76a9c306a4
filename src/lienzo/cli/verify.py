"""``lienzo verify``: the Content Credentials (C2PA manifests) of many images, one line each."""

import json
from pathlib import Path

import click

from lienzo.cli.common import app

# States that make ``lienzo verify`` fail: the file changed after it was signed, or its manifest is broken.
# An unrecognised signer (lienzo's own certificate) or no manifest at all is information, not failure.
_FAILING = {"tampered", "invalid"}


@app.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per file (state, signer, generator, actions, ingredients)")
def verify(files, as_json):
    """Check the Content Credentials of FILES: valid, unrecognised signer, tampered, invalid or unsigned.

    Exits 1 when any file is tampered, invalid or unreadable. lienzo signs with a certificate it made on this
    machine unless LIENZO_C2PA_CERT/LIENZO_C2PA_KEY name your own: verifiers, this one included, report
    that signer as unrecognised (the manifest is intact, its signer vouched for by nobody).
    """
    from lienzo.images.credentials import SELF_MADE_NAME, SELF_MADE_NOTE, UNSIGNED, read_credentials

    failed = self_made = False
    for path in files:
        try:
            found = read_credentials(path)
        except OSError as err:
            # One unreadable file among many is reported, and fails the run, without hiding the rest.
            failed = True
            click.echo(f"{path}: cannot read: {err.strerror or err}", err=True)
            continue
        state = found.state if found else UNSIGNED
        failed |= state in _FAILING
        self_made |= found is not None and found.signer == SELF_MADE_NAME
        if as_json:
            click.echo(json.dumps({"file": str(path), **(found.to_dict() if found else {"state": UNSIGNED})}, ensure_ascii=False))
        elif found is None:
            click.echo(f"{path}: {UNSIGNED}")
        else:
            click.echo(f"{path}: {state}; signer {found.signer or 'unknown'}; generator {found.generator or 'not stated'}")
    if self_made and not as_json:
        click.echo(f"Note: {SELF_MADE_NAME}: {SELF_MADE_NOTE}", err=True)
    if failed:
        raise SystemExit(1)
