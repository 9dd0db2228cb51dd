"""A sweep file read into its grid of cells (backbones x encoders x datasets x seeds).

:func:`load_sweep` checks the file (every error names it and the field) and expands the grid into
:class:`Cell`\ s with their run directories, ``<out>/<dataset>/<encoder>/<backbone>/seed<k>``.
Running the cells is :mod:`brainenc.sweep`'s job; the file format is in docs/sweeps.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from brainenc.rundir import RunDir

#: Keys a sweep file may have at the top level; anything else is most likely a typo
#: ("seed:" for "seeds:") that would otherwise silently do nothing.
TOP_KEYS = {"out", "backbones", "encoders", "datasets", "seeds", "overrides", "report",
            "name", "description", "vars"}
#: Backbone init_args that say *which network with which weights*. A backbone entry resets the
#: ones it does not give, so an encoder config's ImageNet ``weights`` file for
#: tf_efficientnet_lite0 does not leak into a ``{name: test_vit}`` cell. Other init_args
#: (trainable, LoRA) stay as the encoder config sets them unless the entry overrides; the image
#: size is not one of them (the CLI links it from ``data.image_size``).
BACKBONE_IDENTITY = {"weights": None, "pretrained": False, "layers": None, "model_kwargs": None}
REPORT_KEYS = {"enabled", "figures", "brainmaps", "n_boot", "threshold_p", "seed", "max_pairs",
               "max_brainmaps"}
REPORT_DEFAULTS = {"enabled": True, "figures": True, "brainmaps": False, "n_boot": 1000}


class SweepError(ValueError):
    """A sweep file that cannot describe a grid; the message names the file and the field."""


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One (dataset, encoder, backbone, seed) of the grid; ``index`` is its ``--cell`` number."""

    index: int
    dataset: dict
    encoder: dict
    backbone: dict  # {"label": dir name, "init_args": Backbone init_args overrides}
    seed: int
    run_dir: Path

    @property
    def id(self) -> str:
        return f"{self.dataset['name']}/{self.encoder['name']}/{self.backbone['label']}/seed{self.seed}"

    @property
    def voxels(self) -> Path:
        return RunDir(self.run_dir).voxels

    @property
    def cell_yaml(self) -> Path:
        return self.run_dir / "sweep_cell.yaml"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "sweep_cell.json"

    @property
    def ckpt_dir(self) -> Path:
        return RunDir(self.run_dir).checkpoints


@dataclass
class Sweep:
    path: Path
    out: Path
    cells: list[Cell]
    overrides: list[str]
    report: dict = field(default_factory=dict)

    @property
    def status_path(self) -> Path:
        return self.out / "sweep_status.csv"


def _slug(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(s)).strip("-") or "x"


def _cli_value(v: Any) -> str:
    """A value as jsonargparse reads it back from ``--key=value`` (JSON is valid YAML)."""
    return v if isinstance(v, str) else json.dumps(v)


