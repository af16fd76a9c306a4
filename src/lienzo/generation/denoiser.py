"""The denoiser: the network call the denoising loop makes, as a stack of small layers.

As in k-diffusion, the loop sees one callable, ``denoiser(x, t, step) -> prediction``: the model's
output for the scaled latents ``x`` at timestep ``t``, in the parameterisation its scheduler steps with
(noise, v or, for flow models, velocity); ``step`` is the loop's 0-based index, which picks the step's
prompt. What wraps the network is a layer around that callable, never a branch in the loop:

- :class:`UNetCall`: a U-Net (or DeepCache's :class:`~lienzo.generation.deepcache.DeepCacheUNet`
  around it) with one text conditioning; :class:`SD3Call`, :class:`FluxCall`, :class:`ChromaCall`,
  :class:`ZImageCall`, :class:`Flux2Call`, :class:`QwenImageCall` and :class:`Krea2Call` are the transformer families' (each
  turns the latents into what its network takes, packed 2x2 patches or a list of frames, and back inside its call, so the loop,
  the schedulers and the inpainting mask see ordinary N x C x h x w latents for every family);
- :class:`PromptSteps`: for prompt editing and alternation, the step's call among several
  :class:`UNetCall` around the same U-Net (absent for a prompt the same at every step);
- :class:`ImageGroups`: for dynamic prompts of different lengths in one batch, a call per group of images;
- :class:`InpaintChannels`: the mask and masked-image latents an inpainting model takes as extra input;
- :class:`Guidance`: classifier-free guidance, one model pass over [uncond, cond] (for Qwen-Image, rescaled
  to the conditional prediction's norm as its pipeline does);
- :class:`Composition`: in its place for composable prompts (``a AND b:0.5``), one model pass over
  [uncond, a row per subprompt], combined as AUTOMATIC1111 does (for Qwen-Image too: without the rescale,
  which has no single conditional prediction to take its norm from).

The rows a network call sees are laid out as [uncond of each image (guided only), then each image's
conditional rows]: one per image for a plain prompt, one per subprompt for a composed one.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.functional import pad

from lienzo.generation.control import ControlStack, image_prompts
from lienzo.generation.deepcache import DeepCacheUNet
from lienzo.generation.latents import LatentMask
from lienzo.generation.plan import BatchPlan, References
from lienzo.generation.prompt_schedule import schedule_index
from lienzo.generation.prompts import ComposedPrompt, PromptEmbeddings, PromptSchedule
from lienzo.models.components import Components


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """The prediction for scaled latents ``x`` (one row per image) at timestep ``t``, the loop's
        0-based ``step``."""
        ...


@dataclass(frozen=True)
class UNetCall:
    """A diffusers-style U-Net called with fixed text conditioning, rows ordered [uncond..., cond...]."""

    unet: Any  # UNet2DConditionModel, or DeepCacheUNet around one: both are called the same way
    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None  # SDXL's pooled text and size ids
    control: ControlStack | None = None  # ControlNet / T2I-Adapter units: residuals added to the U-Net's blocks
    uncond_rows: int = 0  # how many of the rows are unconditional (the first ones)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        residuals = {} if self.control is None else self.control.residuals(x, t, step, self.embeds, self.added, self.uncond_rows)
        # IP-Adapter units: the U-Net with their attention for this call, and their image embeddings.
        with image_prompts(self.control, self.unet, step, x.shape[0], self.uncond_rows, self.added) as added, torch.no_grad():
            return self.unet(x, t, encoder_hidden_states=self.embeds, added_cond_kwargs=added, return_dict=False, **residuals)[0]


@dataclass(frozen=True)
class SD3Call:
    """SD 3.x's MMDiT, called as ``StableDiffusion3Pipeline`` calls it: the timestep on the 0-1000 scale,
    the prompt's sequence and pooled CLIP vectors, rows ordered [uncond..., cond...]."""

    transformer: Any
    embeds: torch.Tensor
    pooled: torch.Tensor

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        with torch.no_grad():
            return self.transformer(
                hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=self.embeds,
                pooled_projections=self.pooled, return_dict=False,
            )[0]


