"""``lienzo serve``: the HTTP server. Once it listens it describes itself in ``<data dir>/server.json``, with a
token that lets ``lienzo generate`` in as the admin, so that the CLI can send it jobs (lienzo.cli.remote)."""

import secrets

import click

from lienzo.cli.common import _settings, _speed_kwargs, _speed_options, app, err_console
from lienzo.server.logs import FORMATS, setup_logging

@app.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--listen", is_flag=True, help="listen on all interfaces (0.0.0.0); needs --auth, --api-key or named keys (lienzo keys add)")
@click.option("--auth", envvar="LIENZO_AUTH", metavar="USER:PASS", help="the admin's HTTP Basic credentials [env LIENZO_AUTH]")
@click.option("--api-key", envvar="LIENZO_API_KEY", metavar="KEY", help="the admin's key: 'Authorization: Bearer KEY' [env LIENZO_API_KEY]")
@click.option("--insecure", is_flag=True, help="allow listening beyond this machine without authentication")
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
    help="also answer to this Host name (besides localhost, IP addresses and this machine's name); repeatable; "
    ".example.com: a domain and its subdomains; '*': any [env LIENZO_ALLOWED_HOSTS, comma-separated]",
)
@click.option(
    "--public-url", metavar="URL",
    help="the address clients reach this server at, for links in answers, e.g. https://studio.example behind a proxy "
    "[env LIENZO_PUBLIC_URL; default: the address a request arrived at]",
)
@click.option("-m", "--model", help="model for requests that name none (default: lienzo's own, else the models dir's first)")
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
@click.option("--dtype", help="auto, float32, float16 or bfloat16 [default: auto]")
@click.option(
    "--devices", metavar="LIST",
    help="one worker per device, e.g. cuda:0,cuda:1; cpu,cpu: two CPU processes, each with its share of the cores "
    "[default: every GPU, else --device]",
)
@click.option(
    "--cluster", metavar="ADDRESS",
    help="run the workers as Ray actors on a Ray cluster: ray://HEAD:10001 (Ray Client), HEAD:6379, or auto inside a Ray job; "
    "the queue, gallery and keys stay here (pip install 'lienzo[cluster]')",
)
@click.option("--workers", type=click.IntRange(1), help="with --cluster and no GPUs in it: how many CPU workers [default: one per node]")
@_speed_options
@click.option(
    "--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
    help="server logs on stderr: text, or one JSON object per line for log collectors; both name each line's job and worker",
)
@click.pass_context
def serve(
    ctx, host, port, listen, auth, api_key, insecure, allowed_hosts, public_url, model, device, dtype, devices, cluster, workers,
    log_format, **speed,
):
    """HTTP server: lienzo's API (/api/v1), AUTOMATIC1111's (/sdapi/v1) and OpenAI's (/v1/images); docs at /docs.

    With --auth or --api-key (the admin) or named keys (`lienzo keys add NAME`), every request must carry one."""
    import ipaddress

    import uvicorn

    from lienzo.cli.remote import load_options
    from lienzo.server.app import Auth, create_app
    from lienzo.server.keys import KeyStore
    from lienzo.settings import parse_allowed_hosts, parse_public_url

    if devices and (device or cluster):
        raise click.UsageError("--devices names this machine's workers: give it without --device and --cluster")
    if workers and not cluster:
        raise click.BadParameter("counts a cluster's CPU workers: give it with --cluster", param_hint="--workers")
    if devices:
        from lienzo.server.workers import parse_devices

        try:
            devices = parse_devices(devices)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--devices") from None
    settings = _settings(ctx)
    if device:
        settings.device = device
    if dtype:
        settings.dtype = dtype
    for name, value in _speed_kwargs(speed).items():
        if value is not None:
            setattr(settings, name, value)
    try:
        settings.allowed_hosts = [*settings.allowed_hosts, *parse_allowed_hosts(list(allowed_hosts))]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--allowed-host") from None
    if public_url is not None:
        try:
            settings.public_url = parse_public_url(public_url)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--public-url") from None
    host = "0.0.0.0" if listen else host
    user, sep, password = (auth or "").partition(":")
    if auth is not None and (not sep or not user):
        raise click.BadParameter("give USER:PASS", param_hint="--auth")
    # lienzo generate's key to this process, kept only here and in server.json (readable by this user alone).
    token = secrets.token_urlsafe(32)
    credentials = Auth(user=user or None, password=password or None, api_key=api_key or None, local_token=token)
    keys = KeyStore(settings.keys_db) if settings.keys_db.exists() else None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
        settings.allowed_hosts.append(host.lower())  # the name it listens on is its own
    if not loopback and not credentials.enabled and not (keys is not None and keys.has_keys()) and not insecure:
        raise click.UsageError(
            f"refusing to listen on {host} without authentication: give --auth USER:PASS or --api-key KEY, or add a "
            "named key with `lienzo keys add NAME` (or --insecure to accept that anyone on the network can use this server)"
        )
    if model is not None:
        from lienzo.models.registry import Registry

        Registry(settings.models_dir, settings.cache_dir).resolve(model)  # an unknown name fails before the server starts
    # Every logger, uvicorn's included (log_config=None below leaves them to the root logger), with job ids.
    setup_logging(log_format)
    if keys is None:  # made now, not left to create_app (which opens only one that exists): a key added while it runs counts at once
        keys = KeyStore(settings.keys_db)
    pool = None
    if cluster:
        from lienzo.server.cluster import RayPool

        pool = RayPool(settings, address=cluster, workers=workers)
        err_console.print(f"lienzo: {len(pool.workers)} workers on the Ray cluster at {cluster}: {', '.join(w.name for w in pool.workers)}")
    app = create_app(settings, model=model, auth=credentials, keys=keys, devices=devices or None, pool=pool)
    load = {**load_options(settings, {}), "devices": devices or None, "cluster": cluster}
    # A client waiting on a long job must not hold Ctrl-C up: after 5 s its connection is closed and the
    # lifespan's shutdown stops the running jobs after their step; they and the waiting ones run after the next start.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, log_config=None)
    _run_server(config, settings, token, model=model or settings.default_model, load=load)


def _run_server(config, settings, token: str, *, model: str | None, load: dict) -> None:
    """Run uvicorn's server, which says where it listens and describes itself in server.json from the moment it
    does until it stops: in its shutdown, not after ``run()``, which raises a SIGTERM it caught again on its way out."""
    import uvicorn

    from lienzo.cli.remote import advertise, withdraw

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            url = f"http://{_local_address(self.servers)}"
            advertise(settings, url, token, model=model, load=load)
            err_console.print(f"lienzo serving on {url} (docs at /docs)")

        async def shutdown(self, sockets=None) -> None:
            withdraw(settings)  # first: a CLI started now loads the model itself rather than meet a closing queue
            await super().shutdown(sockets=sockets)

    Server(config).run()


def _local_address(servers) -> str:
    """HOST:PORT to reach the listening sockets from this machine: the port bound (``--port 0`` picks one), on
    the address listened on, or the loopback one for all addresses (--listen)."""
    sockets = [sock for server in servers for sock in server.sockets]
    sock = next((s for s in sockets if len(s.getsockname()) == 2), sockets[0])  # IPv4 first
    address, port = sock.getsockname()[:2]
    if len(sock.getsockname()) == 2:
        return f"{'127.0.0.1' if address == '0.0.0.0' else address}:{port}"
    return f"[{'::1' if address == '::' else address}]:{port}"
