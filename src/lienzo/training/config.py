"""TrainConfig: everything that decides what a training run produces, typed, and saved with every checkpoint.

A config is built in layers, later ones winning: a preset (``tiny``, ``mini``, ``base``), a TOML
file, then ``--set section.key=value`` overrides and the CLI's own flags. Unknown keys and impossible
values are refused with one line naming the key.
"""

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lienzo.errors import LienzoError

Positive = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(ge=0, le=1)]


class ConfigError(LienzoError):
    """A training config that cannot be used: unknown key, impossible value, unreadable file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VaeArch(_Section):
    """diffusers ``AutoencoderKL``: one encoder/decoder level per entry; each level after the first halves the size."""

    block_out_channels: list[Positive] = [32, 32, 64]
    layers_per_block: Positive = 1
    latent_channels: Positive = 4
    norm_num_groups: Positive = 32


class UnetArch(_Section):
    """diffusers ``UNet2DConditionModel``; ``attention`` says which levels have cross-attention blocks."""

    block_out_channels: list[Positive] = [32, 64]
    attention: list[bool] = [False, True]
    layers_per_block: Positive = 1
    attention_heads: Positive = 2
    norm_num_groups: Positive = 32

    @model_validator(mode="after")
    def _levels(self) -> "UnetArch":
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"model.unet.attention needs one entry per level ({len(self.block_out_channels)}), got {len(self.attention)}"
            )
        return self


class TextArch(_Section):
    """transformers ``CLIPTextModel`` with CLIP's 49,408-token vocabulary, so the bundled tokenizer fits."""

    hidden_size: Positive = 32
    layers: Positive = 2
    heads: Positive = 2


class ModelConfig(_Section):
    vae: VaeArch = VaeArch()
    unet: UnetArch = UnetArch()
    text_encoder: TextArch = TextArch()
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # The noise schedule, in diffusers scheduler terms; SD's own is 1000 steps of scaled-linear betas.
    num_train_timesteps: Annotated[int, Field(ge=10, le=10000)] = 1000
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: Annotated[float, Field(gt=0, lt=1)] = 0.00085
    beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.012


class Optim(_Section):
    """One stage's optimisation: AdamW, linear warmup, then cosine / step decay (StepLR, as the seed used) / constant."""

    steps: Annotated[int, Field(ge=0)] = 100
    batch_size: Positive = 8
    grad_accum: Positive = 1
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Rate, Rate] = (0.9, 0.999)
    warmup: Annotated[int, Field(ge=0)] = 0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: Positive = 1000  # "step": multiply the rate by gamma every step_size steps
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999  # 0 turns EMA off


class VaeStage(Optim):
    lr: Annotated[float, Field(gt=0, le=1)] = 4.5e-4
    recon_loss: Literal["l1", "mse"] = "l1"
    kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    perceptual_weight: Annotated[float, Field(ge=0)] = 0.1  # used only with a VGG16 file (perceptual_weights)
    # Train on random square crops of this side instead of whole images: the VAE is convolutional, so
    # it learns the same filters, at a quarter of the cost per image at half the side. None: whole images.
    crop: Annotated[int, Field(ge=16, multiple_of=8)] | None = None


class UnetStage(Optim):
    caption_dropout: Rate = 0.1  # the share of empty prompts that teaches classifier-free guidance
    train_text_encoder: bool = True
    snr_gamma: Annotated[float, Field(ge=0)] = 0.0  # Min-SNR loss weighting (Hang et al. 2023); 0 = plain MSE
    cache_latents: bool = True  # the VAE is frozen here: encode each image (and its mirror) once


class Data(_Section):
    conditioning: Literal["caption", "label", "none"] = "caption"
    label_template: str = "{label}"
    flip: bool = True  # random horizontal mirror
    # Prompts per image: the caption, then variants of its comma-separated tags (one drawn per sample):
    # the first keep_tags stay in front, the rest shuffled and each dropped with tag_dropout, and
    # "a"/"an" in front with the chance ``articles``. 1: the caption only.
    caption_variants: Annotated[int, Field(ge=1, le=64)] = 1
    keep_tags: Annotated[int, Field(ge=0)] = 1
    shuffle_tags: bool = False
    tag_dropout: Rate = 0.0
    articles: Rate = 0.0


