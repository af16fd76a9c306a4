"""``lienzo serve``: the HTTP server."""

import click

from lienzo.cli.common import _settings, _speed_kwargs, _speed_options, app, err_console

@app.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--listen", is_flag=True, help="listen on all interfaces (0.0.0.0); needs --auth or --api-key")
@click.option("--auth", envvar="LIENZO_AUTH", metavar="USER:PASS", help="require HTTP Basic credentials [env LIENZO_AUTH]")
@click.option("--api-key", envvar="LIENZO_API_KEY", metavar="KEY", help="require 'Authorization: Bearer KEY' [env LIENZO_API_KEY]")
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
@_speed_options
@click.pass_context
def serve(ctx, host, port, listen, auth, api_key, insecure, allowed_hosts, public_url, model, device, dtype, **speed):
    """HTTP server: lienzo's API (/api/v1), AUTOMATIC1111's (/sdapi/v1) and OpenAI's (/v1/images); docs at /docs."""
    import ipaddress

    import uvicorn

    from lienzo.server.app import Auth, create_app
    from lienzo.settings import parse_allowed_hosts, parse_public_url

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
    credentials = Auth(user=user or None, password=password or None, api_key=api_key or None)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
        settings.allowed_hosts.append(host.lower())  # the name it listens on is its own
    if not loopback and not credentials.enabled and not insecure:
        raise click.UsageError(
            f"refusing to listen on {host} without authentication: give --auth USER:PASS or --api-key KEY "
            "(or --insecure to accept that anyone on the network can use this server)"
        )
    if model is not None:
        from lienzo.models.registry import Registry

        Registry(settings.models_dir, settings.cache_dir).resolve(model)  # an unknown name fails before the server starts
    err_console.print(f"lienzo serving on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port} (docs at /docs)")
    # A client waiting on a long job must not hold Ctrl-C up: after 5 s its connection is closed and
    # the lifespan's shutdown cancels what is queued or running.
    uvicorn.run(create_app(settings, model=model, auth=credentials), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
