"""Shared fixtures: tiny random models in the real on-disk formats, built once per test session."""

import os

# Set before diffusers/transformers are imported anywhere: any attempt to reach a hub fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker: two workers with two threads each on two cores thrash. The CLIs and
    # servers the tests start inherit it (torch reads OMP_NUM_THREADS when no --threads is given).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _hide_shipped_model(request, monkeypatch, tmp_path_factory):
    """Tests choose their own tiny models: the shipped lienzo-mini stays out of the default-model
    choice unless a test is marked ``shipped`` (subprocesses get ``LIENZO_DEFAULT_MODEL`` instead)."""
    if "shipped" in request.keywords:
        return
    from lienzo.models import registry

    # The seam is the folder, not the function: every caller asks registry.embedded_model(), which reads
    # EMBEDDED when called, whereas a patched embedded_model would miss modules that imported it by name
    # (lienzo.studio does). A folder without model_index.json is "this install ships no model".
    monkeypatch.setattr(registry, "EMBEDDED", tmp_path_factory.getbasetemp() / "no-shipped-model")
    assert registry.embedded_model() is None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir holding one tiny SD 1.x checkpoint (``tiny-sd15``); modules may define their own."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("lienzo-home")
    (root / "models").mkdir()
    save_single_file(build_tiny("sd1"), root / "models" / "tiny-sd15.safetensors")
    return root


@pytest.fixture
def lienzo(home, tmp_path):
    """Run the CLI on ``home``'s models with outputs in ``tmp_path/out``; checks the exit code."""
    from click.testing import CliRunner

    from lienzo.cli import app

    runner = CliRunner()

    def run(*args, code=0):
        base = ["--models-dir", str(home / "models"), "--data-dir", str(home / "data"), "--outputs-dir", str(tmp_path / "out")]
        result = runner.invoke(app, [*base, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output + result.stderr
        return result

    return run