class Samples(_Section):
    every: Annotated[int, Field(ge=0)] = 100  # 0: only at the end
    prompts: list[str] = ["a red apple", "a smiling face", "a blue car", "a green tree"]
    per_prompt: Positive = 4
    seed: Annotated[int, Field(ge=0)] = 1234
    steps: Positive = 20
    cfg_scale: Annotated[float, Field(ge=0, le=30)] = 5.0
    sampler: str = "DPM++ 2M"
    # Warn when a UNet sample is closer than this to a training image (tiny-image cosine distance,
    # calibrated in training/memorisation.py); 0 turns the check off.
    memorisation: Annotated[float, Field(ge=0, le=1)] = 0.01


class Lora(_Section):
    base: str  # a checkpoint file, diffusers folder or model name
    rank: Positive = 8
    alpha: Annotated[float, Field(gt=0)] = 8.0
    text_encoder: bool = False
    name: str = "lora"


class TrainConfig(_Section):
    """A whole run. ``stages`` run in order; a ``lora`` section turns the run into LoRA fine-tuning of ``lora.base``."""

    seed: Annotated[int, Field(ge=0)] = 0
    resolution: Annotated[int, Field(ge=64, le=2048, multiple_of=8)] = 64
    stages: list[Literal["vae", "unet"]] = ["vae", "unet"]
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    checkpoint_every: Annotated[int, Field(ge=0)] = 500  # 0: only at the end (and on Ctrl-C)
    log_every: Positive = 10
    keep_checkpoints: Positive = 2  # older checkpoints are deleted once a newer one is written
    export_dtype: Literal["float32", "float16"] = "float32"
    # torch.compile the UNet (and the VAE in its stage): faster steps after a compile of a minute or more.
    compile: bool = False
    data: Data = Data()
    model: ModelConfig = ModelConfig()
    vae: VaeStage = VaeStage()
    unet: UnetStage = UnetStage()
    samples: Samples = Samples()
    lora: Lora | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if not self.stages:
            raise ValueError("stages must name at least one of vae, unet")
        if self.stages != sorted(set(self.stages), key=["vae", "unet"].index):
            raise ValueError(f"stages must be vae, unet or both in that order, got {self.stages}")
        factor = 2 ** (len(self.model.vae.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.model.unet.block_out_channels) - 1)
        if self.lora is None and self.resolution % (factor * unet_factor):
            raise ValueError(
                f"resolution must be a multiple of {factor * unet_factor} for this VAE and UNet "
                f"(VAE /{factor}, UNet /{unet_factor}), got {self.resolution}"
            )
        if self.lora is not None and self.stages != ["unet"]:
            raise ValueError("a LoRA run trains the UNet stage only: set stages = [\"unet\"]")
        if self.vae.crop is not None and (self.vae.crop > self.resolution or self.vae.crop % factor):
            raise ValueError(f"vae.crop must be a multiple of {factor} no larger than resolution ({self.resolution}), got {self.vae.crop}")
        for name, arch in (("vae", self.model.vae), ("unet", self.model.unet)):
            bad = [c for c in arch.block_out_channels if c % arch.norm_num_groups]
            if bad:
                raise ValueError(f"model.{name}.block_out_channels must be multiples of norm_num_groups ({arch.norm_num_groups}), got {bad}")
        text = self.model.text_encoder
        if text.hidden_size % text.heads:
            raise ValueError(f"model.text_encoder.hidden_size ({text.hidden_size}) must be a multiple of heads ({text.heads})")
        return self

    def identity(self) -> dict:
        """The fields a resumed run must share with the original: everything but how often it reports."""
        data = self.model_dump(mode="json")
        data.pop("checkpoint_every")
        data.pop("log_every")
        data.pop("keep_checkpoints")
        data.pop("compile")
        data["samples"].pop("every")
        data["samples"].pop("memorisation")
        return data


