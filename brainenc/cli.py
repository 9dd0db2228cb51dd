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

from brainenc.rundir import (LIGHTNING_SHORTCUTS, RunDir, RunFolderError, check_checkpoint_file, check_run_folder,
                             checkpoint_to_test, follow_moved_folder, lock_run_folder, unlock_run_folders)

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
    "cache": ("brainenc.cli:main_cache", "precompute the feature cache of a frozen backbone"),
    "cluster": ("brainenc.analysis.embeddings:main", "cluster learned voxel embeddings into functional maps"),
    "compare": ("brainenc.compare:main_compare", "print a per-ROI table comparing run directories"),
    "insilico": ("brainenc.analysis.insilico:main", "in-silico experiments: category selectivity and preferred "
                 "images of trained runs on an image folder"),
    "algonauts-submission": ("brainenc.export.algonauts:main", "write Algonauts 2023 submission files "
                             "(subjNN/{lh,rh}_pred_test.npy) from a trained run"),
}


class BrainencCLI(LightningCLI):
    """LightningCLI with data-to-model links and results written next to the run."""

    _argv: list = []  # the command line, recorded in the run folder's lock

    def add_arguments_to_parser(self, parser) -> None:
        # voxel counts exist only once the stores are opened, hence apply_on="instantiate"
        parser.link_arguments("data.voxel_counts", "model.init_args.voxel_counts", apply_on="instantiate")
        # the images the datamodule delivers are the images the backbone is built for: one value
        parser.link_arguments("data.image_size", "model.init_args.backbone.init_args.image_size")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: then test the best checkpoint in the same process and write "
                                 "results/ as `brainenc test` does (saves a second start-up)")

    def _dump_config(self) -> None:
        # Lightning stores this dump as the model's hyperparameters (what load_from_checkpoint
        # rebuilds), but jsonargparse leaves a link target inside a nested class_path out of it:
        # without this, a checkpoint would rebuild its backbone at the default image size
        super()._dump_config()
        backbone = _get(self.config_dump, "model", "init_args", "backbone", "init_args")
        size = _get(self.config_dump, "data", "image_size")
        if isinstance(backbone, dict) and size is not None:
            backbone["image_size"] = size

    def parse_arguments(self, parser, args) -> None:
        refuse_linked_image_size(args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path before anything else runs: check
        # the file first, so a truncated last.ckpt is a clear error instead of a zip traceback
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and str(ckpt) not in LIGHTNING_SHORTCUTS:
            check_checkpoint_file(Path(ckpt))
        import pickle

        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as e:  # its hyperparameters hold objects: refused, not run
            from brainenc.lit.checkpoint import CheckpointError

            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(ckpt, "hyper_parameters", "plain values (brainenc never unpickles "
                                  "objects from checkpoints)", first) from None

    def _run_subcommand(self, subcommand: str) -> None:
        import pickle

        try:
            super()._run_subcommand(subcommand)
        except pickle.UnpicklingError as e:  # torch's weights-only reader refused an object
            from brainenc.lit.checkpoint import CheckpointError

            ckpt = self.config[subcommand].get("ckpt_path") or "--ckpt_path"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(ckpt, "<pickle>", "a checkpoint holding tensors and plain values "
                                  "(brainenc never unpickles objects from checkpoints)", first) from None

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # Lightning passes weights_only=None to torch.load, which an environment variable
        # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) turns into full unpickling: a checkpoint is data, so
        # it is always read weights-only, and asking for anything else is refused
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            if kwargs.get("weights_only") is False:
                from brainenc.errors import ConfigError

                raise ConfigError("--weights_only", "true (brainenc never unpickles objects from "
                                  "checkpoints)", "false")
            kwargs["weights_only"] = True
        return kwargs

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        _find_unused_parameters(trainer)
        return trainer

    def _lock(self) -> None:
        """One command writes a run folder at a time (rank zero holds the lock for all ranks)."""
        if _launch_rank() == 0:
            lock_run_folder(self.trainer.default_root_dir, "brainenc " + " ".join(map(str, self._argv)))

    def before_fit(self) -> None:
        from brainenc.errors import ConfigError
        from brainenc.lit.run_guard import AtomicCheckpointIO, keep_last

        ckpt = self.config[self.subcommand].get("ckpt_path")
        trainer = self.trainer
        for option in ("max_epochs", "max_steps", "limit_train_batches"):
            if getattr(trainer, option, None) == 0 or getattr(trainer.fit_loop, option, None) == 0:
                raise ConfigError(f"trainer.{option}", "a positive value (a fit of 0 epochs or steps trains "
                                  "nothing; to evaluate a checkpoint use brainenc test --ckpt_path=...)", 0)
        self._lock()
        check_run_folder(trainer, ckpt)
        self._check_matches_model(ckpt)
        for cb in trainer.checkpoint_callbacks:
            if ckpt:
                follow_moved_folder(cb)
            keep_last(cb)  # last.ckpt at every epoch end and on SIGTERM
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":  # not a user's plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # checkpoints complete or absent
        self._add_console_feedback()

    def _add_console_feedback(self) -> None:
        """One line per epoch when the progress bar is off; a precise eval-mode check instead of
        Lightning's warning about (intentionally) frozen backbones.  build_cli scopes the
        warning filter to this command."""
        import warnings

        from brainenc.lit.progress import LIGHTNING_EVAL_MODE_WARNING, EpochLine, EvalModeCheck

        if self.trainer.progress_bar_callback is None:
            self.trainer.callbacks.append(EpochLine())
        self.trainer.callbacks.append(EvalModeCheck())
        warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING)

    def before_validate(self) -> None:
        self._check_matches_model(self.config[self.subcommand].get("ckpt_path"))

    def before_test(self) -> None:
        self._lock()
        self.before_validate()

    before_predict = before_test

    def _check_matches_model(self, ckpt) -> None:
        """A checkpoint of another model (other voxel counts, readout or backbone) is a clear
        error naming the file, not Lightning's strict-loading traceback."""
        if not ckpt or str(ckpt) in LIGHTNING_SHORTCUTS:
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
        ckpt = checkpoint_to_test(self.trainer)
        if ckpt is None and self.trainer.global_step == 0:
            raise RunFolderError(f"{self.trainer.default_root_dir}: the fit trained no step and left no "
                                 "checkpoint; nothing to test (--test_after_fit)")
        # without a progress bar, EpochLine's "tested in" line gives the result (no metrics table)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True,
                          verbose=self.trainer.progress_bar_callback is not None)
        self._write_results_config()

    def after_test(self) -> None:
        self._write_results_config()

    def _write_results_config(self) -> None:
        """Write the resolved config beside the results table it produced."""
        if not self.trainer.is_global_zero:
            return
        from brainenc.ioutil import atomic_write

        out = Path(self.trainer.default_root_dir) / "results"
        if not RunDir(self.trainer.default_root_dir).tested():  # e.g. --trainer.limit_test_batches=0
            raise RunFolderError(f"{out}: the test wrote no results table (did it see any test batch? "
                                 "check --trainer.limit_test_batches and the data's test split)")
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        atomic_write(out / "config.yaml", yaml.safe_dump(dumped.get(self.subcommand, dumped), sort_keys=False))


