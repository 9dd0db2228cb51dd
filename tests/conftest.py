"""Shared fixtures: the tiny simbrain, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_brain(tmp_path_factory) -> dict[str, Path]:
    """{"simbrain7t": Path, "simbrain3t": Path} — the tiny preset, seed 0."""
    from brainenc.data.simbrain import simulate

    return simulate(preset="tiny", out=tmp_path_factory.mktemp("simbrain") / "simbrain-tiny", seed=0)