PRESETS: dict[str, dict] = {
    # Seconds on a CPU: for tests and trying things out.
    "tiny": {
        "resolution": 64,
        "model": {
            "vae": {"block_out_channels": [32, 32, 64]},
            "unet": {"block_out_channels": [32, 64], "attention": [False, True]},
            "text_encoder": {"hidden_size": 32, "layers": 2, "heads": 2},
        },
        "vae": {"steps": 200, "batch_size": 8},
        "unet": {"steps": 400, "batch_size": 8},
        "samples": {"every": 100, "steps": 10},
        "checkpoint_every": 100,
    },
    # A small 128x128 model a CPU can train in hours (latents 32x32x4).
    "mini": {
        "resolution": 128,
        "model": {
            "vae": {"block_out_channels": [64, 128, 128], "layers_per_block": 1},
            "unet": {"block_out_channels": [64, 128, 256], "attention": [False, True, True], "layers_per_block": 2, "attention_heads": 4},
            "text_encoder": {"hidden_size": 128, "layers": 4, "heads": 4},
        },
        "vae": {"steps": 4000, "batch_size": 16, "warmup": 200},
        "unet": {"steps": 20000, "batch_size": 32, "lr": 2e-4, "warmup": 500, "ema_decay": 0.9995},
        "samples": {"every": 1000},
        "checkpoint_every": 500,
    },
    # SD-like proportions at 256x256 (VAE /8, latents 32x32x4): a GPU preset.
    "base": {
        "resolution": 256,
        "model": {
            "vae": {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 2},
            "unet": {"block_out_channels": [128, 256, 512], "attention": [True, True, True], "layers_per_block": 2, "attention_heads": 8},
            "text_encoder": {"hidden_size": 512, "layers": 8, "heads": 8},
        },
        "vae": {"steps": 20000, "batch_size": 32, "warmup": 500},
        "unet": {"steps": 100000, "batch_size": 128, "lr": 1e-4, "warmup": 1000, "ema_decay": 0.9999},
        "samples": {"every": 2500},
        "checkpoint_every": 2500,
    },
}


# The ``lienzo train`` flags that set a config key, by click parameter name; the flags win over every other layer.
TRAIN_FLAGS: dict[str, str] = {
    "seed": "seed", "resolution": "resolution", "stage": "stages", "conditioning": "data.conditioning",
    "prediction": "model.prediction_type", "vae_steps": "vae.steps", "unet_steps": "unet.steps",
    "batch_size": "unet.batch_size", "lr": "unet.lr", "sample_every": "samples.every",
    "checkpoint_every": "checkpoint_every", "mixed_precision": "mixed_precision",
    "base": "lora.base", "rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_name": "lora.name",
}


def flag_values(flags: dict) -> dict:
    """The config keys that the given ``lienzo train`` flags set (left out: None, or () for ``--stage``),
    e.g. ``{"unet.lr": 0.0002, "stages": ["unet"]}``."""
    given = {key: flags[flag] for flag, key in TRAIN_FLAGS.items() if flags.get(flag) not in (None, ())}
    if "stages" in given:
        given["stages"] = list(given["stages"])  # click gives a tuple; the config holds a list
    return given


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict:
    """``unet.steps=200`` → ``{"unet": {"steps": 200}}``; the value is read as TOML (strings may go unquoted)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set: expected KEY=VALUE like unet.steps=200, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return nest(key.strip(), value)


def nest(key: str, value) -> dict:
    """``nest("unet.steps", 200)`` → ``{"unet": {"steps": 200}}``."""
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def build_config(preset: str | None = None, file: Path | None = None, overrides: list[dict] | None = None) -> TrainConfig:
    """Preset, then TOML file, then overrides (each a nested dict), validated once into a TrainConfig."""
    layers: list[dict] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: choose one of {', '.join(PRESETS)}, got {preset!r}")
        layers.append(PRESETS[preset])
    if file is not None:
        layers.append(read_toml(file))
    layers.extend(overrides or [])
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer)
    return validate_config(merged)


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: cannot read {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {path} is not valid TOML: {err}") from None


def validate_config(data: dict) -> TrainConfig:
    """One line naming the first bad key, e.g. ``unet.lr: Input should be greater than 0``."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        raise ConfigError(f"config: {key}: {message}") from None


def to_toml(config: TrainConfig) -> str:
    """The config as TOML, loadable by ``build_config(file=...)``: written next to every checkpoint."""
    data = config.model_dump(mode="json", exclude_none=True)
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.extend(_toml_table(section, values))
    return "\n".join(lines) + "\n"


def _toml_table(name: str, values: dict) -> list[str]:
    lines = ["", f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for key, sub in values.items():
        if isinstance(sub, dict):
            lines.extend(_toml_table(f"{name}.{key}", sub))
    return lines


def _toml_value(value) -> str:
    # A tiny writer for the config's own value types (bool, number, string, list): tomllib only reads.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
