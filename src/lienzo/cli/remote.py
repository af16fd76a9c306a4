"""``lienzo generate`` through a running ``lienzo serve``: the server describes itself in ``<data dir>/server.json``,
and the CLI hands it the job instead of loading the model again (README "Repeated runs").

Why automatically, with a note, rather than behind a flag: the server holds the model already, and the job is the
same GenerationRequest through the same engine with its seed drawn at submit, so it makes the same picture, saved
to the same gallery and outputs folder; only the 5 s of imports and the model's load are saved. It is used only
when that holds: the file is this user's own and private, its process is alive and runs this version, the folders
and the load options (device, dtype, speed switches) are the CLI's, and the server answers at once. The note says
where the job went and that ``--local`` runs it here.

Standard library only (http.client, json): this path runs before, and instead of, importing torch. http.client
rather than urllib, which would send a loopback request through an ``HTTP_PROXY`` from the environment.
"""

import base64
import http.client
import io
import json
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

from lienzo import __version__
from lienzo.cli.common import err_console
from lienzo.errors import LienzoError
from lienzo.settings import Settings

SERVER_FILE = "server.json"
# What a model loads with, as Settings names them: the CLI uses a server only where all of them agree.
LOAD_KEYS = (
    "device", "dtype", "vae_dtype", "threads", "channels_last", "compile", "int8", "fp8", "vae_tiling", "low_vram",
    "attention_slicing", "free_text_encoders",
)
# Model options a request cannot carry: given, the job runs here.
_UNSENDABLE = {"vae": "--vae", "text_encoders": "--text-encoder", "text_encoder_device": "--text-encoder-device", "prediction": "--prediction"}
_IMAGE_FIELDS = frozenset({"init_image", "mask", "reference_images", "controlnets"})
_ANSWER_S = 0.5  # a server that takes longer to answer a GET of its queue is busy elsewhere: run here
_CALL_S = 30  # submit (bodies with images) and cancel
# The job's event stream sends the job at least every 15 s (routes/native.py); silence this long is a dead server.
_STREAM_S = 60


# -- the server's side: describe it -------------------------------------------------------------


def server_file(settings: Settings) -> Path:
    return settings.data_dir / SERVER_FILE


def load_options(settings: Settings, given: dict) -> dict:
    """The LOAD_KEYS values a model loads with: ``given``'s where not None, else the settings'."""
    return {key: given[key] if given.get(key) is not None else getattr(settings, key) for key in LOAD_KEYS}


def advertise(settings: Settings, url: str, token: str, *, model: str | None, load: dict) -> Path:
    """Write server.json for this process: readable by this user only (it holds the admin's token), and
    whole or not at all (a temporary file renamed over it), so that a CLI never reads half of one."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    described = {
        "url": url, "pid": os.getpid(), "version": __version__, "token": token, "models_dir": str(settings.models_dir),
        "outputs_dir": str(settings.outputs_dir), "model": model, "load": load,
    }
    fd, temporary = tempfile.mkstemp(dir=settings.data_dir, prefix=".server-", suffix=".json")  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(described, file, indent=2)
        os.replace(temporary, server_file(settings))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return server_file(settings)


def withdraw(settings: Settings) -> None:
    """Remove server.json if it still describes this process (a server started since holds it now)."""
    path = server_file(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):  # gone, or not ours to judge
        pass


# -- the CLI's side: choose it, send the job, follow it -------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running ``lienzo serve`` that can take this CLI's job; ``model``: the model to name in it (None: the server's)."""

    url: str
    pid: int
    token: str
    model: str | None
    explicit: bool  # asked for with --server: fail rather than run here


class _NotUsable(Exception):
    """Why the server cannot take the job (said only when the user asked for the server)."""