def _overrides(value: Any, where: str) -> list[str]:
    """``overrides`` as CLI arguments: a list of ``--key=value`` strings, or a {key: value} map."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"--{str(k).lstrip('-')}={_cli_value(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        bad = [a for a in value if not a.startswith("--")]
        if bad:
            raise SweepError(f"{where}: expected CLI arguments starting with '--', got {bad[0]!r}")
        return list(value)
    raise SweepError(f"{where}: expected a list of '--key=value' strings or a {{key: value}} map, "
                     f"got {type(value).__name__}")


def _entries(cfg: dict, key: str, where: str, required: bool = True) -> list:
    items = cfg.get(key)
    if items is None and not required:
        return []
    if not isinstance(items, list) or not items:
        raise SweepError(f"{where}: '{key}' must be a non-empty list, got {items!r}")
    return items


def _backbone(entry: Any, where: str) -> dict:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SweepError(f"{where}: expected a mapping with a timm model 'name' "
                         f"(plus Backbone init_args), got {entry!r}")
    if "image_size" in entry:
        raise SweepError(f"{where}: 'image_size' is linked from data.image_size, not a backbone option; "
                         "set it for the sweep with overrides: {data.image_size: N}")
    entry = dict(entry)
    label = _slug(entry.pop("label", entry["name"]))
    return {"label": label, "init_args": {"name": entry.pop("name"), **BACKBONE_IDENTITY, **entry}}


def _encoder(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("config"):
        raise SweepError(f"{where}: expected {{name: ..., config: path to a fit config}}, got {entry!r}")
    unknown = set(entry) - {"name", "config", "overrides"}
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {sorted(unknown)}; expected name, config, overrides")
    config = Path(entry["config"])
    if not config.is_file():
        raise SweepError(f"{where}.config: {config} not found (relative paths are taken from the "
                         f"current directory, {os.getcwd()})")
    return {"name": _slug(entry["name"]), "config": str(config),
            "overrides": _overrides(entry.get("overrides"), f"{where}.overrides")}


def _dataset(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict) or not entry.get("name"):
        raise SweepError(f"{where}: expected {{name, stores: [...], simulate: preset or null, "
                         f"subjects: optional}}, got {entry!r}")
    unknown = set(entry) - {"name", "stores", "simulate", "subjects", "overrides"}
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {sorted(unknown)}; "
                         "expected name, stores, simulate, subjects, overrides")
    stores = entry.get("stores")
    if not isinstance(stores, list) or not stores or not all(isinstance(s, str) for s in stores):
        raise SweepError(f"{where}.stores: expected a non-empty list of store directories, got {stores!r}")
    data = {"stores": list(stores), "simulate": entry.get("simulate")}
    if "subjects" in entry:  # absent = keep what the encoder config says
        data["subjects"] = entry["subjects"]
    return {"name": _slug(entry["name"]), "data": data,
            "overrides": _overrides(entry.get("overrides"), f"{where}.overrides")}


def load_sweep(path: str | os.PathLike, sets: Optional[list[str]] = None,
               out: Optional[str] = None) -> Sweep:
    """Read a sweep file (OmegaConf interpolation allowed) and expand its grid.

    Parameters
    ----------
    sets : ``KEY=VALUE`` edits applied before interpolation is resolved (KEY is dotted,
        ``datasets[0].stores``; VALUE is YAML), e.g. to point a checked-in sweep at other stores.
    out : replaces the file's ``out``.

    Cells are ordered dataset, encoder, backbone, seed (seed varies fastest): the order of
    ``--dry-run``, of ``--print-commands`` lines and of ``--cell`` numbers.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        conf = OmegaConf.load(path)
        for s in sets or []:
            key, sep, value = s.partition("=")
            if not sep:
                raise SweepError(f"--set {s!r}: expected KEY=VALUE")
            OmegaConf.update(conf, key.strip(), yaml.safe_load(value), merge=False)
        cfg = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise SweepError(f"{path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    if out is not None:
        cfg["out"] = out
    if not cfg.get("out"):
        raise SweepError(f"{path}: 'out' (the sweep directory) is required")

    backbones = [_backbone(b, f"{path}: backbones[{i}]") for i, b in enumerate(_entries(cfg, "backbones", str(path)))]
    encoders = [_encoder(e, f"{path}: encoders[{i}]") for i, e in enumerate(_entries(cfg, "encoders", str(path)))]
    # no datasets = every cell uses the encoder config's own data section
    datasets = ([_dataset(d, f"{path}: datasets[{i}]") for i, d in enumerate(cfg["datasets"])]
                if cfg.get("datasets") else [{"name": "config", "data": {}, "overrides": []}])
    seeds = cfg.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    for key, items in (("backbones", [b["label"] for b in backbones]), ("encoders", [e["name"] for e in encoders]),
                       ("datasets", [d["name"] for d in datasets]), ("seeds", seeds)):
        dup = sorted({x for x in items if items.count(x) > 1}, key=str)
        if dup:
            hint = " (give backbones that share a name distinct 'label's)" if key == "backbones" else ""
            raise SweepError(f"{path}: {key} {dup} appear more than once; each needs its own directory{hint}")
    report = dict(REPORT_DEFAULTS, **(cfg.get("report") or {}))
    unknown = set(report) - REPORT_KEYS
    if unknown:
        raise SweepError(f"{path}: report: unknown key(s) {sorted(unknown)}; expected {sorted(REPORT_KEYS)}")

    root = Path(cfg["out"])
    cells = []
    for d in datasets:
        for e in encoders:
            for b in backbones:
                for s in seeds:
                    cells.append(Cell(len(cells), d, e, b, s,
                                      root / d["name"] / e["name"] / b["label"] / f"seed{s}"))
    return Sweep(path=path, out=root, cells=cells,
                 overrides=_overrides(cfg.get("overrides"), f"{path}: overrides"), report=report)