BACKBONE_IMAGE_SIZE = "model.init_args.backbone.init_args.image_size"


def refuse_linked_image_size(args) -> None:
    """Raise ConfigError when a config file or an argument sets the backbone's ``image_size``.

    It is linked from ``data.image_size``; jsonargparse would silently keep one of the two values
    (the linked one in a YAML file, the Backbone default for a command-line flag)."""
    if not isinstance(args, (list, tuple)):
        return
    from brainenc.errors import ConfigError

    args = [str(a) for a in args]
    for i, a in enumerate(args):
        key, _, value = a.partition("=")
        following = args[i + 1] if i + 1 < len(args) else None
        if key.startswith("--model.") and "backbone" in key and key.endswith(".image_size"):
            raise ConfigError(key[2:], "no value (it is linked from data.image_size: set --data.image_size "
                              "instead)", value or following)
        config = following if a in ("-c", "--config") else value if key == "--config" else None
        if config and Path(config).is_file():
            cfg = yaml.safe_load(Path(config).read_text())
            backbone = _get(cfg, "model", "init_args", "backbone", "init_args")
            if isinstance(backbone, dict) and "image_size" in backbone:
                raise ConfigError(f"{config}: {BACKBONE_IMAGE_SIZE}", "no value (it is linked from "
                                  "data.image_size: set the image size in the data section only)",
                                  backbone["image_size"])


def _get(tree, *keys):
    """``tree[k0][k1]...`` through nested dicts, None where a level is missing or not a dict."""
    for k in keys:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