def find_server(settings: Settings, mode: str, opts: dict) -> Server | None:
    """The server to send this job to, or None to run it here. ``--server URL`` (LIENZO_SERVER) insists: a
    server that cannot take it is a LienzoError saying why; otherwise that is silent. ``--local`` (LIENZO_LOCAL)
    wins over both: it is what the note offers."""
    wanted = opts.get("server")
    if opts.get("local"):
        return None
    try:
        return _usable(settings, mode, opts, wanted)
    except _NotUsable as why:
        if wanted:
            raise LienzoError(f"--server: {why}; --local runs it here") from None
        return None


def _usable(settings: Settings, mode: str, opts: dict, wanted: str | None) -> Server:
    described = _read_description(server_file(settings))
    url, pid, token = described.get("url"), described.get("pid"), described.get("token")
    if not isinstance(url, str) or not isinstance(pid, int) or not isinstance(token, str):
        raise _NotUsable(f"{server_file(settings)} lacks the server's url, pid or token")
    if wanted and url.rstrip("/") != wanted.rstrip("/"):
        raise _NotUsable(f"{wanted} is not the lienzo serve described in {server_file(settings)} (that is {url}); "
                         "only a server started with this data dir saves into this CLI's folders")
    if not _alive(pid):
        raise _NotUsable(f"the lienzo serve of {server_file(settings)} (pid {pid}) is not running")
    if described.get("version") != __version__:
        raise _NotUsable(f"the server runs lienzo {described.get('version')}, this is {__version__}")
    _check_folders(described, settings, mode, opts)
    _check_load(described.get("load") or {}, settings, opts)
    server = Server(url=url, pid=pid, token=token, model=_model_for(opts, settings), explicit=bool(wanted))
    try:
        status, answer = call(server, "GET", "/api/v1/queue", timeout=_ANSWER_S)
    except LienzoError as err:
        raise _NotUsable(str(err)) from None
    if status != 200 or not isinstance(answer, dict):
        raise _NotUsable(f"{url} answered {status}: {_detail(answer)}")
    if answer.get("paused"):  # the job would wait until someone resumes it
        raise _NotUsable(f"the queue of {url} is paused")
    return server


def _read_description(path: Path) -> dict:
    """server.json, if this user owns it and nobody else can read it: it names the process the CLI trusts with
    its job and carries the admin's token. Opened without following a link, and judged by what was opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _NotUsable(f"no lienzo serve describes itself in {path}") from None
    except OSError as err:
        raise _NotUsable(f"cannot read {path}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if hasattr(os, "getuid"):  # POSIX; Windows keeps the data dir in the user's own profile
            if info.st_uid != os.getuid():
                raise _NotUsable(f"{path} belongs to another user")
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise _NotUsable(f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}, not 0600)")
        if not stat.S_ISREG(info.st_mode):
            raise _NotUsable(f"{path} is not a file")
        try:
            described = json.loads(file.read(1 << 16))
        except ValueError:
            raise _NotUsable(f"{path} is not JSON") from None
    if not isinstance(described, dict):
        raise _NotUsable(f"{path} is not a server's description")
    return described


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists. On Windows signal 0 is CTRL_C_EVENT, not a probe: there the GET decides."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not the server this user started
        return False
    return True


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_folders(described: dict, settings: Settings, mode: str, opts: dict) -> None:
    """The server reads the CLI's models and saves where the CLI would: models and outputs dirs the same, and
    ``--out``, if given, the folder the server saves this mode's images into (it saves nowhere else)."""
    for key, flag in (("models_dir", "--models-dir"), ("outputs_dir", "--outputs-dir")):
        theirs = described.get(key)
        if not isinstance(theirs, str) or not _same_folder(theirs, getattr(settings, key)):
            raise _NotUsable(f"its {key.replace('_', ' ')} is {theirs}, this command's {flag} is {getattr(settings, key)}")
    out = opts.get("out")
    # lienzo.outputs.output_dir's folder, written out here: importing that module imports torch.
    folder = settings.outputs_dir / f"{mode}-images" / date.today().isoformat()
    if out is not None and not _same_folder(out, folder):
        raise _NotUsable(f"it saves into {folder}, not --out {out}")


