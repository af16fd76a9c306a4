"""How good is a trained model: Fréchet distance in a domain network's features, prompt accuracy, memorisation.

Inception weights (FID's network) are not available offline, so the features come from a small
classifier trained here on the training split's labels (for OpenMoji: the subgroup), as FID does
with Inception's penultimate layer (Heusel et al. 2017). The same network's predictions give prompt
accuracy, and nearest neighbours in its features give the memorisation check.
"""

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lienzo.generation.engine import generate, native_size
from lienzo.generation.request import build_request

EVAL_SIZE = 64  # pixels per side the classifier sees; enough to tell emoji subgroups apart


class DomainClassifier(nn.Module):
    """Four conv blocks, global average pool, then a linear layer; ``features`` is the pooled vector."""

    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for mult in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, width * mult, 3, padding=1), nn.BatchNorm2d(width * mult), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width * mult
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def to_batch(images) -> Tensor:
    """PIL images → float tensor N x 3 x 64 x 64 in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((EVAL_SIZE, EVAL_SIZE)), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def train_classifier(images: Tensor, labels: Tensor, classes: int, *, epochs: int = 8, seed: int = 0, batch_size: int = 64) -> DomainClassifier:
    """Plain supervised training with AdamW and random horizontal shifts; deterministic for a seed."""
    torch.manual_seed(seed)
    model = DomainClassifier(classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4, foreach=True)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            shift = int(torch.randint(-4, 5, (), generator=g))
            x = torch.roll(images[index], shifts=shift, dims=3)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def embed(model: DomainClassifier, images: Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and predicted classes."""
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start : start + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between Gaussians fitted to two feature sets.

    The trace of the matrix square root is taken from the eigenvalues of Σa^½ Σb Σa^½ (symmetric,
    so numpy's eigh suffices and scipy is not needed).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


@dataclass
class Memorisation:
    share: float  # of generated images whose nearest training image is closer than the threshold
    threshold: float
    closest: list[tuple[int, int, float]]  # (generated index, training index, distance), closest first


def memorisation(generated: np.ndarray, training: np.ndarray, threshold: float, top: int = 5) -> Memorisation:
    """Nearest training neighbour of each generated image by cosine distance in feature space."""
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True).clip(1e-12)
    t = training / np.linalg.norm(training, axis=1, keepdims=True).clip(1e-12)
    distance = 1 - g @ t.T
    nearest = distance.argmin(axis=1)
    best = distance[np.arange(len(g)), nearest]
    order = np.argsort(best)[:top]
    return Memorisation(
        share=float((best < threshold).mean()),
        threshold=threshold,
        closest=[(int(i), int(nearest[i]), float(best[i])) for i in order],
    )


def collapsed(features: np.ndarray, seeds: int, threshold: float) -> float:
    """The share of same-prompt pairs closer to each other than ``threshold`` (cosine distance).

    ``features`` holds ``seeds`` consecutive rows per prompt. A model that draws the same picture
    whatever the seed scores 1; one whose seeds give different pictures scores near 0.
    """
    f = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    groups = f.reshape(-1, seeds, f.shape[1])
    distance = 1 - groups @ groups.transpose(0, 2, 1)
    upper = np.triu_indices(seeds, k=1)
    return float((distance[:, upper[0], upper[1]] < threshold).mean())


@dataclass
class EvalRow:
    name: str
    frechet: float
    prompt_accuracy: float
    memorised: float
    collapsed: float | None = None  # of same-prompt pairs over seeds; None for rows of real images


@dataclass
class EvalReport:
    rows: list[EvalRow]
    threshold: float
    images: int  # held-out captions evaluated
    diversity: tuple[int, int]  # (prompts, seeds per prompt) of the collapse check
    classifier_accuracy: float  # on the held-out real images: how far prompt accuracy can be trusted
    closest: list[tuple[str, str, float]]  # (caption, nearest training file, distance) of the closest generated images

    def table(self) -> str:
        lines = [f"{'':30} {'Fréchet distance':>17} {'prompt accuracy':>16} {'memorised':>10} {'collapsed':>10}"]
        for r in self.rows:
            lines.append(f"{r.name:30} {r.frechet:>17.2f} {r.prompt_accuracy:>16.1%} {r.memorised:>10.1%} {_share(r.collapsed):>10}")
        return "\n".join(lines)

    def markdown(self, how: str) -> str:
        """The report as a model card's section body; ``how`` says how it was made (command, settings)."""
        lines = ["| | Fréchet distance | prompt accuracy | memorised | collapsed |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.name} | {r.frechet:.2f} | {r.prompt_accuracy:.1%} | {r.memorised:.1%} | {_share(r.collapsed)} |" for r in self.rows]
        lines += [
            "", f"{how}. {self.images} held-out captions, one image each. Fréchet distance and prompt accuracy use the "
            "penultimate features and subgroup predictions of a small classifier trained on the training split "
            f"(its accuracy on the held-out real images: {self.classifier_accuracy:.1%}); memorised is the share of "
            f"images whose nearest training image is within cosine distance {self.threshold} in those features; collapsed is "
            f"the share of same-prompt pairs within that distance of each other, over {self.diversity[0]} held-out captions "
            f"x {self.diversity[1]} seeds.",
        ]
        return "\n".join(lines)


