"""``brainenc afo -c recipe.yaml``: the All-for-One recipe as one resumable command.

Stages, each in its own directory under the recipe's ``out``:

1. ``whole``      whole-brain retinotopic model over every subject (``brainenc fit`` + ``test``);
2. ``partitions`` atlas ROIs, k-means ROIs of the whole-brain readout weights, random ROIs
                  (``partitions.h5``; see :mod:`brainenc.recipes.partitions`);
3. ``experts``    one small retinotopic expert per ROI of every partition, trained together on the
                  shared backbone (:class:`~brainenc.lit.experts.ExpertsModule`); tested as the
                  partition-averaged ensemble.  ``--only-expert PARTITION`` trains one partition in
                  ``experts-<PARTITION>/`` so a cluster can run partitions in parallel;
4. ``dark``       the experts' stitched predictions, averaged over partitions, for the training
                  images (and extra unlabelled images) -> ``dark_targets.h5`` (:mod:`.dark`);
5. ``student``    one whole-brain model distilled from measured + dark targets
                  (:class:`~brainenc.lit.distill.DistillModule`).

``fit``/``test`` stages are ``python -m brainenc.cli fit|test`` subprocesses (exactly what a user
would type, with isolated state); their configs are written to ``<stage>/stage.yaml``.  A stage
is finished when ``<stage>/results/voxels.csv`` or ``<stage>/DONE`` exists and is then skipped;
an interrupted fit resumes from ``<stage>/checkpoints/last.ckpt`` (:mod:`.stages`).

Recipe YAML::

    base: experiments/quickstart/retinotopic.yaml   # a fit config (path, or the config inline)
    out: runs/afo/quickstart
    cli_args: ["--trainer.enable_progress_bar=false"]   # appended to every fit/test command
    partitions: {atlases: [simbrain], kmeans: [8], n_random: 2, random_k: 8, seed: 0}
    stages:                       # each optional; an unknown or mistyped field is an error
      whole: {max_epochs: 4}
      experts: {max_epochs: 4, expert: {width: 16}, separate: false, init: scratch}   # or init: whole
      dark: {batch_size: 128, extra_images: [], check_experts: true}   # store dirs or folders of PNG/JPG
      student: {max_epochs: 6, ramp_epochs: 4, extra_per_step: 0, init: scratch}   # or init: whole
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from brainenc.ioutil import atomic_write
from brainenc.rundir import RunDir

from .dark import run_dark
from .stages import STAGE_CONFIG, load_trained, log, run_fit_test, stage_config, stage_done

STAGES = ("whole", "partitions", "experts", "dark", "student")


# ----------------------------------------------------------------------------- configs
_INT, _POS, _BOOL, _MAP, _LIST = "an integer", "a positive integer", "true or false", "a mapping", "a list"
_INIT = "'scratch' or 'whole'"
#: every field a recipe may hold -> what it must be (anything else is an error, not ignored)
RECIPE_FIELDS = {"base": None, "out": None, "cli_args": _LIST, "partitions": _MAP, "stages": _MAP}
PARTITION_FIELDS = {"atlases": _LIST, "kmeans": _LIST, "n_random": _INT, "random_k": _POS, "seed": _INT}
STAGE_FIELDS = {
    "whole": {"max_epochs": _POS},
    "partitions": {},
    "experts": {"max_epochs": _POS, "expert": _MAP, "separate": _BOOL, "init": _INIT, "init_args": _MAP},
    "dark": {"batch_size": _POS, "extra_images": _LIST, "check_experts": _BOOL},
    "student": {"max_epochs": _POS, "ramp_epochs": _INT, "extra_per_step": _INT, "init": _INIT,
                "init_args": _MAP},
}


def _check_fields(path: Path, where: str, tree, allowed: dict) -> None:
    """ConfigError for a field of ``tree`` that is not in ``allowed`` or not of its kind."""
    from brainenc.errors import ConfigError

    prefix = f"{path}: {where}." if where else f"{path}: "
    if not isinstance(tree, dict):
        raise ConfigError(prefix.rstrip(". :") if where else str(path), "a mapping", tree)
    for key, value in tree.items():
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", f"one of the fields {sorted(allowed)} (unknown fields are "
                              "not ignored: check the spelling)", value)
        kind = allowed[key]
        ok = {None: True,
              _INT: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              _POS: isinstance(value, int) and not isinstance(value, bool) and value > 0,
              _BOOL: isinstance(value, bool), _MAP: isinstance(value, dict) or value is None,
              _LIST: isinstance(value, list) or value is None, _INIT: value in ("scratch", "whole")}[kind]
        if key == "ramp_epochs" and value is None:
            ok = True
        if not ok:
            raise ConfigError(f"{prefix}{key}", "a non-negative integer" if kind == _INT else kind, value)
    if where == "partitions":
        for key in ("kmeans",):
            for k in tree.get(key) or []:
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise ConfigError(f"{prefix}{key}", "a list of positive integers (ROIs per k-means "
                                      "partition)", tree[key])


def load_recipe(path: str | Path, out: Optional[str] = None) -> dict:
    """The recipe as plain dicts; ``base`` is loaded (not resolved: ``${...}`` stay for the CLI).

    Every field is checked against :data:`RECIPE_FIELDS`, :data:`PARTITION_FIELDS` and
    :data:`STAGE_FIELDS`: an unknown or mistyped field is a ConfigError naming it and the fields
    allowed there. ``out`` (``--out``) replaces the recipe's output directory."""
    from brainenc.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError("-c", "a recipe YAML file", f"{path} (not found)")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), "a YAML recipe", f"unreadable YAML ({str(e).splitlines()[0]})") from None
    recipe = {} if recipe is None else recipe
    _check_fields(path, "", recipe, RECIPE_FIELDS)
    _check_fields(path, "partitions", recipe.get("partitions") or {}, PARTITION_FIELDS)
    stages = recipe.get("stages") or {}
    _check_fields(path, "stages", {k: None for k in stages}, {k: None for k in STAGE_FIELDS})
    for name, settings in stages.items():
        _check_fields(path, f"stages.{name}", settings or {}, STAGE_FIELDS[name])
    base = recipe.get("base")
    if base is None:
        raise ConfigError(f"{path}: base", "a fit config (a path or an inline mapping)", None)
    if isinstance(base, str):
        bp = Path(base)
        if not bp.is_file():
            raise ConfigError(f"{path}: base", "a fit config file (a path relative to the folder the command "
                              "runs in, or an inline mapping)", f"{base} (no such file)")
        try:
            recipe["base"] = yaml.safe_load(bp.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: base", "a YAML fit config", f"{bp}: unreadable YAML "
                              f"({str(e).splitlines()[0]})") from None
    if not isinstance(recipe["base"], dict):
        raise ConfigError(f"{path}: base", "a fit config (a mapping with trainer, model and data)", recipe["base"])
    if out:
        recipe["out"] = str(out)
    if not isinstance(recipe.get("out"), str) or not recipe["out"]:
        raise ConfigError(f"{path}: out", "the recipe's output directory", recipe.get("out"))
    recipe["stages"] = {k: v or {} for k, v in stages.items()}
    recipe["partitions"] = recipe.get("partitions") or {}
    recipe["cli_args"] = recipe.get("cli_args") or []
    return recipe


