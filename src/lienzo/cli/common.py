"""What every ``lienzo`` command shares: the settings, the stderr console, the option decorators, Ctrl-C
handling and the group that renders lienzo's errors as one line."""

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from lienzo.errors import LienzoError
from lienzo.settings import Settings

err_console = Console(stderr=True)
log = logging.getLogger("lienzo")

def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj


def _load_settings(**given) -> Settings:
    """The settings from ``given`` flags, the LIENZO_* environment and the defaults; a bad value is one
    line naming its flag or variable. A data dir that is a file is refused here, before anything uses it."""
    try:
        settings = Settings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0])
        where = f"--{name.replace('_', '-')}" if name in given else f"LIENZO_{name.upper()}"
        raise LienzoError(f"{where}: {first['msg']}, got {first['input']!r}") from None
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        where = "--data-dir" if "data_dir" in given else "LIENZO_DATA_DIR"
        raise LienzoError(f"{where}: {settings.data_dir} is a file, not a folder")
    return settings


class _LoraParam(click.ParamType):
    """``--lora NAME`` or ``--lora NAME:WEIGHT`` → (name, weight); the weight defaults to 1."""

    name = "NAME[:WEIGHT]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, weight = value.partition(":")
        try:
            return name, float(weight) if sep else 1.0
        except ValueError:
            self.fail(f"expected NAME or NAME:WEIGHT such as film-grain:0.6, got {value!r}", param, ctx)


def _model_options(f):
    f = _speed_options(f)
    for option in reversed(
        [
            click.option("--model", "-m", help="model name in the models dir, or a path (file or diffusers folder)"),
            click.option("--vae", help="a separate VAE file (name in the models dir or a path)"),
            click.option(
                "--text-encoder", "text_encoders", multiple=True, metavar="PATH",
                help="a text encoder file (or Qwen3 folder) for a transformer file: SD 3.x, Flux.1, Chroma, Z-Image (clip_l, clip_g, t5xxl or qwen3; repeatable) "
                "[default: found in the models dir's text_encoders or clip folder]",
            ),
            click.option("--t5/--no-t5", "t5", default=True, help="SD 3.x: use its T5-XXL text encoder [default: --t5]"),
            click.option(
                "--text-encoder-device", help="cpu: run the text encoders there, leaving the GPU's memory to the network "
                "[default: beside the network]",
            ),
            click.option(
                "--free-text-encoders", is_flag=True, default=None,
                help="keep the text encoders in CPU memory and run them beside the network only to encode a prompt "
                "not encoded before, leaving the GPU's memory to the network [default: off]",
            ),
            click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), help="override the model's prediction type"),
            click.option("--device", default=None, help="auto, cpu, cuda or mps [default: auto]"),
            click.option("--dtype", default=None, help="auto, float32, float16 or bfloat16 [default: auto]"),
        ]
    ):
        f = option(f)
    return f


def _speed_options(f):
    """Speed and memory switches; unset, they come from the settings (LIENZO_THREADS, LIENZO_COMPILE, ...)."""
    for option in reversed(
        [
            click.option("--vae-dtype", default=None, help="auto, float32, float16 or bfloat16 [default: auto, the model's]"),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: one per physical core]"),
            click.option(
                "--channels-last/--no-channels-last", default=None,
                help="NHWC memory layout for the U-Net and VAE [default: on for CUDA and the CPU]",
            ),
            click.option(
                "--compile", "compile_", is_flag=True, default=None, help="torch.compile the U-Net and VAE (slow first image, cached)"
            ),
            click.option(
                "--fp8", is_flag=True, default=None,
                help="store the network's and T5's weights in fp8, each layer cast up when it runs: about half the memory "
                "of bf16 for them, a little less faithful",
            ),
            click.option(
                "--int8", is_flag=True, default=None,
                help="CPU: the U-Net's linear layers in int8 (faster, a little less faithful to the model)",
            ),
            click.option(
                "--vae-tiling", type=click.Choice(["auto", "on", "off"]),
                help="VAE in tiles: auto (decodes above 1024x1024), on (decodes and encodes), off [default: auto]",
            ),
            click.option("--low-vram", is_flag=True, default=None, help="VAE tiling and (CUDA) CPU offload of the U-Net and text encoders"),
            click.option(
                "--attention-slicing/--no-attention-slicing", default=None,
                help="attention a few heads at a time [default: with --low-vram, except on CPU and CUDA]",
            ),
        ]
    ):
        f = option(f)
    return f


def _model_kwargs(opts: dict) -> dict:
    """The model options given (``_model_options`` but the speed ones), as ``load_model`` arguments."""
    return {
        "vae": opts.get("vae"), "text_encoders": list(opts.get("text_encoders") or ()), "t5": opts.get("t5", True),
        "text_encoder_device": opts.get("text_encoder_device"), "free_text_encoders": opts.get("free_text_encoders"),
        "prediction_type": opts.get("prediction"),
    }


