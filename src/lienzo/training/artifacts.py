"""What a training run leaves on disk besides checkpoints: the loss log and plot, the exported model, its card."""

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window, even where a display exists
import matplotlib.pyplot as plt  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402

from lienzo import __version__  # noqa: E402
from lienzo.models.components import Components  # noqa: E402

LOSS_COLUMNS = ("stage", "step", "loss", "lr", "images_per_s", "seconds", "parts")


class LossLog:
    """``loss.csv``: one row per logged step. On resume, rows past the checkpoint are dropped (they are redone)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, stage_order: list[str], stage: str, step: int) -> None:
        if not self.path.is_file():
            return
        rank = stage_order.index(stage)
        rows = [r for r in self.rows() if (stage_order.index(r["stage"]), int(r["step"])) <= (rank, step)]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, stage: str, step: int, loss: float, lr: float, images_per_s: float, seconds: float, parts: dict) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS)
            if new:
                writer.writeheader()
            parts_text = " ".join(f"{k}={v:.6g}" for k, v in parts.items())
            writer.writerow(
                {"stage": stage, "step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                 "images_per_s": f"{images_per_s:.3f}", "seconds": f"{seconds:.1f}", "parts": parts_text}
            )

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))


def plot_losses(log: LossLog, path: Path) -> None:
    """One panel per stage, loss against step on a log scale."""
    if not log.path.is_file():
        return
    rows = log.rows()
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["stage"] == stage]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        ax.set_title(f"{stage} stage")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def export_diffusers(components: Components, out: Path) -> None:
    """Write ``components`` as a diffusers folder into ``out``: built in a temporary folder, then moved in."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline = StableDiffusionPipeline(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(tmp)
    # model_index.json last: until it is in place the folder is not taken for a model.
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")
    for entry in entries:
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()


@dataclass
class Compute:
    """What the run cost, accumulated across resumed sessions."""

    device: str
    processes: int
    mixed_precision: str
    seconds: float
    images_seen: dict[str, int]


def model_card(
    *,
    name: str,
    config_toml: str,
    data: dict,
    steps: dict[str, int],
    compute: Compute,
    base: str | None = None,
    finished: bool = True,
) -> str:
    """A README.md in the Hugging Face model-card layout: data and licence first, then recipe and compute."""
    licence = data.get("licence") or "unknown"
    labels = data.get("labels") or {}
    label_text = ", ".join(f"{k} ({v})" for k, v in sorted(labels.items())) or "none"
    kind = f"A LoRA fine-tune of {base}" if base else "A latent diffusion model trained from scratch"
    status = "" if finished else "\n> Training was stopped before the last step; resume it with `lienzo train --resume`.\n"
    hours = compute.seconds / 3600
    seen = ", ".join(f"{stage}: {n:,}" for stage, n in compute.images_seen.items())
    step_text = ", ".join(f"{stage}: {n:,}" for stage, n in steps.items())
    return f"""---
license: {json.dumps(licence)}
library_name: diffusers
tags: [lienzo, text-to-image, stable-diffusion-architecture]
---
# {name}

{kind}, made with lienzo {__version__}.
{status}
## Data

- Images: {data.get('images', 0):,} ({data.get('captioned', 0):,} with captions); labels: {label_text}
- Source: {data.get('source') or 'not stated'}
- Licence: {licence}{f" (from {data['licence_file']})" if data.get('licence_file') else ''}
{f"- Notice: {data['notice']}{chr(10)}" if data.get('notice') else ''}- Skipped files: {data.get('problems', 0)}; exact duplicates dropped: {data.get('duplicates', 0)}
- Manifest: `dataset_manifest.json` (sha256 `{data.get('sha256', '')}`): path, sha256, size, caption, label of every image.

The weights are derived from these images; their licence terms apply to the weights.

## Training

- Steps: {step_text}
- Images seen: {seen}

## Compute

- Device: {compute.device} x {compute.processes} process{'es' if compute.processes > 1 else ''}, mixed precision: {compute.mixed_precision}
- Wall time: {hours:.2f} h ({compute.seconds:,.0f} s)

## Recipe

```toml
{config_toml.strip()}
```
"""


def sections(card: str) -> dict[str, str]:
    """The ``## title`` sections of a markdown card, title to body."""
    found: dict[str, list[str]] = {}
    current = None
    for line in card.splitlines():
        if line.startswith("## "):
            current = found.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    return {title: "\n".join(body).strip() for title, body in found.items()}


def keep_sections(card: str, old: str) -> str:
    """``card`` plus the sections of ``old`` it lacks: what was added by hand or by ``lienzo eval --card``
    survives the trainer writing the card again."""
    for title, body in sections(old).items():
        if title not in sections(card):
            card = set_section(card, title, body)
    return card


def set_section(card: str, title: str, body: str) -> str:
    """``card`` (markdown) with its ``## title`` section replaced by ``body``, or added at the end."""
    lines = card.splitlines()
    heading = f"## {title}"
    if heading not in lines:
        return f"{card.rstrip()}\n\n{heading}\n\n{body.strip()}\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept = "\n".join(lines[end:])
    return "\n".join(lines[:start]) + f"\n{heading}\n\n{body.strip()}\n" + (f"\n{kept}\n" if kept else "")
