"""The dependency set: pyproject's bounds, the pins in constraints.txt, and what is installed agree."""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in declared]


def test_every_dependency_is_pinned_within_its_bounds():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is a dependency but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_the_installed_libraries_are_the_pinned_ones():
    """CI and the README install with -c constraints.txt; a drift here means a new release slipped in."""
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        installed = Version(importlib.metadata.version(name))
        # A local label (torch's +cpu / +cu128) is the same release built for another device.
        assert Version(installed.public) == pins[name], f"{name} {installed} is installed, constraints.txt pins {pins[name]}"


def test_installed_peft_is_new_enough_for_installed_transformers():
    """transformers refuses LoRAs (lienzo train --lora, re-reading a changed LoRA) with an older peft."""
    from transformers.integrations import peft as transformers_peft

    wanted = Version(transformers_peft.MIN_PEFT_VERSION)
    assert Version(importlib.metadata.version("peft")) >= wanted
