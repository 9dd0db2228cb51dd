"""``brainenc`` command line.

``fit | validate | test | predict`` go through :class:`BrainencCLI` (LightningCLI, OmegaConf
interpolation in configs); the other subcommands are small argparse programs that live next to
the code they drive and are dispatched from :data:`EXTRA_COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

import yaml
from lightning.pytorch.cli import LightningCLI

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# name -> ("module:function", one-line help); each function takes argv and returns an exit code
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("brainenc.data.cli:main_simulate", "write a simulated brain (simbrain) store"),
    "prepare": ("brainenc.data.importers:main_prepare", "import a real dataset into the canonical store"),
    "validate-store": ("brainenc.data.cli:main_validate_store", "check a canonical store and print a summary"),
    "afo": ("brainenc.recipes.afo:main_afo", "run the All-for-One recipe (resumable stages)"),
    "transfer": ("brainenc.recipes.transfer:main_transfer", "transfer a universal encoder to a new subject"),
    "report": ("brainenc.reports:main_report", "per-ROI comparison report from run directories"),
    "sweep": ("brainenc.sweep:main_sweep", "run a grid of runs (backbones x encoders x datasets x seeds)"),
    "cache": ("brainenc.features.cache:main_cache", "precompute the feature cache of a frozen backbone"),
    "cluster": ("brainenc.analysis.embeddings:main", "cluster learned voxel embeddings into functional maps"),
    "compare": ("brainenc.compare:main_compare", "print a per-ROI table comparing run directories"),
}


class BrainencCLI(LightningCLI):
    """LightningCLI with data-to-model links and results written next to the run."""

    def add_arguments_to_parser(self, parser) -> None:
        # voxel counts exist only once the stores are opened, hence apply_on="instantiate"
        parser.link_arguments("data.voxel_counts", "model.init_args.voxel_counts", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: then test the best checkpoint in the same process and write "
                                 "results/ as `brainenc test` does (saves a second start-up)")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path before anything else runs: check
        # the file first, so a truncated last.ckpt is a clear error instead of a zip traceback
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and str(ckpt) not in ("last", "best", "hpc", "registry"):
            _check_checkpoint_file(Path(ckpt))
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        check_run_folder(self.trainer, ckpt)
        self._check_matches_model(ckpt)
        if ckpt:
            for cb in self.trainer.checkpoint_callbacks:
                follow_moved_folder(cb)
        self._add_console_feedback()

    def _add_console_feedback(self) -> None:
        """One line per epoch when the progress bar is off; a precise eval-mode check instead of
        Lightning's warning about (intentionally) frozen backbones.  lightning_main scopes the
        warning filter to this command."""
        import warnings

        from brainenc.lit.progress import LIGHTNING_EVAL_MODE_WARNING, EpochLine, EvalModeCheck

        if self.trainer.progress_bar_callback is None:
            self.trainer.callbacks.append(EpochLine())
        self.trainer.callbacks.append(EvalModeCheck())
        warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING)

    def before_validate(self) -> None:
        self._check_matches_model(self.config[self.subcommand].get("ckpt_path"))

    before_test = before_predict = before_validate

    def _check_matches_model(self, ckpt) -> None:
        """A checkpoint of another model (other voxel counts, readout or backbone) is a clear
        error naming the file, not Lightning's strict-loading traceback."""
        if not ckpt or str(ckpt) in ("last", "best", "hpc", "registry"):
            return
        from brainenc.lit.checkpoint import CheckpointError, load_state_dict

        state = load_state_dict(ckpt)
        own = self.model.state_dict()
        strict = getattr(self.model, "strict_loading", True)  # Lightning's switch for partial loads
        unexpected = sorted(k for k in state if k not in own) if strict else []
        missing = sorted(k for k in own if k not in state) if strict else []
        shape = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
        if unexpected or missing or shape:
            raise CheckpointError(ckpt, "state_dict", "a checkpoint of the configured model (same "
                                  "backbone, readout and subjects)",
                                  f"another model's: unexpected {unexpected[:3]}, missing {missing[:3]}, "
                                  f"mis-shaped {shape[:3]}")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=checkpoint_to_test(self.trainer))
        self._write_results_config()

    def after_test(self) -> None:
        self._write_results_config()

    def _write_results_config(self) -> None:
        """Write the resolved config beside the results table it produced."""
        if not self.trainer.is_global_zero:
            return
        from brainenc.data.store import atomic_path

        out = Path(self.trainer.default_root_dir) / "results"
        out.mkdir(parents=True, exist_ok=True)
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(dumped.get(self.subcommand, dumped), sort_keys=False))


class RunFolderError(ValueError):
    """A fit would mix with another fit's checkpoints, or cannot resume from the one given."""

    input_error = True


