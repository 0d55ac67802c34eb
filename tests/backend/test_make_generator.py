"""Loading a generator by name inside the loop: weights from the environment, clear errors, no hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.generators.reproject import ReprojectGenerator
from backend.loop import make_generator


def test_weightless_generator_is_built_from_defaults() -> None:
    assert isinstance(make_generator("reproject", "cpu"), ReprojectGenerator)


def test_unknown_generator_lists_known_names() -> None:
    with pytest.raises(ValueError, match="known: anyrecon, refine, reproject"):
        make_generator("nope", "cpu")


def test_missing_weights_name_the_variable_and_never_download(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECONLOOP_ANYRECON_WEIGHTS", str(tmp_path / "no_such_folder"))
    monkeypatch.delenv("RECONLOOP_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(RuntimeError, match="RECONLOOP_ANYRECON_WEIGHTS") as info:
        make_generator("anyrecon", "cpu")
    assert "no_such_folder" in str(info.value)