def _speed_kwargs(opts: dict) -> dict:
    """The speed flags given, as ``load_model`` arguments (None leaves a setting as it is)."""
    return {
        "vae_dtype": opts.get("vae_dtype"), "threads": opts.get("threads"), "channels_last": opts.get("channels_last"),
        "compile": opts.get("compile_"), "vae_tiling": opts.get("vae_tiling"), "low_vram": opts.get("low_vram"),
        "attention_slicing": opts.get("attention_slicing"), "int8": opts.get("int8"), "fp8": opts.get("fp8"),
    }


def _generation_options(mode: str):
    """The options of a generation command: one per field of the table that has a CLI flag in ``mode``
    (with that mode's default), then the output folder and the model options. Each option's value is
    stored under its GenerationRequest field name."""

    def decorate(f):
        from lienzo.generation.request import table

        options = [_field_option(row, mode) for row in table() if row.spec.cli and mode in row.spec.modes]
        options.append(click.option("--out", "-o", type=click.Path(path_type=Path), help="output folder [default: outputs dir]"))
        for option in reversed(options):
            f = option(f)
        return _model_options(f)

    return decorate


def _field_option(row, mode: str):
    """A click option for one table row: its type from the field's annotation, its default for ``mode``."""
    import typing

    spec, default = row.spec, row.spec.default_for(mode, row.default)
    names = [f"--{spec.cli}", *([spec.cli_short] if spec.cli_short else []), row.name]
    kind = row.kind
    if kind is bool:
        return click.option(f"--{spec.cli}/--no-{spec.cli}", row.name, default=default, show_default=default not in (None, ""), help=spec.help)
    if row.name == "loras":
        return click.option(*names, type=_LoraParam(), multiple=True, help=spec.help)
    if row.name == "controlnets":  # MODULE:IMAGE[:WEIGHT][:KEY=VALUE...], the image read as the command line is
        return click.option(
            *names, multiple=True, callback=_read_controls, metavar="MODULE:IMAGE[:WEIGHT][:KEY=VALUE]...",
            help=f"{spec.help}; e.g. canny:photo.png:0.8 or none:depth.png:model=control_v11f1p_sd15_depth:start=0.1; keys: "
            f"{', '.join(CONTROL_KEYS)}; without model=, the one ControlNet whose name holds the module's kind (repeatable)",
        )
    if row.name == "reference_images":  # picture files, read as the command line is
        return click.option(*names, type=click.Path(path_type=Path), multiple=True, callback=_read_images, help=f"{spec.help} (repeatable)")
    if typing.get_origin(kind) is list:  # repeatable: --style a --style b
        return click.option(*names, multiple=True, help=f"{spec.help} (repeatable)")
    if typing.get_origin(kind) is typing.Literal:
        kind = click.Choice([str(c) for c in typing.get_args(kind)])
    return click.option(*names, type=kind, default=default, show_default=default not in (None, ""), help=spec.help)


# --control's KEY=VALUE names: the unit's fields, short where the extension's are long.
CONTROL_KEYS = {
    "model": "model", "start": "guidance_start", "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
    "res": "processor_res", "a": "threshold_a", "b": "threshold_b", "pixel-perfect": "pixel_perfect",
}
_CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
_RESIZE_MODES = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def _read_controls(ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]) -> list[dict]:
    """Each ``--control`` as the unit fields it gives explicitly (a remake fills the rest from the picture), its
    image read and held to the settings' max_input_pixels."""
    from lienzo.images.io import load_image

    units = []
    for spec in specs:
        module, sep, rest = spec.partition(":")
        parts = rest.split(":") if sep else []
        if not module or not parts or not parts[0]:
            raise click.BadParameter(f"expected MODULE:IMAGE[:WEIGHT][:KEY=VALUE]... such as canny:photo.png:0.8, got {spec!r}", ctx, param)
        unit: dict = {"module": module, "image": load_image(Path(parts[0]), field="--control", max_pixels=_settings(ctx).max_input_pixels)}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            if not eq:
                unit["weight"] = _number(part, "the weight", spec, ctx, param)
                continue
            if key not in CONTROL_KEYS:
                raise click.BadParameter(f"unknown key {key!r} in {spec!r}; keys: {', '.join(CONTROL_KEYS)}", ctx, param)
            field = CONTROL_KEYS[key]
            if field == "control_mode":
                value = _CONTROL_MODES.get(value.lower(), value)
            elif field == "resize_mode":
                value = _RESIZE_MODES.get(value.lower(), value)
            elif field == "pixel_perfect":
                value = value.lower() in ("1", "true", "yes", "on")
            elif field != "model":
                value = _number(value, key, spec, ctx, param)
            unit[field] = value
        units.append(unit)
    return units