def _packed_call(
    transformer: Any, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, control: ControlStack | None = None, step: int = 0,
    uncond_rows: int = 0, **inputs,
) -> torch.Tensor:
    """A Flux.1-layout transformer (Flux.1, Chroma) on N x C x h x w latents, as their pipelines call it:
    the latents packed into 2x2 patches with their position ids, the timestep on the 0-1 scale. ``control``: Flux.1
    ControlNet units, run on the same inputs at ``step``, their block samples added to the transformer's blocks."""
    from diffusers import FluxPipeline  # its packing helpers; imported with the model's family

    n, channels, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, n, channels, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
    text_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
    inputs |= {"timestep": t.expand(n).to(x.dtype) / 1000, "encoder_hidden_states": embeds, "txt_ids": text_ids, "img_ids": image_ids}
    if control is not None:
        depth = (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
        inputs |= control.flux_samples(packed, step, uncond_rows, depth, **inputs)
    with torch.no_grad():
        out = transformer(hidden_states=packed, return_dict=False, **inputs)[0]
    # _unpack_latents takes the pixel size: a latent pixel is one VAE factor (here 1) of it.
    return FluxPipeline._unpack_latents(out, h, w, 1)


@dataclass(frozen=True)
class FluxCall:
    """Flux.1's transformer, called as ``FluxPipeline`` calls it: packed latents, the pooled CLIP vector
    and, for the guidance-distilled dev models, the distilled guidance strength (``guidance``: one value
    per row; None for schnell). ``control``: its ControlNet units, their maps encoded (ControlStack.encoded)."""

    transformer: Any
    embeds: torch.Tensor
    pooled: torch.Tensor
    guidance: torch.Tensor | None
    control: ControlStack | None = None
    uncond_rows: int = 0  # how many of the rows are unconditional (the first ones)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return _packed_call(
            self.transformer, x, t, self.embeds, self.control, step, self.uncond_rows, guidance=self.guidance, pooled_projections=self.pooled,
        )


