"""Typed settings: explicit arguments (CLI flags), then LIENZO_* environment variables, then per-user defaults."""

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _data_dir() -> Path:
    return Path(platformdirs.user_data_dir("lienzo", appauthor=False))


class Settings(BaseSettings):
    """Where lienzo keeps things. ``models_dir`` and ``outputs_dir`` default to folders inside ``data_dir``."""

    model_config = SettingsConfigDict(env_prefix="LIENZO_", extra="ignore")

    data_dir: Path = Field(default_factory=_data_dir)
    models_dir: Path | None = None
    outputs_dir: Path | None = None
    default_model: str | None = None  # a name or path; unset: the model lienzo ships
    device: str = "auto"
    dtype: str = "auto"

    def model_post_init(self, _context) -> None:
        self.data_dir = self.data_dir.expanduser()
        self.models_dir = (self.models_dir or self.data_dir / "models").expanduser()
        self.outputs_dir = (self.outputs_dir or self.data_dir / "outputs").expanduser()

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"
