"""Settings: defaults with no configuration, a YAML or TOML file, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cargohold.config import CONFIG_ENV, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CARGOHOLD_"):
            monkeypatch.delenv(key)


def test_defaults_give_a_working_local_registry() -> None:
    settings = load_settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 5000)
    assert settings.data_dir == Path("cargohold-data")
    assert settings.storage.backend == "filesystem"
    assert settings.blob_root == Path("cargohold-data/blobs")
    assert settings.uploads.expiry_hours == 24
    assert settings.limits.manifest_max_bytes == 4 * 1024 * 1024


def test_yaml_file_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cargohold.yaml"
    config.write_text("address: 0.0.0.0:6000\nworkers: 3\nuploads:\n  expiry_hours: 2\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("CARGOHOLD_UPLOADS__EXPIRY_HOURS", "6")
    settings = load_settings()
    assert settings.port == 6000 and settings.workers == 3
    assert settings.uploads.expiry_hours == 6  # the environment wins over the file


def test_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "cargohold.toml"
    config.write_text('data_dir = "/srv/registry"\n[storage.filesystem]\nroot = "/mnt/blobs"\n')
    settings = load_settings(config)
    assert settings.metadata_path == Path("/srv/registry/metadata.db")
    assert settings.blob_root == Path("/mnt/blobs")


@pytest.mark.parametrize(
    "text", ["address: nowhere\n", "workers: 0\n", "unknown_key: 1\n", "uploads:\n  expiry_hours: -1\n"]
)
def test_invalid_settings_are_refused(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValidationError):
        load_settings(config)