@dataclass(frozen=True)
class ChromaCall:
    """Chroma's transformer, called as ``ChromaPipeline`` calls it: packed latents and the T5 sequence with
    its mask (``mask``: rows x text tokens), every image token attended to."""

    transformer: Any
    embeds: torch.Tensor
    mask: torch.Tensor

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        n, _, h, w = x.shape
        image = self.mask.new_ones((n, (h // 2) * (w // 2)))
        return _packed_call(self.transformer, x, t, self.embeds, attention_mask=torch.cat([self.mask, image], dim=1))


@dataclass(frozen=True)
class ZImageCall:
    """Z-Image's transformer, called as ``ZImagePipeline`` calls it: a list of one-frame latents and one of
    prompt sequences, each as long as its prompt; the timestep reversed on the 0-1 scale (1: clean) and
    the prediction negated (it predicts x0 - noise, the loop steps with noise - x0)."""

    transformer: Any
    embeds: tuple[torch.Tensor, ...]  # one (tokens, dim) per row

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        frames = list(x.to(self.transformer.dtype).unsqueeze(2).unbind(0))
        with torch.no_grad():
            out = self.transformer(frames, (1000 - t.expand(x.shape[0])) / 1000, list(self.embeds), return_dict=False)[0]
        return -torch.stack([frame.float() for frame in out]).squeeze(2).to(x.dtype)


@dataclass(frozen=True)
class Flux2Call:
    """Flux.2's transformer, called as ``Flux2KleinPipeline`` calls it: the (already 2x2-patched) latents as
    a sequence with (time, row, column, layer) position ids, the Qwen3 sequence with its token positions,
    the timestep on the 0-1 scale and no guidance input. Reference images follow the latents in every row's
    sequence, with their own ids; the prediction is the latents' part of the output."""

    transformer: Any
    embeds: torch.Tensor
    references: References | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline  # its packing helpers; imported with the model's family

        n, _, h, w = x.shape
        image_ids = Flux2KleinPipeline._prepare_latent_ids(x).to(x.device)
        tokens, ids = Flux2KleinPipeline._pack_latents(x), image_ids
        if self.references is not None:
            tokens = torch.cat([tokens, self.references.tokens.to(x).expand(n, -1, -1)], dim=1)
            ids = torch.cat([ids, self.references.ids.to(x.device).expand(n, -1, -1)], dim=1)
        with torch.no_grad():
            out = self.transformer(
                hidden_states=tokens.to(self.transformer.dtype),
                timestep=t.expand(n).to(x.dtype) / 1000, encoder_hidden_states=self.embeds,
                txt_ids=Flux2KleinPipeline._prepare_text_ids(self.embeds).to(x.device), img_ids=ids, return_dict=False,
            )[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(out[:, : h * w], image_ids, h, w).to(x.dtype)


@dataclass(frozen=True)
class QwenImageCall:
    """Qwen-Image's transformer, called as ``QwenImagePipeline`` calls it: the latents packed into 2x2 patches with
    their (frames, rows, columns), the Qwen2.5-VL sequences zero-padded to the longest with their mask (None when
    no row has padding, as the pipeline passes it), the timestep on the 0-1 scale. Qwen-Image-Edit's input images
    follow the latents in every row's sequence, with their own shapes (as ``QwenImageEditPlusPipeline`` calls it);
    the prediction is the latents' part of the output."""

    transformer: Any
    embeds: torch.Tensor
    mask: torch.Tensor | None  # rows x tokens, 1 at a prompt's tokens
    references: References | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        from diffusers import QwenImagePipeline  # its packing helpers; imported with the model's family

        n, channels, h, w = x.shape
        packed, shapes = QwenImagePipeline._pack_latents(x, n, channels, h, w), [(1, h // 2, w // 2)]
        if self.references is not None:
            packed = torch.cat([packed, self.references.tokens.to(packed).expand(n, -1, -1)], dim=1)
            shapes += self.references.shapes
        with torch.no_grad():
            out = self.transformer(
                hidden_states=packed, timestep=t.expand(n).to(x.dtype) / 1000, encoder_hidden_states=self.embeds,
                encoder_hidden_states_mask=self.mask, img_shapes=[shapes] * n, return_dict=False,
            )[0]
        # _unpack_latents takes the pixel size: a latent pixel is one VAE factor (here 1) of it; one frame.
        return QwenImagePipeline._unpack_latents(out[:, : (h // 2) * (w // 2)], h, w, 1)[:, :, 0]


@dataclass(frozen=True)
class Krea2Call:
    """Krea 2's transformer, called as ``Krea2Pipeline`` calls it: the latents packed into 2x2 patches, the
    text's zero position ids then each patch's (0, row, column), Qwen3-VL's stacked layers with their mask, the
    timestep on the 0-1 scale. Guidance above it gives Krea's cond + g * (cond - uncond) at CFG scale 1 + g."""

    transformer: Any
    embeds: torch.Tensor  # rows x tokens x layers x dim
    mask: torch.Tensor  # rows x tokens, True at a prompt's block's real tokens

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        # Krea2Pipeline's own packing is an instance method (its patch_size, 2); QwenImagePipeline's static
        # one packs 2x2 patches the same way.
        from diffusers import Krea2Pipeline, QwenImagePipeline

        n, channels, h, w = x.shape
        packed = QwenImagePipeline._pack_latents(x, n, channels, h, w)
        ids = Krea2Pipeline.prepare_position_ids(self.embeds.shape[1], h // 2, w // 2, x.device)
        with torch.no_grad():
            out = self.transformer(
                hidden_states=packed, encoder_hidden_states=self.embeds, timestep=(t / 1000).expand(n).to(x.dtype),
                position_ids=ids, encoder_attention_mask=self.mask, return_dict=False,
            )[0]
        return QwenImagePipeline._unpack_latents(out, h, w, 1)[:, :, 0]


@dataclass(frozen=True)
class PromptSteps:
    """Prompt editing and alternation: ``calls[k]`` runs up to and including step ``end_steps[k]``
    (A1111's lookup, :func:`~lienzo.generation.prompt_schedule.schedule_index`)."""

    end_steps: tuple[int, ...]
    calls: tuple[Denoiser, ...]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return self.calls[schedule_index(self.end_steps, step)](x, t, step)


@dataclass(frozen=True)
class SwitchAt:
    """A1111's refiner: ``first`` (the model's denoiser) before step ``at``, ``then`` (the refiner's) from it on."""

    at: int
    first: Denoiser
    then: Denoiser

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return (self.first if step < self.at else self.then)(x, t, step)


@dataclass(frozen=True)
class ImageGroups:
    """Images whose conditioning cannot share one call (dynamic prompts of different lengths): each call
    gets its rows of the batch (``rows[k]``, in the order it was built for) and the rows go back in place."""

    rows: tuple[tuple[int, ...], ...]
    calls: tuple[Denoiser, ...]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        out = None
        for rows, call in zip(self.rows, self.calls, strict=True):
            index = torch.tensor(rows, device=x.device)
            pred = call(x[index], t, step)
            if out is None:
                out = pred.new_empty((x.shape[0], *pred.shape[1:]))
            out[index] = pred
        return out


@dataclass(frozen=True)
class InpaintChannels:
    """Inpainting models take 9 channels: the latents, then the mask and the masked image's latents."""

    inner: Denoiser
    extra: torch.Tensor  # mask and masked latents, one row per row the inner denoiser is called with

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return self.inner(torch.cat([x, self.extra], dim=1), t, step)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (Ho and Salimans 2022): both predictions from one doubled batch. ``rescale``
    (Qwen-Image's true CFG) gives each 2x2 patch of the result the norm the conditional prediction has there."""

    inner: Denoiser
    scale: float
    rescale: bool = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        uncond, cond = self.inner(torch.cat([x, x]), t, step).chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        return guided * (_patch_norm(cond) / _patch_norm(guided)) if self.rescale else guided


def _patch_norm(x: torch.Tensor) -> torch.Tensor:
    """The norm of each 2x2 patch's channels (QwenImagePipeline's norm over a packed token), at each of its pixels."""
    sums = torch.nn.functional.avg_pool2d(x.square(), 2, divisor_override=1).sum(1, keepdim=True)
    return sums.sqrt().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


@dataclass(frozen=True)
class Composition:
    """AUTOMATIC1111's composable prompts (after Liu et al., "Compositional Visual Generation with
    Composable Diffusion Models", ECCV 2022): a conditional row per subprompt, all in one model pass.

    Guided: ``uncond + scale * sum_k(weight_k * (cond_k - uncond))`` for each image, A1111's
    ``combine_denoised``; one term of weight 1 is exactly :class:`Guidance`. Unguided (CFG scale 1 or
    less: no unconditional row) the weighted mean ``sum_k(weight_k * cond_k) / sum_k(weight_k)``, which
    is A1111's result at scale 1 when the weights add up to 1 and keeps ``a AND a`` equal to ``a``
    otherwise (a plain sum would double the predicted noise); the engine refuses weights adding up to
    0 or less there. Terms are added one by one in a fixed order, so the result is reproducible."""

    inner: Denoiser
    owners: tuple[int, ...]  # the image of each conditional row
    weights: tuple[float, ...]  # the weight of each conditional row
    scale: float
    guided: bool

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        n = x.shape[0]
        rows = x[torch.tensor(self.owners, device=x.device)]
        out = self.inner(torch.cat([x, rows]) if self.guided else rows, t, step)
        terms = zip(self.owners, self.weights, strict=True)
        if self.guided:
            uncond, cond = out[:n], out[n:]
            delta = torch.zeros_like(uncond)
            for row, (image, weight) in enumerate(terms):
                delta[image] += weight * (cond[row] - uncond[image])
            return uncond + self.scale * delta
        combined = out.new_zeros((n, *out.shape[1:]))
        totals = [0.0] * n
        for row, (image, weight) in enumerate(terms):
            combined[image] += weight * out[row]
            totals[image] += weight
        return combined / torch.tensor(totals, dtype=out.dtype, device=out.device).view(-1, *[1] * (out.ndim - 1))


def build_denoiser(components: Components, plan: BatchPlan, mask: LatentMask | None, control: ControlStack | None = None) -> Denoiser:
    """The denoiser for one batch: a fresh one each batch, as DeepCache's cache must not outlive it. ``control``:
    the batch's ControlNet units at its size."""
    images = plan.image_prompts()
    # The image each conditional row belongs to: one row per image, or per subprompt of a composed prompt.
    owners = tuple(index for index, (pos, _) in enumerate(images) for _ in pos.terms)
    composed = any(isinstance(pos, ComposedPrompt) for pos, _ in images)
    denoiser = _network_call(components, plan, owners, control)
    if mask is not None and mask.masked_latents is not None:
        extra = torch.cat([mask.mask, mask.masked_latents], dim=1)
        # Guidance (or composition) lays out the rows before this layer sees them: the extra channels follow.
        cond = extra[torch.tensor(owners, device=extra.device)] if composed else extra
        denoiser = InpaintChannels(denoiser, torch.cat([extra, cond]) if plan.guided else cond)
    if composed:
        weights = tuple(weight for pos, _ in images for _, weight in pos.terms)
        denoiser = Composition(denoiser, owners, weights, plan.cfg_scale, plan.guided)
    elif plan.guided:
        denoiser = Guidance(denoiser, plan.cfg_scale, components.spec.cfg_norm_rescale)
    return denoiser


def _network_call(components: Components, plan: BatchPlan, owners: tuple[int, ...], control: ControlStack | None) -> Denoiser:
    """The innermost layer: the family's network with the batch's conditioning; another architecture
    (a transformer family) brings its own call and conditioning here, and the layers above stay."""
    images = plan.image_prompts()
    # Dynamic prompts can give the images of a batch prompts of different lengths (75 tokens a chunk):
    # their conditioning cannot be stacked, so each length gets its own call, padded as it would be alone.
    groups: dict[int, list[int]] = {}
    for index, (pos, _) in enumerate(images):
        groups.setdefault(pos.chunks, []).append(index)
    calls = tuple(_prompt_call(components, plan, [images[i] for i in indices], control) for indices in groups.values())
    if len(calls) == 1:
        return calls[0]
    n = plan.batch_size
    rows = []
    for indices in groups.values():
        cond = [row for row, image in enumerate(owners) if image in indices]
        rows.append((*indices, *(n + row for row in cond)) if plan.guided else tuple(cond))
    return ImageGroups(tuple(rows), calls)


def _prompt_call(
    components: Components, plan: BatchPlan, images: list[tuple[PromptSchedule | ComposedPrompt, PromptSchedule]],
    control: ControlStack | None,
) -> Denoiser:
    """The call for images whose conditioning stacks: one :class:`UNetCall` per stretch of steps where
    every image's prompt (every subprompt of a composed one) and, guided, negative prompt stays the same."""
    # Fast mode: one full U-Net pass every few steps, the deep features reused in between (DeepCache);
    # one cache per call group, as its features are that group's rows. (The engine refuses it elsewhere.)
    unet = DeepCacheUNet(components.unet) if plan.fast and components.unet is not None else components.unet
    # Every call shares the U-Net, so DeepCache's cache carries across a change of prompt.
    schedules = [
        schedule for pos, neg in images for schedule in (*(term for term, _ in pos.terms), *((neg,) if plan.guided else ()))
    ]
    end_steps = sorted({end for schedule in schedules for end in schedule.end_steps})
    calls: dict[tuple, UNetCall] = {}  # alternation repeats texts: one call (and tensor) per set of them
    stretches = []
    for end in end_steps:
        pairs = [(tuple(term.at(end) for term, _ in pos.terms), neg.at(end) if plan.guided else None) for pos, neg in images]
        key = tuple((tuple(map(id, conds)), id(neg) if plan.guided else 0) for conds, neg in pairs)
        if key not in calls:
            calls[key] = _call(components, plan, pairs, unet, control)
        stretches.append(calls[key])
    if len(calls) == 1:
        return stretches[0]
    return PromptSteps(tuple(end_steps), tuple(stretches))


def _call(components: Components, plan: BatchPlan, pairs, unet, control: ControlStack | None) -> Denoiser:
    """The family's network with the conditioning of ``pairs`` (one (prompts, negative) pair per image)."""
    if not components.spec.is_transformer:
        return UNetCall(unet, *_unet_conditioning(components, plan, pairs), control, len(pairs) if plan.guided else 0)
    # Every row's conditioning, [uncond..., cond...], in the network's dtype.
    rows = [pos for conds, _ in pairs for pos in conds]
    if plan.guided:
        rows = [neg for _, neg in pairs] + rows
    device, dtype = components.execution_device, components.transformer.dtype
    if components.family == "zimage":  # sequences as long as their prompts: a list, not one tensor
        return ZImageCall(components.transformer, tuple(row.embeds[0].to(device=device, dtype=dtype) for row in rows))

    def stacked(part: str) -> torch.Tensor:  # ``embeds``, ``pooled`` or ``mask`` of each row's PromptEmbeddings
        return torch.cat([getattr(row, part) for row in rows]).to(device=device, dtype=dtype)

    if components.family == "flux2":
        return Flux2Call(components.transformer, stacked("embeds"), plan.references)
    if components.family == "krea2":  # one fixed-length block a prompt: they stack, the mask kept boolean
        return Krea2Call(components.transformer, stacked("embeds"), torch.cat([row.mask for row in rows]).to(device))
    if components.family == "chroma":
        return ChromaCall(components.transformer, stacked("embeds"), stacked("mask"))
    if components.family in ("qwenimage", "qwenimage_edit"):  # sequences as long as their prompts: zero-padded, masked
        longest = max(row.embeds.shape[1] for row in rows)
        embeds = torch.cat([pad(row.embeds, (0, 0, 0, longest - row.embeds.shape[1])) for row in rows])
        embeds = embeds.to(device=device, dtype=dtype)
        mask = torch.cat([pad(row.mask, (0, longest - row.mask.shape[1])) for row in rows]).to(device=device)
        return QwenImageCall(components.transformer, embeds, None if mask.all() else mask, plan.references)
    if components.family == "sd3":
        return SD3Call(components.transformer, stacked("embeds"), stacked("pooled"))
    guidance = None
    if components.guidance_embeds:
        guidance = torch.full((len(rows),), plan.distilled_cfg_scale, dtype=torch.float32, device=device)
    if control is not None:  # the maps VAE-encoded once for this call's steps
        control = control.encoded(components.vae)
    return FluxCall(components.transformer, stacked("embeds"), stacked("pooled"), guidance, control, len(pairs) if plan.guided else 0)


def _unet_conditioning(
    components: Components, plan: BatchPlan, pairs: list[tuple[tuple[PromptEmbeddings, ...], PromptEmbeddings]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Prompt embeddings for the images (one (prompts, negative) pair each: a prompt per subprompt),
    [uncond..., cond...] as diffusers orders them, and SDXL's micro-conditioning: pooled text embeddings
    (of the same step's prompts, as A1111 has them) and (original size, crop, target size) ids; the SDXL
    refiner's end in an aesthetic score instead of the target size, 6 for the prompt's rows and 2.5 for the
    negative's (A1111's refiner defaults, StableDiffusionXLImg2ImgPipeline's aesthetic_score and negative_aesthetic_score)."""
    device, dtype, n = components.execution_device, components.unet.dtype, len(pairs)
    embeds = torch.cat([pos.embeds for conds, _ in pairs for pos in conds])
    rows = embeds.shape[0]
    if plan.guided:
        embeds = torch.cat([torch.cat([neg.embeds for _, neg in pairs]), embeds])
    embeds = embeds.to(device=device, dtype=dtype)
    if components.family not in ("sdxl", "sdxl_refiner"):
        return embeds, None
    cv = plan.canvas
    size_crop = [cv.height, cv.width, 0, 0]
    if components.family == "sdxl_refiner":
        cond, uncond = size_crop + [6.0], size_crop + [2.5]
    else:
        cond = uncond = size_crop + [cv.height, cv.width]
    pooled = torch.cat([pos.pooled for conds, _ in pairs for pos in conds])
    ids = torch.tensor([cond], dtype=dtype, device=device).repeat(rows, 1)
    if plan.guided:
        pooled = torch.cat([torch.cat([neg.pooled for _, neg in pairs]), pooled])
        ids = torch.cat([torch.tensor([uncond], dtype=dtype, device=device).repeat(n, 1), ids])
    return embeds, {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids}
