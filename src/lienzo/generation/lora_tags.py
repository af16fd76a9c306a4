"""AUTOMATIC1111's extra-network syntax for LoRAs in a prompt, ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>``.

``<lyco:NAME:WEIGHT>``, the LyCORIS extension's tag, reads the same: LyCORIS files sit in the Lora folder and load
as LoRAs do.

Apart from the text encoders (lienzo.generation.prompts) so that validating a request needs no torch.
"""

import re

from lienzo.errors import InvalidRequestError

_LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take A1111's ``<lora:NAME:WEIGHT>`` tags out of a prompt: (the prompt without them, [(name, weight)]).

    The weight defaults to 1. Parts after the weight (A1111's separate UNet weight, ``dyn=``) are
    ignored: one weight applies to the whole LoRA. A name given twice keeps its last weight. The text
    around a tag is left as it is, as A1111 leaves it, so the tokens match A1111's.
    """
    loras: dict[str, float] = {}
    for match in _LORA_TAG.finditer(prompt):
        name, _, rest = match.group(1).partition(":")
        name, weight_text = name.strip(), rest.split(":")[0].strip()
        if not name:
            raise InvalidRequestError("prompt", f"{match.group(0)} names no LoRA; write <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            loras[name] = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise InvalidRequestError("prompt", f"the weight in {match.group(0)} must be a number, got {weight_text!r}") from None
    return _LORA_TAG.sub("", prompt), list(loras.items())


def lora_tag(name: str, weight: float) -> str:
    """``<lora:NAME:WEIGHT>``, the weight as short as it reads back exactly (0.5, not 0.500000)."""
    short = f"{weight:g}"
    return f"<lora:{name}:{short if float(short) == weight else repr(weight)}>"