def _check_load(loaded: dict, settings: Settings, opts: dict) -> None:
    """The model options: the ones a request cannot carry absent, the rest as the server loaded its models."""
    for key, flag in _UNSENDABLE.items():
        if opts.get(key):
            raise _NotUsable(f"{flag} is not something a job can ask a server for")
    if opts.get("t5") is False:
        raise _NotUsable("--no-t5 is not something a job can ask a server for")
    if loaded.get("devices") or loaded.get("cluster"):
        raise _NotUsable("it runs several workers (--devices or --cluster), so its device is not this command's")
    given = {
        "device": opts.get("device"), "dtype": opts.get("dtype"), "vae_dtype": opts.get("vae_dtype"), "threads": opts.get("threads"),
        "channels_last": opts.get("channels_last"), "compile": opts.get("compile_"), "int8": opts.get("int8"), "fp8": opts.get("fp8"),
        "vae_tiling": opts.get("vae_tiling"), "low_vram": opts.get("low_vram"), "attention_slicing": opts.get("attention_slicing"),
        "free_text_encoders": opts.get("free_text_encoders"),
    }
    mine = load_options(settings, given)
    for key in LOAD_KEYS:
        if loaded.get(key) != mine[key]:
            raise _NotUsable(f"it loaded its models with {key}={loaded.get(key)!r}, this command asks for {mine[key]!r} (--{key.replace('_', '-')})")


def _model_for(opts: dict, settings: Settings) -> str | None:
    """The model to name in the job: ``--model`` (or the settings' default_model), a path only inside the models
    dir, where the server loads models from; None leaves it to the server (its current model)."""
    model = opts.get("model") or settings.default_model
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        return model  # a name, which the server's registry resolves as the CLI's did
    if not path.resolve().is_relative_to(settings.models_dir.resolve()):
        raise _NotUsable(f"--model {model} is outside the models dir {settings.models_dir}, and a server loads only models there")
    return str(path.resolve())


def call(server: Server, method: str, path: str, body: dict | None = None, *, timeout: float = _CALL_S) -> tuple[int, object]:
    """One request to the server's API: (status, the JSON answer); LienzoError when it cannot be reached."""
    connection = _connect(server, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=_headers(server, json_body=data is not None))
        response = connection.getresponse()
        text = response.read()
    except (OSError, http.client.HTTPException) as err:
        raise LienzoError(f"lienzo serve at {server.url} did not answer {method} {path}: {err}") from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(text) if text else None
    except ValueError:
        return response.status, text.decode(errors="replace")


def _connect(server: Server, timeout: float) -> http.client.HTTPConnection:
    url = urlsplit(server.url)
    if url.scheme != "http" or not url.hostname:
        raise LienzoError(f"lienzo serve's url {server.url} is not http://HOST:PORT")
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)


