"""Console feedback for runs without a progress bar, and a precise eval-mode check.

:class:`EpochLine` prints one line per epoch (run, epoch, validation median r, time per epoch,
time left), so a long ``make quickstart`` with progress bars off still says what it is doing.
:class:`EvalModeCheck` replaces Lightning's blanket "Found N module(s) in eval mode" warning:
modules of a *frozen* backbone are in eval mode on purpose; any other module in eval mode at the
start of training is still reported.
:func:`quiet_lightning` scopes the filters for the messages of Lightning and torch that say
nothing to a brainenc user, so the console holds brainenc's progress lines and real problems.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import lightning as L

# Lightning's own message, silenced only while EvalModeCheck is installed (it checks instead)
LIGHTNING_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
#: brainenc hands LightningCLI its argv as ``args`` on purpose (``brainenc fit ...`` is sys.argv
#: too), which Lightning takes for a possible mistake
LIGHTNING_ARGS_WARNING = r"LightningCLI's args parameter is intended"
#: Lightning's own use of torch's deprecated ``LeafSpec`` (lightning/pytorch/utilities/_pytree.py),
#: nothing a user can act on
TORCH_PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: logged-metric frequency on a small training set: brainenc reports per epoch (EpochLine)
LIGHTNING_LOG_INTERVAL_WARNING = r"The number of training batches \(\d+\) is smaller than the logging interval"
#: Lightning's advertisements for its cloud services (litlogger, litmodels), logged at info level
LIGHTNING_TIP = "\N{ELECTRIC LIGHT BULB} Tip:"
#: Lightning's info lines that every command repeats and that say nothing a brainenc user acts on:
#: the seed (in the saved config), the accelerators found (a GPU left unused is still a warning),
#: how it counts steps, and which checkpoint it loads (brainenc's own lines name the checkpoint of a
#: resume and the test's result)
LIGHTNING_BOILERPLATE = (LIGHTNING_TIP, "Seed set to ", "GPU available: ", "TPU available: ", "HPU available: ",
                         "Loading `train_dataloader` to estimate number of stepping batches",
                         "Restoring states from the checkpoint path at ", "Loaded model weights from the checkpoint at ",
                         "Restored all states from the checkpoint at ",
                         # a whole-state save (the ridge's own checkpoint after its closed-form solve)
                         "`weights_only` was not set, defaulting to `False`")
#: the loggers whose handlers print Lightning's info lines (records of their children propagate here)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
#: the loggers that emit those lines: filtered themselves too, so no other handler (a user's log
#: file, pytest's capture) receives them either
LIGHTNING_SOURCES = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.fabric.utilities.seed")


class _DropBoilerplate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        if message.startswith("[rank"):  # under DDP: "[rank: 1] Seed set to 0"
            message = message.split("] ", 1)[-1]
        return not message.startswith(LIGHTNING_BOILERPLATE)


@contextlib.contextmanager
def quiet_lightning(eval_mode_intended: bool = False):
    """While inside: Lightning's tips and per-command info lines (:data:`LIGHTNING_BOILERPLATE`), its
    ``args`` notice, its logging-interval notice and torch's ``_pytree`` deprecation raised from
    Lightning are dropped (and, with ``eval_mode_intended`` — the caller keeps modules
    in eval mode on purpose, e.g. transfer's frozen base — Lightning's eval-mode warning); every other warning
    and log line passes, and the filters are undone on exit (no global state left behind, e.g.
    for a test run in the same process)."""
    # on the emitting loggers (no handler anywhere gets the record) and on the handlers that print
    # Lightning's lines (they also see records propagated from any other child logger)
    drop = _DropBoilerplate()
    filtered = {h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers}
    filtered |= {logging.getLogger(name) for name in LIGHTNING_SOURCES}
    for f in filtered:
        f.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LIGHTNING_ARGS_WARNING)
            warnings.filterwarnings("ignore", message=TORCH_PYTREE_WARNING, category=FutureWarning)
            warnings.filterwarnings("ignore", message=LIGHTNING_LOG_INTERVAL_WARNING)
            if eval_mode_intended:
                warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING)
            yield
    finally:
        for f in filtered:
            f.removeFilter(drop)


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EpochLine(L.Callback):
    """Print ``[run] epoch e/E  val median r 0.213  12s/epoch  ~3m36s left`` after each epoch,
    and where the rest of a command's time goes: ``[run] started in 9.1s`` (imports, data and
    model set-up: from the first import of brainenc to the first training batch) and
    ``[run] tested in 4.2s`` (the test loop)."""

    def __init__(self, name: str | None = None, metric: str = "val/pearson_median"):
        self.name, self.metric = name, metric
        self._t0: float | None = None
        self._test_t0: float | None = None
        self._epochs_timed = 0

    def _label(self, trainer) -> str:
        return self.name or Path(trainer.default_root_dir).name

    def on_train_start(self, trainer, pl_module) -> None:
        import brainenc

        self._t0, self._epochs_timed = time.monotonic(), 0
        if trainer.is_global_zero:
            resumed = (f" (resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch + 1}, "
                       f"step {trainer.global_step})" if trainer.ckpt_path else "")
            print(f"[{self._label(trainer)}] started in {self._t0 - brainenc.STARTED:.1f}s{resumed}", flush=True)

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_t0 = time.monotonic()

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self._test_t0 is not None:
            value = trainer.callback_metrics.get("test/pearson_median")
            result = f": test median r {float(value):.3f}" if value is not None else ""
            print(f"[{self._label(trainer)}] tested in {time.monotonic() - self._test_t0:.1f}s{result}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self._t0 is None or trainer.sanity_checking:
            return
        self._epochs_timed += 1
        per_epoch = (time.monotonic() - self._t0) / self._epochs_timed
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        parts = [f"[{self._label(trainer)}] epoch {done}/{total}"]
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            parts.append(f"val median r {float(value):.3f}")
        parts.append(f"{per_epoch:.1f}s/epoch")
        if total and total > 0:
            parts.append(f"~{_fmt_seconds(per_epoch * (total - done))} left")
        print("  ".join(parts), flush=True)


class EvalModeCheck(L.Callback):
    """Warn about modules in eval mode at the start of training, except inside frozen backbones."""

    def on_train_start(self, trainer, pl_module) -> None:
        frozen = [name for name, m in pl_module.named_modules()
                  if name and getattr(m, "frozen", False) is True]
        unexpected = [name for name, m in pl_module.named_modules()
                      if not m.training and not any(name == f or name.startswith(f + ".") for f in frozen)]
        if unexpected and trainer.is_global_zero:
            warnings.warn(f"{len(unexpected)} module(s) outside a frozen backbone are in eval mode at the start "
                          f"of training (e.g. {unexpected[:3]}); call .train() on them if they should learn",
                          stacklevel=2)
