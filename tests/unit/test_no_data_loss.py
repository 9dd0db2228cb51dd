"""Nothing lost: simulation never writes over or beside what it did not create, and a refused
re-import leaves a valid store valid (issue 11, item 1)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import yaml  # noqa: E402

from brainenc.data.datamodule import BrainDataModule  # noqa: E402
from brainenc.data.importers import prepare  # noqa: E402
from brainenc.data.importers.base import SourceError  # noqa: E402
from brainenc.data.simbrain import simulate  # noqa: E402
from brainenc.data.simbrain.generate import IN_PROGRESS  # noqa: E402
from brainenc.data.store import Store, StoreError  # noqa: E402
from tests.fixtures.algonauts import write_algonauts  # noqa: E402


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture
def user_store(tiny_brain, tmp_path) -> Path:
    """A copy of a real store, named like a simbrain dataset, whose manifest.yaml is missing."""
    root = tmp_path / "stores" / "simbrain7t"
    shutil.copytree(tiny_brain["simbrain7t"], root)
    (root / "manifest.yaml").unlink()
    return root


def test_datamodule_refuses_to_simulate_over_a_store_without_manifest(user_store):
    before = _digests(user_store)
    dm = BrainDataModule(stores=[str(user_store)], simulate="tiny", image_size=32)
    with pytest.raises(StoreError, match=r"simbrain7t/manifest.yaml: field 'manifest.yaml'.*subj01.h5"):
        dm.prepare_data()
    with pytest.raises(StoreError, match="manifest.yaml"):
        dm.setup("fit")
    assert _digests(user_store) == before
    # nothing written beside it either (the preset's other dataset)
    assert sorted(p.name for p in user_store.parent.iterdir()) == ["simbrain7t"]


def test_cli_fit_refuses_and_leaves_the_store_alone(user_store, tmp_path):
    from brainenc.cli import main

    before = _digests(user_store)
    smoke = Path(__file__).resolve().parents[2] / "experiments/smoke/linear.yaml"
    with pytest.raises(StoreError, match="manifest.yaml"):
        main(["fit", "-c", str(smoke), f"--data.stores=[{user_store}]",
              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert _digests(user_store) == before


def test_mistyped_store_name_is_an_error_not_a_new_simulation(tmp_path):
    dm = BrainDataModule(stores=[str(tmp_path / "simbrain7T")], simulate="tiny", image_size=32)
    with pytest.raises(StoreError, match=r"simbrain7T/manifest.yaml.*simbrain7t, simbrain3t"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_absent_store_is_simulated_alone_and_then_reused(tmp_path):
    dm = BrainDataModule(stores=[str(tmp_path / "simbrain3t")], simulate="tiny", image_size=32)
    dm.setup("fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["simbrain3t"]  # not its sibling
    assert not (tmp_path / "simbrain3t" / IN_PROGRESS).exists()
    assert Store(tmp_path / "simbrain3t").name == "simbrain3t"


def test_interrupted_simulation_is_resumed(tmp_path):
    paths = simulate("tiny", tmp_path, seed=0, datasets=["simbrain7t"])
    root = paths["simbrain7t"]
    ref = _digests(root)
    # what a crash after the subject files but before the manifest leaves behind
    (root / "manifest.yaml").unlink()
    (root / IN_PROGRESS).write_text("")
    (root / ".subj02.h5.999.tmp").write_bytes(b"partial")
    (root / "subj01.h5").write_bytes(b"truncated")
    simulate("tiny", tmp_path, seed=0, datasets=["simbrain7t"])
    Store(root).validate()
    # the same seed gives the same bytes for the data files; the marker and the debris are gone
    after = _digests(root)
    assert sorted(after) == sorted(ref) and all(after[k] == ref[k] for k in ("subj01.h5", "subj02.h5"))
    assert not (root / IN_PROGRESS).exists() and not list(root.glob(".*.tmp"))


def test_overwrite_never_replaces_a_store_of_another_source(user_store):
    (user_store / "manifest.yaml").write_text(yaml.safe_dump({"dataset": "simbrain7t", "source": "nsd"}))
    before = _digests(user_store)
    with pytest.raises(StoreError, match="field 'source'"):
        simulate("tiny", user_store.parent, seed=3, overwrite=True, datasets=["simbrain7t"])
    assert _digests(user_store) == before


def test_refused_reprepare_keeps_the_store_valid(tmp_path):
    fx = write_algonauts(tmp_path / "src")
    out = prepare("algonauts2023", fx.root, tmp_path / "store", subjects=["subj01"],
                  roi="prf-visualrois", image_size=12, checksum="none")
    before = _digests(out)
    with pytest.raises(SourceError, match="Nope"):
        prepare("algonauts2023", fx.root, out, subjects=["subj01"], roi="prf-visualrois:Nope",
                image_size=12, checksum="none")
    assert _digests(out) == before
    Store(out).validate()