# ----------------------------------------------------------------------------- stage 2
def run_partitions(root: Path, whole: Path, settings: dict, cli_args: list[str]) -> Path:
    from brainenc.models.partition_file import write_partitions

    from .partitions import build_partitions, readout_weights_from_checkpoint

    out = root / "partitions.h5"
    if stage_done(root) and out.exists():
        log("partitions: finished, skipped")
        return out
    from brainenc.cli import instantiate

    _, dm = instantiate(whole / STAGE_CONFIG, cli_args)
    kmeans = list(settings.get("kmeans", [8]))
    weights = (readout_weights_from_checkpoint(RunDir(whole).require_checkpoint(), [p.key for p in dm.pairs])
               if kmeans else None)
    parts = build_partitions(dm.pairs, weights, atlases=tuple(settings.get("atlases", ["simbrain"])),
                             kmeans=kmeans, n_random=int(settings.get("n_random", 2)),
                             random_k=int(settings.get("random_k", 8)), seed=int(settings.get("seed", 0)))
    write_partitions(out, parts)
    summary = {name: {"rois": names, "voxels_per_roi": np.bincount(np.concatenate(list(lab.values())),
                                                                   minlength=len(names)).tolist()}
               for name, (names, lab) in parts.items()}
    atomic_write(root / "partitions.json", json.dumps(summary, indent=2))
    atomic_write(root / "DONE", "ok\n")
    log(f"partitions: {', '.join(f'{k} ({len(v[0])} ROIs)' for k, v in parts.items())} -> {out}")
    return out


