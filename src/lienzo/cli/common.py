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

SAMPLER_HELP = "sampler by its AUTOMATIC1111 name (see `lienzo samplers`)"


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


def _speed_kwargs(opts: dict) -> dict:
    """The speed flags given, as ``load_model`` arguments (None leaves a setting as it is)."""
    return {
        "vae_dtype": opts.get("vae_dtype"), "threads": opts.get("threads"), "channels_last": opts.get("channels_last"),
        "compile": opts.get("compile_"), "vae_tiling": opts.get("vae_tiling"), "low_vram": opts.get("low_vram"),
        "attention_slicing": opts.get("attention_slicing"), "int8": opts.get("int8"),
    }


def _generation_options(f):
    for option in reversed(
        [
            click.option("--negative", "-n", default="", help="negative prompt"),
            click.option("--width", "-W", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--height", "-H", type=int, help="multiple of 8 [default: model's native size or input size]"),
            click.option("--steps", type=int, default=20, show_default=True),
            click.option("--cfg", type=float, default=7.0, show_default=True, help="classifier-free guidance scale"),
            click.option("--sampler", default="DPM++ 2M", show_default=True, help=SAMPLER_HELP),
            click.option(
                "--schedule", default="Automatic", show_default=True,
                help="schedule type by its A1111 label or id: Karras, Exponential, SGM Uniform, Align Your Steps, ... "
                "(see `lienzo samplers`)",
            ),
            click.option("--seed", type=int, default=-1, show_default=True, help="-1 picks a random seed"),
            click.option("--batch-size", type=int, default=1, show_default=True, help="images per batch (run together)"),
            click.option("--batch-count", type=int, default=1, show_default=True, help="batches, one after another"),
            click.option("--clip-skip", type=int, default=1, show_default=True),
            click.option(
                "--fast/--no-fast", default=False, show_default=True,
                help="fast mode: reuse deep U-Net features across steps (DeepCache), a little less faithful",
            ),
            click.option(
                "--lora", "loras", type=_LoraParam(), multiple=True,
                help="apply a LoRA from the models dir's Lora folder (repeatable); also <lora:NAME:WEIGHT> in the prompt",
            ),
            click.option(
                "--safety", type=click.Choice(["off", "blur", "block"]),
                help="what to do with images the model's safety checker flags [default: off, or LIENZO_SAFETY_CLI]",
            ),
            click.option(
                "--watermark/--no-watermark", default=None,
                help="invisible watermark in saved images [default: on, or LIENZO_WATERMARK]",
            ),
            click.option("--out", "-o", type=click.Path(path_type=Path), help="output folder [default: outputs dir]"),
        ]
    ):
        f = option(f)
    return _model_options(f)


def _inpaint_options(f):
    for option in reversed(
        [
            click.option("--mask-blur", type=int, default=4, show_default=True, help="pixels"),
            click.option("--only-masked", is_flag=True, help="crop around the mask, work at full resolution, paste back"),
            click.option("--padding", type=int, default=32, show_default=True, help="pixels around the mask with --only-masked"),
        ]
    ):
        f = option(f)
    return f


def _fill_option(default: str):
    choices = click.Choice(["fill", "original", "latent noise", "latent nothing"])
    return click.option("--fill", type=choices, default=default, show_default=True, help="what starts under the mask")


def _strength_option(default: float):
    return click.option("--strength", type=float, default=default, show_default=True, help="denoising strength, 0 to 1")


def _request_fields(opts: dict) -> dict:
    """CLI flag names to GenerationRequest fields."""
    names = {
        "negative": "negative_prompt", "width": "width", "height": "height", "steps": "steps", "cfg": "cfg_scale",
        "sampler": "sampler", "schedule": "schedule", "seed": "seed", "batch_size": "batch_size",
        "batch_count": "batch_count", "clip_skip": "clip_skip", "strength": "denoising_strength",
        "mask_blur": "mask_blur", "only_masked": "inpaint_only_masked", "padding": "only_masked_padding",
        "fill": "inpainting_fill", "left": "outpaint_left", "right": "outpaint_right", "up": "outpaint_up",
        "down": "outpaint_down", "loras": "loras", "safety": "safety",
        "watermark": "watermark", "fast": "fast",
    }
    return {field: opts[flag] for flag, field in names.items() if flag in opts and opts[flag] is not None}


def _flag_for(field: str) -> str:
    reverse = {"negative_prompt": "negative", "cfg_scale": "cfg", "denoising_strength": "strength"}
    return reverse.get(field, field)


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
