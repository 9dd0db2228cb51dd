"""Nothing executed: files a user hands us are read as data (issue 11, item 2).

Each crafted file would create ``canary`` when unpickled; the tests assert a clear error naming
the file and that the canary was never created.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from brainenc.data.importers import prepare  # noqa: E402
from brainenc.data.store import Store, StoreError  # noqa: E402
from tests.fixtures.algonauts import write_algonauts  # noqa: E402
from tests.helpers import Payload  # noqa: E402




@pytest.fixture(scope="module")
def algonauts_src(tmp_path_factory):
    return write_algonauts(tmp_path_factory.mktemp("algonauts") / "src", subjects=("subj01",))


def _mapping(fx, atlas="prf-visualrois"):
    return fx.root / "subj01" / "roi_masks" / f"mapping_{atlas}.npy"


def test_algonauts_mapping_is_read_without_unpickling_code(algonauts_src, tmp_path):
    root = Path(shutil.copytree(algonauts_src.root, tmp_path / "src"))
    canary = tmp_path / "canary"
    evil = np.empty((), dtype=object)
    evil[()] = Payload(canary)
    np.save(root / "subj01/roi_masks/mapping_prf-visualrois.npy", evil, allow_pickle=True)
    with pytest.raises(StoreError, match=r"mapping_prf-visualrois.npy: field '<pickle>'.*reference to io.open"):
        prepare("algonauts2023", root, tmp_path / "out", roi="all", image_size=12, checksum="none")
    assert not canary.exists()


def test_algonauts_mapping_as_shipped_and_as_json(algonauts_src, tmp_path):
    from brainenc.data.importers.algonauts import read_label_mapping

    # the challenge's own format (np.save of a dict, also with numpy-scalar keys) still reads
    assert read_label_mapping(_mapping(algonauts_src)) == {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v",
                                                          4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
    np.save(tmp_path / "np_keys.npy", {np.int64(1): "FFA-1"}, allow_pickle=True)
    assert read_label_mapping(tmp_path / "np_keys.npy") == {1: "FFA-1"}
    # a JSON label map beside the .npy wins, and is what the store records
    root = Path(shutil.copytree(algonauts_src.root, tmp_path / "src"))
    (root / "subj01/roi_masks/mapping_prf-visualrois.json").write_text(
        '{"0": "Unknown", "1": "a", "2": "b", "3": "c", "4": "d", "5": "e", "6": "f", "7": "g"}')
    out = prepare("algonauts2023", root, tmp_path / "out", roi="prf-visualrois:a,b", image_size=12,
                  checksum="none")
    atlas = Store(out).subject("subj01").rois["prf-visualrois"]
    assert atlas.labels == {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f", 7: "g"}
    assert set(np.unique(atlas.values)) <= {1, 2}


def _evil_checkpoint(path: Path, canary: Path) -> Path:
    """A checkpoint whose hyper_parameters would run code when unpickled, next to real tensors."""
    from brainenc.features.cache import FeatureCache

    state = {"backbone.w": torch.arange(3.0), "readout.weight.simbrain7t__subj01": torch.ones(4, 2)}
    torch.save({"state_dict": state, "hyper_parameters": {"evil": Payload(canary),
                                                          "feature_cache": FeatureCache(root=str(path.parent))}},
               path)
    return path


def test_checkpoints_are_loaded_without_running_their_objects(tmp_path):
    """Tensors load; every pickled object is replaced by an inert stand-in, so nothing runs."""
    import types

    from brainenc.lit.checkpoint import load_state_dict
    from brainenc.lit.distill import DistillModule
    from brainenc.recipes.partitions import readout_weights_from_checkpoint

    canary = tmp_path / "canary"
    ckpt = _evil_checkpoint(tmp_path / "evil.ckpt", canary)
    assert set(load_state_dict(ckpt)) == {"backbone.w", "readout.weight.simbrain7t__subj01"}
    w = readout_weights_from_checkpoint(ckpt, ["simbrain7t/subj01"])
    np.testing.assert_array_equal(w["simbrain7t/subj01"], np.ones((4, 2)))
    loaded = {}
    student = types.SimpleNamespace(  # what load_weights touches of the module
        state_dict=lambda: {"backbone.w": torch.zeros(3), "readout.weight.simbrain7t__subj01": torch.zeros(4, 2)},
        load_state_dict=lambda sd, strict: loaded.update(sd))
    DistillModule.load_weights(student, str(ckpt))
    assert torch.equal(loaded["backbone.w"], torch.arange(3.0))
    assert not canary.exists()


def test_afo_stage_checkpoint_is_loaded_weights_only(tmp_path, monkeypatch):
    from brainenc import cli
    from brainenc.lit.checkpoint import CheckpointError
    from brainenc.recipes import afo

    canary = tmp_path / "canary"
    stage = tmp_path / "whole"
    (stage / "checkpoints").mkdir(parents=True)
    _evil_checkpoint(stage / "checkpoints" / "best.ckpt", canary)
    # the stage config is not the point: the model is rebuilt by brainenc.cli.instantiate
    monkeypatch.setattr(cli, "instantiate", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    with pytest.raises(CheckpointError, match="best.ckpt"):
        afo.load_trained(stage)
    assert not canary.exists()


def test_bad_checkpoints_name_the_file(tmp_path):
    from brainenc.lit.checkpoint import CheckpointError, load_into, load_state_dict

    model = torch.nn.Linear(3, 2)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, good)
    other = torch.nn.Linear(4, 2)
    assert torch.equal(load_into(other.__class__(3, 2), good).weight, model.weight)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt.*empty file"):
        load_state_dict(tmp_path / "empty.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt.*truncated"):
        load_state_dict(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match=r"good.ckpt: field 'state_dict'.*another model.*weight"):
        load_into(other, good)
    with pytest.raises(CheckpointError, match="missing.ckpt.*missing"):
        load_state_dict(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "/abs", ""])
def test_store_rejects_subject_names_that_leave_the_directory(tiny_brain, tmp_path, bad):
    root = Path(shutil.copytree(tiny_brain["simbrain7t"], tmp_path / "stores" / "simbrain7t"))
    shutil.copy(root / "subj01.h5", tmp_path / "stores" / "evil.h5")  # what "../evil" would read
    man = yaml.safe_load((root / "manifest.yaml").read_text())
    man["subjects"] = ["subj01", bad]
    (root / "manifest.yaml").write_text(yaml.safe_dump(man))
    with pytest.raises(StoreError, match=r"manifest.yaml: field 'subjects': expected a plain name"):
        Store(root)


def test_store_rejects_a_dataset_name_with_separators(tiny_brain, tmp_path):
    root = Path(shutil.copytree(tiny_brain["simbrain7t"], tmp_path / "simbrain7t"))
    man = yaml.safe_load((root / "manifest.yaml").read_text())
    man["dataset"] = "../../elsewhere"
    (root / "manifest.yaml").write_text(yaml.safe_dump(man))
    with pytest.raises(StoreError, match="field 'dataset': expected a plain name"):
        Store(root)


def test_importer_rejects_unsafe_subject_names_in_its_manifest(algonauts_src, tmp_path):
    from brainenc.data.importers.base import manifests_dir

    man = yaml.safe_load((manifests_dir() / "algonauts2023.yaml").read_text())
    man["subjects"] = {"../subj01": {"source": "subj01"}}
    mpath = tmp_path / "algonauts2023.yaml"
    mpath.write_text(yaml.safe_dump(man))
    with pytest.raises(StoreError, match=r"algonauts2023.yaml: field 'subjects': expected a plain name"):
        prepare("algonauts2023", algonauts_src.root, tmp_path / "out" / "store", manifest=mpath,
                image_size=12, checksum="none")
    assert not (tmp_path / "out" / "subj01.h5").exists()


def _legacy_pickles(tmp_path: Path, canary: Path) -> dict[str, Path]:
    """Files that are not torch.save zip archives and would run code when unpickled: a plain
    pickle, and torch's legacy (pre-1.6) serialisation with an object beside the tensors."""
    import pickle

    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"state_dict": {"w": Payload(canary)}}))
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.arange(3.0)}, "hyper_parameters": Payload(canary)},
               legacy, _use_new_zipfile_serialization=False)
    return {"plain": plain, "legacy": legacy}


