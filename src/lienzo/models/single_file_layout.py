"""What loading and saving single-file Stable Diffusion checkpoints share, and what such files do not carry.

Where each family's text encoders sit under ldm / AUTOMATIC1111 key names, and the files lienzo bundles
in ``models/configs/`` instead: CLIP's tokenizer and the noise schedule SD was trained with.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CONFIGS = Path(__file__).parent / "configs"

_CLIP_PAD = "<|endoftext|>"
# OpenCLIP pads with token id 0, which is "!" in the CLIP vocabulary.
_OPEN_CLIP_PAD = "!"


@dataclass(frozen=True)
class _TextEncoderSlot:
    """Where one text encoder lives in an ldm checkpoint and in :class:`Components`."""

    prefix: str
    open_clip: bool  # OpenCLIP naming (resblocks, fused in_proj) rather than transformers' CLIP naming
    model_class: type
    encoder_attr: str
    tokenizer_attr: str


_TEXT_ENCODERS = {
    "sd1": (_TextEncoderSlot("cond_stage_model.transformer.", False, CLIPTextModel, "text_encoder", "tokenizer"),),
    "sd2": (_TextEncoderSlot("cond_stage_model.model.", True, CLIPTextModel, "text_encoder", "tokenizer"),),
    "sdxl": (
        _TextEncoderSlot("conditioner.embedders.0.transformer.", False, CLIPTextModel, "text_encoder", "tokenizer"),
        _TextEncoderSlot(
            "conditioner.embedders.1.model.", True, CLIPTextModelWithProjection, "text_encoder_2", "tokenizer_2"
        ),
    ),
    # The refiner's bigG alone, as lienzo's first encoder (lienzo.models.families says why).
    "sdxl_refiner": (
        _TextEncoderSlot("conditioner.embedders.0.model.", True, CLIPTextModelWithProjection, "text_encoder", "tokenizer"),
    ),
}


def bundled_tokenizer(pad_token: str = _CLIP_PAD) -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the bundled files; pad with "!" for OpenCLIP encoders (SD2, SDXL's second)."""
    folder = CONFIGS / "tokenizer"
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def scheduler_config_for(prediction_type: str) -> dict:
    """The noise schedule SD 1.x/2.x/XL were trained with (bundled scheduler_sd.json), for one prediction type."""
    config = json.loads((CONFIGS / "scheduler_sd.json").read_text())
    config.pop("_comment")
    config["prediction_type"] = prediction_type
    return config
