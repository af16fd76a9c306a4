"""Tiling: seamless textures, AUTOMATIC1111's "Tiling" checkbox.

While a tiling job runs, every padded ``nn.Conv2d`` of the U-Net and the VAE pads circularly: the
left edge of each feature map sees the right edge as its neighbour (and the top the bottom), so the
picture wraps around and tiles without a seam. ``nn.Conv2d`` honours ``padding_mode`` in
``_conv_forward`` (``F.pad(mode="circular")``, then a convolution without padding), so switching the
attribute is enough; nothing else in the networks is position-dependent (attention has no positional
encoding, group norms take statistics over the whole map, upsampling is nearest-neighbour).

Hand-written because diffusers has no tiling switch for its models (its pipelines have none either);
A1111 patches the convolutions the same way (``StableDiffusionModelHijack.apply_circular`` in ``modules/sd_hijack.py``). Unlike
A1111, which leaves the patch on the model, the switch here is a context: the previous mode of every
convolution comes back when the job ends, also on an error or a cancel, so the next job is unchanged.

What it does not make circular: the VAE *encoder*'s downsamplers pad one zero row and column by hand
(``F.pad`` in diffusers' ``Downsample2D`` with ``padding=0``) before an unpadded convolution, as in the
original SD VAE; A1111 leaves them too. Only the encode of an img2img picture goes through them, and
the denoiser's circular U-Net and decoder still join the edges.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

CIRCULAR = "circular"


def padded_convs(*modules: Any) -> list[nn.Conv2d]:
    """Every ``nn.Conv2d`` with padding inside ``modules``, each once.

    The modules are found through what wraps them: ``module.compile()`` in place and accelerate's offload
    hooks keep them where they were, ``torch.compile(module)`` holds it as ``_orig_mod`` (a submodule),
    peft's LoRA layers hold theirs as ``base_layer`` and ``lora_A`` (padded too, so both are switched) and
    int8 quantization replaces only linear layers; DeepCache's wrapper, not a module, is unwrapped by its
    ``unet``.
    """
    convs: dict[int, nn.Conv2d] = {}
    for module in modules:
        if module is not None and not isinstance(module, nn.Module):
            module = getattr(module, "unet", None)  # DeepCacheUNet and the like
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and _padded(sub):
                convs.setdefault(id(sub), sub)
    return list(convs.values())


def _padded(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):  # "valid" pads nothing; "same" pads unless the kernel is 1 x 1
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


@contextmanager
def circular_padding(*modules: Any, on: bool) -> Iterator[None]:
    """Inside, every padded convolution of ``modules`` pads circularly (``on``); each conv's own mode comes back after.

    With ``on`` false it does nothing, so a caller can always enter it:
    ``with circular_padding(components.unet, components.vae, on=plan.tiling): ...``.
    """
    if not on:
        yield
        return
    before = [(conv, conv.padding_mode) for conv in padded_convs(*modules)]
    try:
        for conv, _ in before:
            conv.padding_mode = CIRCULAR
        yield
    finally:
        for conv, mode in before:
            conv.padding_mode = mode


@contextmanager
def seamless(components: Any, on: bool) -> Iterator[None]:
    """A tiling job on ``components``: circular padding in the U-Net and the whole VAE (encoder and
    decoder), and the VAE's own tiled *encode* off (a tile would wrap onto itself, not onto the picture's
    other edge: seams at every tile border). The decode is kept whole by the caller
    (:func:`lienzo.generation.latents.decode` with ``seamless``), for the same reason."""
    if not on:
        yield
        return
    vae = components.vae
    tiled_encode = getattr(vae, "use_tiling", False)
    with circular_padding(components.unet, vae, on=True):
        vae.use_tiling = False
        try:
            yield
        finally:
            vae.use_tiling = tiled_encode