@pytest.mark.parametrize("kind", ["plain", "legacy"])
def test_non_zip_pickles_are_refused_without_running_code(tmp_path, kind):
    """torch's legacy reader reads its header records with the pickle module's plain ``load``;
    such a file must be refused before that reader ever sees it (it used to run the payload)."""
    from brainenc.lit.checkpoint import CheckpointError, load_state_dict
    from brainenc.recipes.partitions import readout_weights_from_checkpoint

    canary = tmp_path / "canary"
    path = _legacy_pickles(tmp_path, canary)[kind]
    with pytest.raises(CheckpointError, match=rf"{kind}.ckpt: field '<pickle>'"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match=rf"{kind}.ckpt"):
        readout_weights_from_checkpoint(path, ["simbrain7t/subj01"])
    assert not canary.exists()


@pytest.mark.parametrize("kind", ["plain", "legacy"])
def test_every_checkpoint_loader_refuses_a_payload(tmp_path, kind, monkeypatch):
    """The loaders of user-given weight files (student init_from, experts init_from, extra
    embeddings, AFO stage checkpoints, backbone weight files) with a file that would create
    ``canary`` if any code ran; also with torch told to unpickle by default."""
    import types

    from brainenc import cli
    from brainenc.analysis.embeddings import torch_load
    from brainenc.lit.checkpoint import CheckpointError
    from brainenc.lit.distill import DistillModule
    from brainenc.models.backbone_weights import load_weights_file
    from brainenc.models.experts import ExpertsReadout
    from brainenc.recipes import afo

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "canary"
    path = _legacy_pickles(tmp_path, canary)[kind]
    student = types.SimpleNamespace(state_dict=lambda: {"backbone.w": torch.zeros(3)},
                                    load_state_dict=lambda sd, strict: None)
    with pytest.raises(CheckpointError, match=f"{kind}.ckpt"):
        DistillModule.load_weights(student, str(path))
    with pytest.raises(CheckpointError, match=f"{kind}.ckpt"):
        torch_load(path)
    with pytest.raises(ValueError, match=f"{kind}.ckpt"):
        ExpertsReadout.warm_start(types.SimpleNamespace(), str(path), {})
    with pytest.raises(ValueError, match=f"{kind}.ckpt"):
        load_weights_file(path)
    stage = tmp_path / "whole"
    (stage / "checkpoints").mkdir(parents=True)
    shutil.copy(path, stage / "checkpoints" / "best.ckpt")
    monkeypatch.setattr(cli, "instantiate", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    with pytest.raises(CheckpointError, match="best.ckpt"):
        afo.load_trained(stage)
    assert not canary.exists()