# ----------------------------------------------------------------------------- the recipe
class AFORecipe:
    """The five stages over one recipe dict (see the module docstring for its fields)."""

    def __init__(self, recipe: dict):
        self.recipe = recipe
        self.base = recipe["base"]
        self.out = Path(recipe["out"])
        self.stages = recipe["stages"]
        self.cli_args = [str(a) for a in recipe.get("cli_args", [])]

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def _epochs(self, stage: str) -> Optional[int]:
        return (self.stages.get(stage) or {}).get("max_epochs")

    def whole(self) -> None:
        cfg = stage_config(self.base, self.dir("whole"), self._epochs("whole"),
                           init_args={"model_name": "afo-whole"})
        run_fit_test(self.dir("whole"), cfg, self.cli_args)

    def partitions(self) -> Path:
        return run_partitions(self.dir("partitions"), self.dir("whole"), self.recipe["partitions"], self.cli_args)

    def _experts_cfg(self, root: Path, only: Optional[list[str]]) -> dict:
        s = self.stages.get("experts") or {}
        expert, init_from = dict(s.get("expert") or {}), None
        init = s.get("init", "scratch")
        if init == "whole":
            # warm start: every expert is the whole-brain readout restricted to its ROI, so it has
            # the whole-brain model's architecture; `expert` may only change training-time options
            base_readout = ((self.base.get("model") or {}).get("init_args") or {}).get("readout") or {}
            expert = {**dict(base_readout.get("init_args") or {}), **expert}
            init_from = str(RunDir(self.dir("whole")).require_checkpoint().resolve())
        elif init != "scratch":
            raise ValueError(f"recipe field 'stages.experts.init': expected 'scratch' or 'whole', got {init!r}")
        readout = {"class_path": "brainenc.models.experts.ExpertsReadout",
                   "init_args": {"partitions": str((self.dir("partitions") / "partitions.h5").resolve()),
                                 "only": only, "expert": expert, "init_from": init_from}}
        extra = {"model_name": "afo-experts", **dict(s.get("init_args") or {})}
        return stage_config(self.base, root, s.get("max_epochs"), "brainenc.lit.experts.ExpertsModule",
                            readout, extra)

    def partition_names(self) -> list[str]:
        from brainenc.models.partition_file import read_partitions

        return list(read_partitions(self.dir("partitions") / "partitions.h5"))

    def expert_runs(self) -> list[tuple[Path, int]]:
        names = self.partition_names()
        if (self.stages.get("experts") or {}).get("separate"):
            return [(self.out / f"experts-{p}", 1) for p in names]
        return [(self.dir("experts"), len(names))]

    def experts(self, only: Optional[str] = None) -> None:
        names = self.partition_names()
        if only is not None:
            if only not in names:
                from brainenc.errors import ConfigError

                raise ConfigError("--only-expert", f"a partition of {self.dir('partitions') / 'partitions.h5'} "
                                  f"({', '.join(names)})", only)
            root = self.out / f"experts-{only}"
            run_fit_test(root, self._experts_cfg(root, [only]), self.cli_args)
            return
        for root, _ in self.expert_runs():
            part = None if root == self.dir("experts") else [root.name[len("experts-"):]]
            run_fit_test(root, self._experts_cfg(root, part), self.cli_args)

    def dark(self) -> Path:
        return run_dark(self.dir("dark"), self.expert_runs(), self.stages.get("dark") or {}, self.cli_args,
                        whole=self.dir("whole"))

    def student(self) -> None:
        s = self.stages.get("student") or {}
        args = {"model_name": "afo-student",
                "dark_targets": str((self.dir("dark") / "dark_targets.h5").resolve()),
                "ramp_epochs": s.get("ramp_epochs"), "extra_per_step": int(s.get("extra_per_step", 0)),
                **dict(s.get("init_args") or {})}
        init = s.get("init", "scratch")
        if init == "whole":  # start from the whole-brain model (same base config, same shapes)
            args["init_from"] = str(RunDir(self.dir("whole")).require_checkpoint().resolve())
        elif init != "scratch":
            raise ValueError(f"recipe field 'stages.student.init': expected 'scratch' or 'whole', got {init!r}")
        cfg = stage_config(self.base, self.dir("student"), s.get("max_epochs"),
                           "brainenc.lit.distill.DistillModule", init_args=args)
        run_fit_test(self.dir("student"), cfg, self.cli_args)

    def missing_inputs(self, stage: str) -> list[tuple[Path, str]]:
        """(file, the stage that writes it) for each input of ``stage`` that is not there yet."""
        whole = RunDir(self.dir("whole"))
        parts = self.dir("partitions") / "partitions.h5"
        need: list[tuple[Optional[Path], Path, str]] = []  # (found, expected, producer)

        def init_whole(settings: dict) -> None:
            if settings.get("init", "scratch") == "whole":
                need.append((whole.checkpoint(), whole.checkpoints / "best.ckpt", "whole"))
        if stage == "partitions":
            need.append((whole.checkpoint(), whole.checkpoints / "best.ckpt", "whole"))
        elif stage == "experts":
            need.append((parts if parts.exists() else None, parts, "partitions"))
            init_whole(self.stages.get("experts") or {})
        elif stage == "dark":
            if not parts.exists():
                return [(parts, "partitions")]
            for root, _ in self.expert_runs():
                need.append((RunDir(root).checkpoint(), root / "checkpoints" / "best.ckpt", "experts"))
            if (self.stages.get("dark") or {}).get("check_experts", True):
                need.append((whole.checkpoint(), whole.checkpoints / "best.ckpt", "whole"))
        elif stage == "student":
            targets = self.dir("dark") / "dark_targets.h5"
            need.append((targets if targets.exists() else None, targets, "dark"))
            init_whole(self.stages.get("student") or {})
        return [(expected, producer) for found, expected, producer in need if found is None]

    def _require_inputs(self, stage: str, how: str) -> None:
        from brainenc.errors import ConfigError

        missing = self.missing_inputs(stage)
        if missing:
            path, producer = missing[0]
            raise ConfigError(how, f"the inputs of stage '{stage}': {path} is written by stage '{producer}'; "
                              f"run that stage first (brainenc afo -c RECIPE --only-stage {producer}, or "
                              "without --only-stage to run every stage in order)", f"no {path.name}")

    def run(self, only_stage: Optional[str] = None, only_expert: Optional[str] = None) -> None:
        if only_stage is not None:
            self._require_inputs(only_stage, f"--only-stage {only_stage}")
        if only_expert is not None:
            self._require_inputs("experts", f"--only-expert {only_expert}")
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if only_expert is not None:
            self.experts(only_expert)
            return
        for stage in STAGES:
            if only_stage is None or only_stage == stage:
                t = time.time()
                getattr(self, stage)()
                log(f"stage {stage}: {time.time() - t:.0f} s")
        log(f"done in {time.time() - t0:.0f} s; compare with: brainenc compare "
             + " ".join(str(r) for r, _ in [(self.dir('whole'), 0), *self.expert_runs(), (self.dir('student'), 0)]))