def _number(text: str, what: str, spec: str, ctx, param) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{what} must be a number, got {text!r} in {spec!r}", ctx, param) from None


def _read_images(ctx: click.Context, param: click.Parameter, paths: tuple[Path, ...]) -> list:
    """The pictures a repeatable option names, each held to the settings' max_input_pixels."""
    from lienzo.images.io import load_image

    return [load_image(path, field=param.opts[0], max_pixels=_settings(ctx).max_input_pixels) for path in paths]


def _request_fields(opts: dict) -> dict:
    """The request fields among a generation command's options (those given, or with a default)."""
    from lienzo.generation.request import table

    return {row.name: opts[row.name] for row in table() if opts.get(row.name) is not None}


def control_models_for(units: list[dict], settings: Settings) -> list[dict]:
    """``units`` with a model for each that names none: the one ControlNet in the models dir whose name holds the
    module's kind (canny, depth, lineart, ...), as people name them (control_v11p_sd15_canny); refused, listing the
    candidates, when none or several do."""
    from lienzo.control.models import control_models

    entries = None
    for index, unit in enumerate(units):
        if unit.get("model"):
            continue
        kind = _module_kind(unit["module"])
        entries = entries if entries is not None else control_models(settings.models_dir)
        found = [e for e in entries if kind and kind in e.name.lower()]
        if len(found) != 1:
            listed = ", ".join(e.title for e in (found or entries)) or f"none in {settings.models_dir / 'ControlNet'}"
            why = f"{len(found)} ControlNets have {kind!r} in their name" if found else f"no ControlNet has {kind!r} in its name"
            raise LienzoError(f"--control {index + 1}: {why}; name one with model=NAME (available: {listed})")
        unit["model"] = found[0].title
    return units


# The word a module's ControlNets carry in their names (control_v11p_sd15_canny, t2iadapter_color_sd14v1).
_MODULE_KINDS = {"tile_resample": "tile", "blur_gaussian": "tile", "scribble_xdog": "scribble", "hed": "softedge",
                 "lineart_standard": "lineart", "lineart_coarse": "lineart", "inpaint_only": "inpaint", "threshold": "scribble"}


def _module_kind(module: str) -> str | None:
    from lienzo.control.preprocessors import find_preprocessor

    name = find_preprocessor(module, field="--control").name
    return None if name in ("none", "invert") else _MODULE_KINDS.get(name, name.split("_")[0])


def _flag_for(field: str) -> str:
    """The CLI flag of a request field, as errors name it."""
    from lienzo.generation.request import GenerationRequest
    from lienzo.generation.fields import spec_of

    spec = spec_of(GenerationRequest.model_fields[field]) if field in GenerationRequest.model_fields else None
    return f"--{spec.cli}" if spec and spec.cli else field


@contextmanager
def _ctrl_c(message: str):
    """The first Ctrl-C sets the event it yields (work stops cleanly after its current step); a second aborts."""
    stop = threading.Event()

    def on_sigint(_signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print(f"[yellow]{message}")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Group(click.Group):
    """Turns lienzo's own errors into one red line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LienzoError as err:
            err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    def format_epilog(self, ctx, formatter):
        """Where this machine's folders are (from the environment and the defaults; --help is answered
        before the other flags are read), so that a user can find the images every command saves."""
        try:
            settings = _load_settings()
        except LienzoError as err:
            with formatter.section("Folders"):
                formatter.write_text(f"unknown: {err}")
            return
        with formatter.section("Folders (--outputs-dir, --models-dir and --data-dir change them)"):
            formatter.write_dl(
                [("outputs", str(settings.outputs_dir)), ("models", str(settings.models_dir)), ("data", str(settings.data_dir))]
            )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models-dir", type=click.Path(path_type=Path), help="[env LIENZO_MODELS_DIR]")
@click.option("--outputs-dir", type=click.Path(path_type=Path), help="[env LIENZO_OUTPUTS_DIR]")
@click.option("--data-dir", type=click.Path(path_type=Path), help="gallery and caches [env LIENZO_DATA_DIR]")
@click.option("-v", "--verbose", is_flag=True, help="log details to stderr")
@click.version_option(package_name="lienzo")
@click.pass_context
def app(ctx, models_dir, outputs_dir, data_dir, verbose):
    """lienzo: create art with diffusion models, offline."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = {"models_dir": models_dir, "outputs_dir": outputs_dir, "data_dir": data_dir}
    ctx.obj = _load_settings(**{k: v for k, v in given.items() if v is not None})
