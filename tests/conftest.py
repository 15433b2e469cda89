"""Shared fixtures: the tiny offline SD model and a real S3 HTTP endpoint (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers pipeline with random weights, built once per test session."""
    from lorapipe.models import build_sd

    return build_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0, preset="tiny")