def summarise(recipe: "AFORecipe", stage: str = "student") -> dict:
    """Figures for docs: per-ROI median r/oracle per stage, student vs whole-brain (Wilcoxon), and
    recovery of the true pRF centres by the ``stage`` model's learned positions (V1-V3 voxels).

    Writes ``<out>/summary.json`` and returns it.
    """
    from scipy.stats import wilcoxon

    from brainenc.compare import roi_table
    from brainenc.results import read_results

    out: dict = {}
    runs = {s: recipe.dir(s) for s in ("whole", "student")}
    runs.update({r.name: r for r, _ in recipe.expert_runs()})
    tables = [read_results(r) for r in runs.values() if RunDir(r).tested()]
    table = roi_table(tables)
    out["roi_frac_oracle"] = {str(k): v for k, v in table.xs("frac_oracle", axis=1, level=1).round(4).to_dict().items()}
    if all(RunDir(runs[s]).tested() for s in ("whole", "student")):
        keys = ["dataset", "subject", "voxel"]
        m = read_results(runs["whole"]).merge(read_results(runs["student"]), on=keys, suffixes=("_w", "_s"))
        m = m[np.isfinite(m["pearson_w"]) & np.isfinite(m["pearson_s"])]
        out["student_vs_whole"] = {}
        # all voxels, then only those with a signal to predict (simbrain's oracle r > 0.1)
        for name, sel in (("all", np.ones(len(m), bool)), ("signal", (m["oracle_w"] > 0.1).to_numpy())):
            d = m[sel]
            if len(d) < 10:
                continue
            stat = wilcoxon(d["pearson_s"], d["pearson_w"], alternative="greater")
            out["student_vs_whole"][name] = {
                "n_voxels": int(len(d)), "median_diff": float((d["pearson_s"] - d["pearson_w"]).median()),
                "frac_student_better": float((d["pearson_s"] > d["pearson_w"]).mean()),
                "wilcoxon_p_greater": float(stat.pvalue)}
    from brainenc.analysis.prf import prf_recovery

    model, dm = load_trained(recipe.dir(stage), recipe.cli_args)
    pos = prf_recovery(model.readout, dm.pairs) if hasattr(model.readout, "positions_deg") else {}
    out["positions_V1_V3"] = pos
    if pos:
        from brainenc.analysis.prf import prf_figure

        first = next(p for p in dm.pairs if p.key in pos)
        prf_figure(model.readout, first).savefig(recipe.out / f"prf_{stage}.png", dpi=100)
    check = recipe.dir("dark") / "experts_vs_whole.json"
    if check.exists():
        rows = json.loads(check.read_text())
        out["experts_beat_whole"] = {"wins": sum(r["wins"] for r in rows), "experts": len(rows),
                                     "losers": [f"{r['partition']}/{r['roi']} ({r['pair']})"
                                                for r in rows if not r["wins"]]}
    atomic_write(recipe.out / "summary.json", json.dumps(out, indent=2))
    log("summary -> " + str(recipe.out / "summary.json"))
    print(json.dumps(out, indent=2))
    return out


def main_afo(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc afo", description=(
        "Run the All-for-One recipe: whole-brain model, partitions, ROI experts, dark-knowledge "
        "targets, distilled student. Finished stages are skipped; interrupted fits resume."))
    ap.add_argument("-c", "--config", required=True, type=Path, help="recipe YAML (see experiments/afo/)")
    ap.add_argument("--out", default=None, help="override the recipe's output directory")
    ap.add_argument("--only-stage", choices=STAGES, default=None, help="run only this stage")
    ap.add_argument("--only-expert", default=None, metavar="PARTITION",
                    help="train only this partition's experts (in <out>/experts-PARTITION; set "
                         "stages.experts.separate: true so the dark stage uses the per-partition runs)")
    ap.add_argument("--summary", action="store_true",
                    help="after the stages, write <out>/summary.json: per-ROI r/oracle, student vs whole "
                         "(Wilcoxon), pRF-centre recovery (simbrain truth)")
    a = ap.parse_args(argv)
    recipe = load_recipe(a.config, a.out)
    r = AFORecipe(recipe)
    r.run(a.only_stage, a.only_expert)
    if a.summary:
        summarise(r)
    return 0


if __name__ == "__main__":
    sys.exit(main_afo(sys.argv[1:]))
