"""A bad AFO recipe, a stage run before its inputs exist and a failing stage child are one-line
errors naming the field or the command; nothing in a recipe is silently ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainenc.errors import ConfigError
from brainenc.recipes.afo import AFORecipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke" / "afo.yaml"


def _recipe(tmp_path: Path, **changes) -> Path:
    r = yaml.safe_load(SMOKE.read_text())
    r["base"] = str(ROOT / r["base"])
    r["out"] = str(tmp_path / "out")
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = r
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _brainenc(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "brainenc.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("changes, match", [
    ({"stages.whole.max_epoch": 2}, r"stages.whole.max_epoch'.*one of the fields \['max_epochs'\]"),
    ({"stages.student.ramp": 2}, r"stages.student.ramp'.*'extra_per_step', 'init', 'init_args', 'max_epochs', 'ramp_epochs'"),
    ({"stage": {}}, r"recipe.yaml: stage'.*one of the fields \['base', 'cli_args', 'out', 'partitions', 'stages'\]"),
    ({"stages.experts_x": {}}, r"stages.experts_x'.*'dark', 'experts', 'partitions', 'student', 'whole'"),
    ({"partitions.n_randm": 1}, r"partitions.n_randm'"),
    ({"stages.whole.max_epochs": "ten"}, r"stages.whole.max_epochs': expected a positive integer, found 'ten'"),
    ({"stages.dark.batch_size": 0}, r"stages.dark.batch_size': expected a positive integer, found 0"),
    ({"partitions.kmeans": ["8"]}, r"partitions.kmeans': expected a list of positive integers"),
    ({"stages.dark.check_experts": "yes"}, r"check_experts': expected true or false"),
    ({"stages.student.init": "hole"}, r"stages.student.init': expected 'scratch' or 'whole', found 'hole'"),
    ({"base": "no/such/config.yaml"}, r"recipe.yaml: base': expected a fit config file.*no/such/config.yaml \(no such file\)"),
])
def test_bad_recipe_fields_are_named(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tmp_path, **changes))


def test_bad_recipe_is_one_line_on_the_command_line(tmp_path):
    r = _brainenc("afo", "-c", str(_recipe(tmp_path, **{"stages.whole.max_epochs": "x"})))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("brainenc: error: option ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, needs", [("partitions", "whole/checkpoints/best.ckpt"),
                                          ("experts", "partitions/partitions.h5"),
                                          ("dark", "partitions/partitions.h5"),
                                          ("student", "dark/dark_targets.h5")])
def test_only_stage_without_its_inputs_names_the_stage_to_run_first(tmp_path, stage, needs):
    recipe = AFORecipe(load_recipe(_recipe(tmp_path)))
    with pytest.raises(ConfigError, match=rf"--only-stage {stage}'.*{needs} is written by stage"):
        recipe.run(only_stage=stage)
    assert not (tmp_path / "out").exists()


def test_a_failing_stage_child_is_one_line_not_a_called_process_error(tmp_path):
    # the base config names a store that does not exist: the whole stage's child fails
    path = _recipe(tmp_path)
    r = yaml.safe_load(path.read_text())
    base = yaml.safe_load(Path(r["base"]).read_text())
    base["data"]["stores"] = [str(tmp_path / "nowhere")]
    r["base"] = base
    path.write_text(yaml.safe_dump(r))
    proc = _brainenc("afo", "-c", str(path))
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err and "CalledProcessError" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("brainenc: error:")]
    # the child's own one-line error, then the recipe's, naming the command and what to do
    assert len(lines) == 2 and "nowhere/manifest.yaml" in lines[0]
    assert "`brainenc fit -c" in lines[-1] and "failed with exit status 2" in lines[-1]
    assert "rerun the recipe" in lines[-1]