def check_run_folder(trainer, ckpt_path: str | None) -> None:
    """A run folder holds one fit.  Refuse to start a fresh fit where checkpoints already exist
    (ModelCheckpoint would write ``best-v1.ckpt`` beside the old ``best.ckpt``, which ``test`` and
    the AFO recipe keep using), and check that a checkpoint to resume from is a complete file."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    existing = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.ckpt"))
    if ckpt_path in (None, ""):
        if existing:
            names = ", ".join(p.name for p in existing[:4])
            last = next((p for p in existing if p.name == "last.ckpt"), existing[0])
            raise RunFolderError(
                f"{existing[0].parent}: holds the checkpoints of an earlier fit ({names}); a run folder "
                f"holds one fit. Resume it with --ckpt_path={last}, or start a new fit in another folder "
                f"with --trainer.default_root_dir=<new folder> (or delete this one)")
        return
    if str(ckpt_path) in ("last", "best", "hpc", "registry"):  # Lightning's own shortcuts
        return
    p = Path(ckpt_path)
    if existing and not any(p.resolve().parent == d.resolve() for d in dirs):
        raise RunFolderError(f"{existing[0].parent}: holds the checkpoints of another fit; resuming {p} "
                             "here would mix two fits. Choose another --trainer.default_root_dir")
    _check_checkpoint_file(p)


def follow_moved_folder(cb) -> None:
    """Let ModelCheckpoint ``cb`` resume the run folder it writes to after that folder was moved
    or copied.

    A checkpoint stores the absolute ``dirpath`` of each ModelCheckpoint.  When it differs from
    the current one, Lightning forgets the best and last paths and then writes ``best-v1.ckpt``
    and ``last-v1.ckpt`` beside the files it no longer recognises, while ``test`` and the AFO
    recipe keep reading ``best.ckpt``.  When only the location changed (same directory name),
    the stored paths are moved to the current directory before Lightning reads them.
    """
    if not getattr(cb, "dirpath", None) or not hasattr(cb, "load_state_dict"):
        return
    load = cb.load_state_dict
    here = Path(cb.dirpath)

    def load_moved(state: dict) -> None:
        old = state.get("dirpath")
        if old and Path(old) != here and Path(old).name == here.name:
            def move(p):
                return str(here / Path(p).name) if p and Path(p).parent == Path(old) else p

            state = {**state, "dirpath": str(here),
                     **{k: move(state.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                        "last_model_path") if k in state},
                     "best_k_models": {move(k): v for k, v in (state.get("best_k_models") or {}).items()}}
        load(state)

    cb.load_state_dict = load_moved


def _check_checkpoint_file(p: Path) -> None:
    """Cheap completeness check of a torch.save zip (its directory is written last)."""
    import zipfile

    from brainenc.lit.checkpoint import CheckpointError

    if not p.is_file():
        raise CheckpointError(p, "--ckpt_path", "a checkpoint file to resume from", "missing")
    if p.stat().st_size == 0 or not zipfile.is_zipfile(p):
        raise CheckpointError(p, "--ckpt_path", "a complete checkpoint written by torch.save",
                              "an empty or truncated file (a save interrupted by a crash? resume from "
                              "another checkpoint or start the fit in a new folder)")


def find_checkpoint(directory: str | Path) -> Path | None:
    """``best.ckpt`` in ``directory``, else ``last.ckpt``, else None."""
    for name in ("best.ckpt", "last.ckpt"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def checkpoint_to_test(trainer) -> str | None:
    """The checkpoint a test after fit should load: the monitored best, else :func:`find_checkpoint`
    in a checkpoint callback's directory (e.g. files written by the ridge module), else None (the
    weights in memory)."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "best_model_path", ""):
        return cb.best_model_path
    found = (find_checkpoint(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath)
    return next((str(p) for p in found if p is not None), None)


def lightning_main(argv: list[str]) -> None:
    from jsonargparse import set_parsing_settings

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule

    # "omegaconf+" resolves ${...} after command-line overrides, so --trainer.default_root_dir
    # moves checkpoints and logs too; configs keep readable absolute paths like ${data.image_size}
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    import warnings

    with warnings.catch_warnings():  # filters set while this command runs are undone after it
        # we pass argv as `args` on purpose (`brainenc fit ...` is sys.argv too): not a mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        BrainencCLI(EncoderModule, BrainDataModule, subclass_mode_model=True, args=argv,
                    parser_kwargs={"parser_mode": "omegaconf+"}, save_config_kwargs={"overwrite": True},
                    seed_everything_default=0, auto_configure_optimizers=False)


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    lines = ["usage: brainenc <command> [options]", "", "Lightning commands (YAML configs via -c, --print_config):"]
    helps = {"fit": "train an encoder", "validate": "evaluate on the validation split",
             "test": "evaluate on the test split and write the per-voxel results table",
             "predict": "predict responses for the test images"}
    lines += [f"  {c:<15} {helps[c]}" for c in LIGHTNING_COMMANDS]
    lines += ["", "brainenc commands:"]
    lines += [f"  {c:<15} {h}" for c, (_, h) in EXTRA_COMMANDS.items()]
    lines += ["", "Run `brainenc <command> --help` for the options of a command.",
              "Example: brainenc fit -c experiments/quickstart/linear.yaml"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a command.  Called without ``argv`` (the ``brainenc`` console script), input errors are
    printed as one message (see :func:`console_main`); called with ``argv`` they propagate."""
    if argv is None:
        return console_main(sys.argv[1:])
    return _main(list(argv))


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in EXTRA_COMMANDS:
        return int(_resolve(EXTRA_COMMANDS[cmd][0])(rest) or 0)
    if cmd in LIGHTNING_COMMANDS:
        lightning_main(argv)
        return 0
    print(f"brainenc: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
    return 2


def console_main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainenc`` command: :func:`main`, with the errors brainenc raises for bad
    input (they name the file, the field and what was expected) printed as one message instead
    of a traceback.  ``BRAINENC_TRACEBACK=1`` shows the traceback too."""
    import os

    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except Exception as e:
        # bad input (StoreError and its kin set `input_error`): the message is the whole story
        if not getattr(e, "input_error", False) or os.environ.get("BRAINENC_TRACEBACK"):
            raise
        print(f"brainenc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
