"""The catalogue of bad inputs in docs/reliability.md: each row gives a clear error naming the
file or option, the field and what was expected (issue 11, "other classes")."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from brainenc.cli import main
from brainenc.data.datamodule import BrainDataModule
from brainenc.data.store import Store, StoreError
from brainenc.errors import ConfigError

from tests.helpers import smoke_fit_args as _args


@pytest.fixture(scope="module")
def fitted(tiny_brain, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "linear"
    main(["fit", *_args(tiny_brain, run, "--test_after_fit=true")])
    return run


def _copy(brain, tmp_path) -> Path:
    return Path(shutil.copytree(brain["simbrain7t"], tmp_path / "simbrain7t"))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value, match", [
    ("image_size", 0, "data.image_size': expected a positive integer, found 0"),
    ("batch_size", -4, "data.batch_size': expected a positive integer, found -4"),
    ("eval_batch_size", 0, "data.eval_batch_size'"),
    ("val_fraction", 0.0, "data.val_fraction': expected a fraction strictly between 0 and 1, found 0.0"),
    ("val_fraction", 1.5, "data.val_fraction'.*found 1.5"),
    ("test_fraction", -0.1, "data.test_fraction'"),
])
def test_out_of_range_data_options(tiny_brain, option, value, match):
    with pytest.raises(ConfigError, match=match):
        BrainDataModule(stores=[str(tiny_brain["simbrain7t"])], **{option: value})


def test_out_of_range_option_on_the_command_line(tiny_brain, tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size"):
        main(["fit", *_args(tiny_brain, tmp_path / "run", "--data.batch_size=0")])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_backbone_name_says_how_to_find_names():
    from brainenc.models.backbones import Backbone

    with pytest.raises(ConfigError, match=r"backbone.init_args.name'.*timm.list_models.*close matches: resnet50"):
        Backbone("resnet5O")


def test_unknown_backbone_name_on_the_command_line_is_one_line(tiny_brain, tmp_path, capsys):
    # jsonargparse wraps the ConfigError of Backbone.__init__ in its own ValueError (~95 lines)
    from brainenc.cli import console_main

    rc = console_main(["fit", *_args(tiny_brain, tmp_path / "run", "--model.init_args.backbone.init_args.name=resnet5O")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("brainenc: error: option 'model.init_args.backbone.init_args.name': expected a timm "
                             "model name") and "close matches: resnet50" in err[0]


def test_unknown_subject_mixed_with_known_ones(tiny_brain):
    dm = BrainDataModule(stores=[str(tiny_brain["simbrain7t"])], subjects=["subj01", "subj09"])
    with pytest.raises(StoreError, match=r"field 'data.subjects'.*unknown \['subj09'\]"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_model(tiny_brain, fitted, tmp_path):
    from brainenc.lit.checkpoint import CheckpointError

    best = fitted / "checkpoints" / "best.ckpt"
    # the same config on one subject: the readout of subj02 is in the file but not in the model
    with pytest.raises(CheckpointError, match=rf"{best}: field 'state_dict'.*another model's.*subj02"):
        main(["test", *_args(tiny_brain, tmp_path / "t", "--data.subjects=[subj01]"), f"--ckpt_path={best}"])
    assert not (tmp_path / "t" / "results").exists()


# ----------------------------------------------------------------------------- store files


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("labels, match", [
    ("{1: V1, 2: [unclosed", "attrs/labels': expected YAML"),
    ("- V1\n- V2\n", r"attrs/labels': expected YAML \{value: name\}, found list"),
    ("{one: V1}", "attrs/labels': expected integer values as keys"),
])
def test_malformed_roi_label_attrs(tiny_brain, tmp_path, labels, match):
    root = _copy(tiny_brain, tmp_path)
    _edit(root / "subj01.h5", lambda f: f["voxels/rois/simbrain"].attrs.__setitem__("labels", labels))
    with pytest.raises(StoreError, match=rf"subj01.h5: field 'voxels/rois/simbrain/{match}"):
        Store(root)


def test_trial_session_of_the_wrong_length(tiny_brain, tmp_path):
    root = _copy(tiny_brain, tmp_path)

    def shorten(f):
        s = f["trial_session"][:-3]
        del f["trial_session"]
        f["trial_session"] = s
    _edit(root / "subj02.h5", shorten)
    with pytest.raises(StoreError, match=r"subj02.h5: field 'trial_session': expected int \(\d+,\), one session per trial"):
        Store(root)


def test_duplicate_stimulus_ids(tiny_brain, tmp_path):
    root = _copy(tiny_brain, tmp_path)

    def dup(f):
        ids = f["stimulus_id"][:]
        ids[7] = ids[3]
        f["stimulus_id"][:] = ids
    _edit(root / "stimuli.h5", dup)
    with pytest.raises(StoreError, match=r"stimuli.h5: field 'stimulus_id': expected one row per stimulus.*1 repeated"):
        Store(root)
    assert main(["validate-store", str(root)]) == 1


# ----------------------------------------------------------------------------- results tables


def _results_copy(fitted, tmp_path, edit) -> Path:
    run = Path(shutil.copytree(fitted, tmp_path / "run"))
    p = run / "results" / "voxels.csv"
    edit(p)
    return run


@pytest.mark.parametrize("case, match", [
    ("missing column", r"missing column\(s\) 'oracle'"),
    ("short row", r"line 5 has \d+ fields; expected \d+"),
    ("inf", r"column 'pearson' holds Inf in row 3"),
    ("out of range", r"column 'pearson' holds 3.0 in row 4; expected a correlation"),
])
def test_compare_refuses_a_damaged_results_table(fitted, tmp_path, case, match):
    from brainenc.reports.tables import ReportInputError

    def edit(p):
        if case == "missing column":
            pd.read_csv(p).drop(columns=["oracle"]).to_csv(p, index=False)
        elif case == "short row":
            lines = p.read_text().splitlines()
            lines[4] = ",".join(lines[4].split(",")[:-3])
            p.write_text("\n".join(lines) + "\n")
        else:
            df = pd.read_csv(p)
            df.loc[1 if case == "inf" else 2, "pearson"] = np.inf if case == "inf" else 3.0
            df.to_csv(p, index=False)
    run = _results_copy(fitted, tmp_path, edit)
    with pytest.raises(ReportInputError, match=rf"{run}/results/voxels.csv: {match}"):
        main(["compare", str(run)])


def test_compare_by_a_missing_column(fitted):
    from brainenc.reports.tables import ReportInputError

    with pytest.raises(ReportInputError, match=r"no column \['hemisphere'\] to group by"):
        main(["compare", str(fitted), "--by", "roi,hemisphere"])