def build_cli(args: list[str], run: bool = True, **kwargs) -> BrainencCLI:
    """The one way brainenc builds its LightningCLI: ``brainenc fit|validate|test|predict``
    (``run=True``), and models and data rebuilt from a config without running (``run=False``,
    see :func:`instantiate`). ``kwargs`` go to LightningCLI (e.g. ``save_config_callback``)."""
    from jsonargparse import set_parsing_settings

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule

    # "omegaconf+" resolves ${...} after command-line overrides, so --trainer.default_root_dir
    # moves checkpoints and logs too; configs keep readable absolute paths like ${trainer.default_root_dir}
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    from brainenc.lit.progress import quiet_lightning

    with quiet_lightning():  # filters set while the CLI is built (and its command runs) end with it
        return BrainencCLI(EncoderModule, BrainDataModule, subclass_mode_model=True, args=args, run=run,
                           parser_kwargs={"parser_mode": "omegaconf+"}, seed_everything_default=0,
                           auto_configure_optimizers=False, **kwargs)


class Terminated(RuntimeError):
    """The command was stopped by SIGTERM (a scheduler's preemption, ``kill``): exit status 143."""

    exit_status = 143


def lightning_main(argv: list[str]) -> None:
    import warnings

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    BrainencCLI._argv = list(argv)
    try:
        with warnings.catch_warnings():  # filters set while this command runs are undone after it
            # we pass argv as `args` on purpose (`brainenc fit ...` is sys.argv too): not a mistake
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            build_cli(argv, save_config_kwargs={"overwrite": True})
    except SIGTERMException:
        # Lightning stops the loops with SystemExit(None), i.e. status 0: a script's `fit && test`
        # would carry on without results
        raise Terminated("stopped by SIGTERM before it finished; no results were written. The "
                         "run's checkpoints/last.ckpt holds where it stopped: rerun with "
                         "--ckpt_path=<run>/checkpoints/last.ckpt to resume") from None
    finally:
        unlock_run_folders()


def _launch_rank() -> int:
    """This process' rank as its launcher set it (Lightning's relaunch, torchrun, SLURM); 0 alone."""
    import os

    return max(int(os.environ.get(k, 0) or 0) for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK",
                                                         "SLURM_PROCID"))


def _find_unused_parameters(trainer) -> None:
    """Plain DDP (``--trainer.strategy=ddp``, or ``auto`` on several devices) with
    ``find_unused_parameters=True`` unless the config chose otherwise: each batch comes from one
    (dataset, subject) pair, so the other pairs' readout weights get no gradient in that step and
    DDP's default raises.  ``ddp_find_unused_parameters_false`` (or a DDPStrategy with the
    argument) still turns the search off."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and "find_unused_parameters" not in strategy._ddp_kwargs:
        strategy._ddp_kwargs["find_unused_parameters"] = True


#: Top-level sections of a config that describe the model and its data (a config saved by
#: `brainenc test` beside its results also holds that command's own options: ckpt_path, verbose)
MODEL_SECTIONS = ("seed_everything", "trainer", "model", "data")


def instantiate(config: str | Path, cli_args: list[str] = ()):
    """(model, datamodule set up for fitting) from a fit config, built as ``brainenc fit`` would
    build them, without running anything. ``--trainer.*`` arguments are left out (no trainer);
    so are a saved config's sections other than :data:`MODEL_SECTIONS`."""
    cfg = yaml.safe_load(Path(config).read_text())
    extra = sorted(set(cfg) - set(MODEL_SECTIONS)) if isinstance(cfg, dict) else []
    backbone = _get(cfg, "model", "init_args", "backbone", "init_args")
    # configs saved before image_size was linked repeat data.image_size in the backbone: the same
    # value the link now gives it (a different value is still refused by refuse_linked_image_size)
    stale = (isinstance(backbone, dict) and "image_size" in backbone
             and backbone["image_size"] == _get(cfg, "data", "image_size"))
    if extra or stale:
        import tempfile

        if stale:
            del backbone["image_size"]
        with tempfile.TemporaryDirectory() as tmp:
            kept = Path(tmp) / "config.yaml"
            kept.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in extra}, sort_keys=False))
            return instantiate(kept, cli_args)
    cli = build_cli(["-c", str(config), *[a for a in cli_args if not a.startswith("--trainer.")]],
                    run=False, save_config_callback=None)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def load_trained(run_dir: str | Path, config: str | Path, cli_args: list[str] = ()):
    """(model with the weights of the run's checkpoint, in eval mode; its datamodule).

    The model is rebuilt from ``config`` (:func:`instantiate`), the weights are those of
    :meth:`RunDir.checkpoint <brainenc.rundir.RunDir.checkpoint>` (best, else last), read
    without unpickling code."""
    from brainenc.lit.checkpoint import load_into
    from brainenc.rundir import RunDir

    model, dm = instantiate(config, cli_args)
    load_into(model, RunDir(run_dir).require_checkpoint(), f"the checkpoint of run {run_dir}")
    return model.eval(), dm


