"""lienzo vs diffusers' StableDiffusionPipeline on one random-weight SD 1.5-architecture model, CPU.

Same components, sampler, steps, seed and size for both, alternating runs in one process; prints
median seconds per image, the ratio, and the peak resident memory each added while generating
(sampled from /proc every 5 ms, Linux). Weights are random: speed does not depend on their values.

    python benchmarks/generate.py [--size 256] [--steps 4] [--repeats 3] [--sampler Euler]
"""

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lienzo.generation import engine  # noqa: E402
from lienzo.generation.request import build_request  # noqa: E402
from lienzo.generation.samplers import build_scheduler, resolve_sampler  # noqa: E402
from lienzo.models.components import Components  # noqa: E402
from lienzo.models.single_file import bundled_tokenizer, scheduler_config_for  # noqa: E402


def sd15_components() -> Components:
    """SD 1.5's published architecture (860M UNet, ViT-L/14 text encoder, 84M VAE), random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
        )
    )
    return Components(unet.eval(), vae.eval(), text.eval(), bundled_tokenizer("<|endoftext|>"), scheduler_config_for("epsilon"), "sd1")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled in a background thread."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", default="Euler")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    components = sd15_components()
    sampler = resolve_sampler(args.sampler)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=components.unet,
        scheduler=build_scheduler(sampler, "Uniform", components.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt = "a lighthouse at dusk, oil painting"
    request = build_request(prompt=prompt, steps=args.steps, sampler=sampler.name, schedule="Uniform", seed=1, width=args.size, height=args.size)

    def run_lienzo():
        return engine.generate(components, request).images[0].pixels

    def run_diffusers():
        generator = torch.Generator().manual_seed(1)
        return pipe(
            prompt, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size, width=args.size,
            generator=generator, output_type="np",
        ).images[0]

    runs = {"lienzo": run_lienzo, "diffusers": run_diffusers}
    times = {name: [] for name in runs}
    peaks = {name: [] for name in runs}
    outputs = {}
    for name, fn in runs.items():  # warm-up: first-call allocations and kernel selection
        outputs[name] = fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            with PeakRSS() as mem:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            peaks[name].append(mem.added_mib)

    print(f"SD 1.5 architecture, random weights, CPU ({torch.get_num_threads()} threads), {args.size}x{args.size}, "
          f"{args.steps} steps {sampler.name}, CFG 7, batch 1, {args.repeats} runs each after one warm-up")
    print(f"{'':10} {'median s/image':>15} {'min':>8} {'max':>8} {'peak MiB added':>15}")
    for name in runs:
        t = times[name]
        print(f"{name:10} {statistics.median(t):15.2f} {min(t):8.2f} {max(t):8.2f} {max(peaks[name]):15.0f}")
    ratio = statistics.median(times["lienzo"]) / statistics.median(times["diffusers"])
    print(f"lienzo / diffusers time ratio: {ratio:.3f}")
    print(f"max abs pixel difference between the two: {abs(outputs['lienzo'] - outputs['diffusers']).max():.2e}")


if __name__ == "__main__":
    main()
