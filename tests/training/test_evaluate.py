"""Evaluation maths: Fréchet distance, the domain classifier, the memorisation check."""

import numpy as np
import pytest
import torch
from PIL import Image

from lienzo.training.evaluate import collapsed, embed, frechet_distance, memorisation, to_batch, train_classifier


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (40000, 3))
    b = rng.normal([1, 0, 2], [1, 2, 0.5], (40000, 3))
    # |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 = 5 + (0 + 1 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(6.25, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_classifier_separates_colours_and_embeds():
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(48):
        colour = [(220, 40, 40), (40, 40, 220), (40, 200, 40)][i % 3]
        array = np.clip(rng.normal(colour, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(array))
        labels.append(i % 3)
    x, y = to_batch(images), torch.tensor(labels)
    assert x.shape == (48, 3, 64, 64) and -1 <= x.min() and x.max() <= 1
    model = train_classifier(x, y, 3, epochs=6, batch_size=16)
    features, predicted = embed(model, x)
    assert features.shape == (48, 256) and (predicted == y.numpy()).mean() == 1.0


def test_memorisation_flags_a_copy_and_passes_a_fresh_image():
    rng = np.random.default_rng(1)
    training = rng.normal(size=(50, 16))
    generated = np.stack([training[7] * 1.0, rng.normal(size=16)])
    check = memorisation(generated, training, threshold=0.02)
    assert check.share == 0.5
    assert check.closest[0][:2] == (0, 7) and check.closest[0][2] == pytest.approx(0, abs=1e-9)
    assert check.closest[1][2] > 0.02


def test_collapse_counts_same_prompt_pairs_that_look_alike():
    """Two prompts x 3 seeds: the first prompt's seeds give one picture (3 of 3 pairs alike), the second's
    three different ones (0 of 3): half the pairs are collapsed. Pairs across prompts are not counted."""
    rng = np.random.default_rng(2)
    same = rng.normal(size=16)
    features = np.stack([same, same * 2.0, same + 1e-4, *rng.normal(size=(3, 16))])
    assert collapsed(features, seeds=3, threshold=0.01) == 0.5
    assert collapsed(np.stack([same] * 6), seeds=3, threshold=0.01) == 1.0
    assert collapsed(rng.normal(size=(8, 16)), seeds=4, threshold=0.01) == 0.0


def test_eval_on_a_prepared_openmoji_folder(tmp_path):
    """End to end on a tiny package and a tiny model folder: three rows, numbers in range, a JSON report,
    and the table written into the model card in place of an older one."""
    import json

    from click.testing import CliRunner
    from test_openmoji import _package

    from lienzo.cli import app
    from lienzo.training.openmoji import prepare_openmoji
    from tiny_models import build_tiny, save_diffusers_folder

    prepare_openmoji(_package(tmp_path / "om.tgz"), tmp_path / "om", size=64, holdout=0.25)
    model = save_diffusers_folder(build_tiny("sd1"), tmp_path / "tiny")
    (model / "README.md").write_text("# tiny\n\n## Data\n\nsome emoji\n\n## Evaluation\n\nan old table\n\n## Known limits\n\nmany\n")
    args = ["--data-dir", str(tmp_path / "home"), "eval", "-m", str(model), "--data", str(tmp_path / "om"),
            "--steps", "2", "--classifier-epochs", "2", "--diversity", "3", "2", "--json", str(tmp_path / "report.json"), "--card"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"].split()[0] for r in report["rows"]] == ["model", "floor", "ceiling"]
    assert report["images"] == 6 and report["diversity"] == [3, 2]
    for r in report["rows"]:
        assert r["frechet"] >= 0 and 0 <= r["prompt_accuracy"] <= 1 and 0 <= r["memorised"] <= 1
    assert report["rows"][1]["collapsed"] is None and 0 <= report["rows"][0]["collapsed"] <= 1
    assert "Fréchet distance" in result.output and "closest:" in result.output
    card = (model / "README.md").read_text()
    assert "an old table" not in card and card.count("## Evaluation") == 1
    assert f"| floor (held-out vs training) | {report['rows'][1]['frechet']:.2f} |" in card and "| – |" in card
    assert "3 held-out captions x 2 seeds" in card and "--steps 2 --cfg 5.0" in card
    assert card.index("## Data") < card.index("## Evaluation") < card.index("## Known limits") and card.endswith("many\n")


def test_card_sections_are_replaced_added_and_kept():
    from lienzo.training.artifacts import keep_sections, sections, set_section

    card = "# m\n\n## Data\n\nimages\n\n## Recipe\n\n```toml\nseed = 0\n```\n"
    assert sections(card) == {"Data": "images", "Recipe": "```toml\nseed = 0\n```"}
    assert sections(set_section(card, "Data", "other")) == {"Data": "other", "Recipe": "```toml\nseed = 0\n```"}
    added = set_section(card, "Evaluation", "| a |")
    assert added.startswith(card.rstrip()) and sections(added)["Evaluation"] == "| a |"
    # the trainer writes its card again: what it does not write survives, what it writes is its own
    rewritten = keep_sections(card.replace("images", "more images"), added)
    assert sections(rewritten) == {"Data": "more images", "Recipe": "```toml\nseed = 0\n```", "Evaluation": "| a |"}
