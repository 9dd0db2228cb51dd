"""Shared fixtures: the tiny simbrain, written once per test session.

Test problems are small (tiny stores, 32-px images, ridge on hundreds of rows): one BLAS/OpenMP
thread per process does them as fast as two on an idle machine, and on a shared one it avoids
threads spinning against each other, which made single tests 10-30x slower (a banded ridge test
took 752 s with the default threads under load, 22 s with one). Set here, before numpy or torch is
imported, and inherited by the ``brainenc`` child processes the tests start; a value the user
set is kept.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_brain(tmp_path_factory) -> dict[str, Path]:
    """{"simbrain7t": Path, "simbrain3t": Path} — the tiny preset, seed 0."""
    from brainenc.data.simbrain import simulate

    return simulate(preset="tiny", out=tmp_path_factory.mktemp("simbrain") / "simbrain-tiny", seed=0)