CACHE_USAGE = """usage: brainenc cache fill -c CONFIG.yaml [-c OVERLAY.yaml] [--key value ...]

Precompute the feature cache of every store in the config's data section with the config's
backbone (which must be frozen).  The cache is the model's `feature_cache` when the config sets
one, else FeatureCache() (default root).  Other arguments are those of `brainenc fit`."""


def main_cache(argv: list[str]) -> int:
    """``brainenc cache fill`` (see :data:`CACHE_USAGE`); returns an exit code."""
    import time

    from brainenc.features.cache import FeatureCache

    if not argv or argv[0] != "fill":
        print(CACHE_USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cli = build_cli(argv[1:], run=False, save_config_callback=None)
    model, dm = cli.model, cli.datamodule
    cache = getattr(model, "feature_cache", None) or FeatureCache()
    dm.prepare_data()
    dm.setup("fit")
    stores = {str(p.store.root): p.store for p in dm.pairs}
    for store in stores.values():
        t0 = time.perf_counter()
        path = cache.fill(model.backbone, store, model.backbone.image_size)
        print(f"{store.root}: {store.n_stimuli} stimuli -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    lines = ["usage: brainenc <command> [options]", "", "Lightning commands (YAML configs via -c, --print_config):"]
    helps = {"fit": "train an encoder", "validate": "evaluate on the validation split",
             "test": "evaluate on the test split and write the per-voxel results table",
             "predict": "predict responses: the stores' test images, or any images "
                        "with --data.predict_images=FOLDER|.npy|.h5"}
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
    of a traceback, also when a library wrapped them (jsonargparse re-raises an error of a class's
    ``__init__`` as its own ``ValueError``).  A file that cannot be written (read-only folder, disk
    full) is one line naming the file, ctrl-C one line and status 130.  ``BRAINENC_TRACEBACK=1``
    shows the traceback too."""
    import os

    try:
        rc = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        if os.environ.get("BRAINENC_TRACEBACK"):
            raise
        print("\nbrainenc: interrupted (ctrl-C); files being written were left out (rerun the command "
              "to continue)", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"brainenc: {e}", file=sys.stderr)
        return e.exit_status
    except Exception as e:
        shown = explain(e)
        if shown is None or os.environ.get("BRAINENC_TRACEBACK"):
            raise
        message, status = shown
        print(f"brainenc: error: {message}", file=sys.stderr)
        return status


#: errno -> what the user can do about a file that could not be written
_WRITE_ERRORS = {
    "ENOSPC": "no space left on the device: free space (or choose an output folder on another disk) "
              "and rerun; a fit resumes from its last.ckpt",
    "EDQUOT": "disk quota exceeded: free space and rerun; a fit resumes from its last.ckpt",
    "EACCES": "permission denied: choose a writable output folder (e.g. --trainer.default_root_dir, "
              "--out) or fix the folder's permissions",
    "EROFS": "read-only file system: choose an output folder on a writable disk",
    "EPERM": "operation not permitted: choose a writable output folder or fix its permissions",
}


def explain(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error the user can act on without a traceback, or
    None.  Walks the chain of causes (``raise ... from``, not errors raised while handling
    another, which may be bugs), so a brainenc input error (``input_error``: status 2) or an
    unwritable file (status 1) wrapped by a library is still shown as itself."""
    import errno

    seen, chain = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__
    for err in chain:
        if getattr(err, "input_error", False):
            return str(err), 2
    for err in chain:
        code = getattr(err, "errno", None)
        name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
        if name in _WRITE_ERRORS:
            # shutil.move(src, dst) names both; the destination is the user's file
            where = getattr(err, "filename2", None) or getattr(err, "filename", None) or "a file"
            return f"{where}: cannot write: {_WRITE_ERRORS[name]}", 1
    return None


def _stdout_closed() -> bool:
    """Whether stdout is the broken pipe (``brainenc ... | head`` stopped reading), as opposed to
    some other pipe or socket of the command.  A pipe whose reader has gone polls as an error."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() or stdout without a descriptor
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return True
        except (OSError, ValueError):
            pass
        return False


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``| head``): stop without a traceback.  Python would
    still try to flush stdout at exit and print 'Exception ignored ... BrokenPipeError', so stdout
    is pointed at /dev/null first.  141 = 128 + SIGPIPE, what a shell reports for a command killed
    by a closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in tests)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(console_main())