def _headers(server: Server, *, json_body: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {server.token}", "Accept": "application/json"}
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def _detail(answer: object) -> str:
    """The message of an error answer (lienzo's own API: ``detail``)."""
    if isinstance(answer, dict) and isinstance(answer.get("detail"), str):
        return answer["detail"]
    return str(answer)[:300]


def request_body(mode: str, request, settings: Settings) -> dict:
    """The native API's body for ``request`` (GenerationRequest, validated here): its ``mode``'s fields, the pictures
    as base64 PNG. Watermark and Content Credentials left open are set to this CLI's settings, which decide them here."""
    from lienzo.generation.request import table

    values = request.model_dump(mode="json", exclude=_IMAGE_FIELDS)
    body = {row.name: values[row.name] for row in table() if mode in row.spec.modes and row.name in values}
    if request.init_image is not None:
        body["init_image"] = _png_b64(request.init_image)
    if request.mask is not None:
        body["mask"] = _png_b64(request.mask)
    if request.reference_images:
        body["reference_images"] = [_png_b64(image) for image in request.reference_images]
    if request.controlnets:
        body["controlnets"] = [
            unit.model_dump(mode="json", exclude={"image"}) | {"image": None if unit.image is None else _png_b64(unit.image)}
            for unit in request.controlnets
        ]
    for key in ("watermark", "credentials"):
        if body.get(key) is None:
            body[key] = getattr(settings, key)
    return body


def _png_b64(image) -> str:
    """A picture as the server decodes one: the file it was read from where that was kept (it carries Content
    Credentials the new image records as its ingredient), else the pixels as PNG, which decode to the same."""
    from lienzo.images.io import SOURCE_KEY

    data = image.info.get(SOURCE_KEY)
    if data is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def submit(server: Server, mode: str, body: dict) -> dict | None:
    """Queue the job; the job as the server answers it, or None when it refused and the job is to run here (a
    server's limits may be other than the CLI's). Refused with --server, or unreachable: LienzoError."""
    if server.model is not None:
        body = {**body, "model": server.model}
    status, answer = call(server, "POST", f"/api/v1/{mode}", body)
    if status == 202 and isinstance(answer, dict):
        return answer
    if server.explicit:
        raise LienzoError(f"--server: lienzo serve at {server.url} refused the job ({status}): {_detail(answer)}")
    err_console.print(f"note: lienzo serve at {server.url} refused the job ({_detail(answer)}); running it here", highlight=False, soft_wrap=True)
    return None


def follow(
    server: Server, job: dict, *, on_change: Callable[[dict], None], stop: threading.Event,
) -> dict:
    """Follow the job's events until it finishes; ``on_change(job)`` after each. Once ``stop`` is set (Ctrl-C) the
    job is cancelled on the server, which stops it after its step. Returns the finished job."""
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_read_events, args=(server, job["id"], events), name="lienzo-events", daemon=True).start()
    cancelled = False
    while not _finished(job):
        if stop.is_set() and not cancelled:
            cancelled = True
            status, answer = call(server, "POST", f"/api/v1/jobs/{job['id']}/cancel")
            if status != 200:
                raise LienzoError(f"lienzo serve at {server.url} did not cancel job {job['id']} ({status}): {_detail(answer)}")
        try:
            # A short wait: Ctrl-C sets ``stop`` while this thread waits, and a queued job sends no events.
            item = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, dict):
            job = item
            on_change(job)
            continue
        # The stream ended or broke (a proxy's timeout, a server of an older lienzo that could end it before the
        # finished state): the job is read once more before the server is called gone.
        try:
            status, answer = call(server, "GET", f"/api/v1/jobs/{job['id']}")
        except LienzoError:
            status, answer = None, None
        if status != 200 or not isinstance(answer, dict) or not _finished(answer):
            why = "it closed the job's event stream" if item is None else str(item)
            raise LienzoError(
                f"lienzo serve at {server.url} stopped answering while job {job['id']} was {job.get('status')} ({why}); "
                "a server that restarts runs it again, --local runs it here"
            )
        job = answer
        on_change(job)
    return job


def _finished(job: dict) -> bool:
    return job.get("status") in ("done", "failed", "cancelled", "interrupted")


def _read_events(server: Server, job_id: str, events: queue.Queue) -> None:
    """Put each job the server's event stream sends (Server-Sent Events) into ``events``; then None when the
    stream ends, or the error that broke it."""
    try:
        connection = _connect(server, _STREAM_S)
        connection.request("GET", f"/api/v1/jobs/{job_id}/events", headers={**_headers(server), "Accept": "text/event-stream"})
        response = connection.getresponse()
        if response.status != 200:
            events.put(LienzoError(f"{response.status}: {_detail(response.read().decode(errors='replace'))}"))
            return
        data: list[str] = []
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif not line and data:
                events.put(json.loads("\n".join(data)))
                data = []
        events.put(None)
    except (OSError, http.client.HTTPException, ValueError, LienzoError) as err:
        events.put(err)