def evaluate_openmoji(components, data, *, untrained=None, limit: int | None = None, steps: int = 20, cfg_scale: float = 5.0,
                      seed: int = 0, classifier_epochs: int = 8, threshold: float = 0.01, diversity: tuple[int, int] = (20, 4),
                      progress=None) -> EvalReport:
    """Evaluate a model on a prepared OpenMoji folder (``lienzo dataset openmoji``) against its held-out split.

    Rows: the model (held-out real vs images generated from the held-out captions), the floor (held-out
    real vs training real) and, with ``untrained``, the ceiling (a randomly initialised model of the
    same architecture). ``memorised`` is the share of images whose nearest training image (cosine
    distance of classifier features) is closer than ``threshold``; ``collapsed`` the share of pairs of
    images of one prompt closer than that to each other, over ``diversity`` = (prompts, seeds) held-out
    captions spread evenly over the split.
    """
    # 1. The splits and their labels (subgroups).
    data = Path(data)
    index = json.loads((data / "openmoji-index.json").read_text())["images"]
    train = [e for e in index if e["split"] == "train" and (data / e["path"]).is_file()]
    held = [e for e in index if e["split"] == "holdout"][:limit]
    classes = sorted({e["subgroup"] for e in train})
    label = {c: i for i, c in enumerate(classes)}
    load = lambda entries: to_batch(Image.open(data / e["path"]) for e in entries)  # noqa: E731
    train_x, held_x = load(train), load(held)
    held_y = np.array([label.get(e["subgroup"], -1) for e in held])

    # 2. The domain network, trained on the training split only.
    classifier = train_classifier(train_x, torch.tensor([label[e["subgroup"]] for e in train]), len(classes), epochs=classifier_epochs, seed=seed)
    train_f, _ = embed(classifier, train_x)
    held_f, held_pred = embed(classifier, held_x)

    def row(name: str, features: np.ndarray, predicted: np.ndarray) -> EvalRow:
        check = memorisation(features, train_f, threshold)
        return EvalRow(name, frechet_distance(held_f, features), float((predicted == held_y).mean()), check.share)

    # One image per held-out caption (seed + its position), then the collapse check's prompts x seeds.
    prompts, seeds = diversity
    spread = held[:: max(1, len(held) // prompts)][:prompts]
    jobs = [(e["caption"], seed + i) for i, e in enumerate(held)]
    jobs += [(e["caption"], seed + 10_000 + k) for e in spread for k in range(seeds)]

    def generated(model, name: str):
        side = max(64, native_size(model))
        images = []
        for i, (caption, image_seed) in enumerate(jobs):
            request = build_request(prompt=caption, steps=steps, cfg_scale=cfg_scale, seed=image_seed, width=side, height=side)
            images.append(generate(model, request).images[0].image)
            if progress is not None:
                progress(name, i + 1, len(jobs))
        features, predicted = embed(classifier, to_batch(images))
        return features[: len(held)], predicted[: len(held)], collapsed(features[len(held) :], seeds, threshold)

    def generated_row(name: str, label: str, model) -> tuple[EvalRow, np.ndarray]:
        features, predicted, collapse = generated(model, label)
        return dataclasses.replace(row(name, features, predicted), collapsed=collapse), features

    # 3. Rows: the model, the floor, the ceiling.
    model_row, model_f = generated_row("model (generated vs held-out)", "model", components)
    rows = [model_row,
            EvalRow("floor (held-out vs training)", frechet_distance(held_f, train_f), float((held_pred == held_y).mean()),
                    memorisation(held_f, train_f, threshold).share)]
    if untrained is not None:
        rows.append(generated_row("ceiling (untrained model)", "untrained", untrained)[0])
    closest = memorisation(model_f, train_f, threshold).closest
    return EvalReport(rows, threshold, len(held), (len(spread), seeds), float((held_pred == held_y).mean()),
                      [(held[g]["caption"], train[t]["path"], d) for g, t, d in closest])


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def untrained_like(components, seed: int = 0):
    """The same architecture with fresh random weights: the ceiling of the evaluation."""
    torch.manual_seed(seed)
    fresh = copy.copy(components)
    fresh.unet = type(components.unet).from_config(components.unet.config).eval()
    fresh.vae = type(components.vae).from_config(components.vae.config).eval()
    fresh.text_encoder = type(components.text_encoder)(components.text_encoder.config).eval()
    return fresh
