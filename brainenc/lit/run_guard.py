"""What a fit writes into its run folder, whatever Lightning's defaults do.

* :class:`AtomicCheckpointIO`: a checkpoint is written under a temporary name beside its target
  and renamed when complete.  Lightning's own writer saves to the system's temporary folder and
  then *copies* the file into the run folder, so a full disk (or a kill) leaves a truncated
  ``best.ckpt`` where the previous complete one was.
* :func:`keep_last`: ``last.ckpt`` at every epoch end (Lightning 2.6 writes it only
  when a top-k checkpoint was written in the same step, i.e. when validation improved), and on
  SIGTERM before the fit stops, so a killed or preempted run resumes from where it was.

Both are attached by the CLI to every ``brainenc fit`` (:meth:`brainenc.cli.BrainencCLI.before_fit`).
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from brainenc.ioutil import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear complete or not at all (local paths)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(Path(path)) as tmp:
            try:
                torch.save(checkpoint, tmp)
            except RuntimeError as e:
                # torch's zip writer reports a short write (a full disk or quota) as a RuntimeError
                if "unexpected pos" in str(e) or "PytorchStreamWriter failed" in str(e):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
                raise


def keep_last(cb) -> None:
    """Make ModelCheckpoint ``cb`` (with ``save_last``) write ``last.ckpt`` at every epoch end and
    on SIGTERM.

    After ``cb``'s own epoch-end hook (the one it saves in: train epoch end or validation end),
    ``last.ckpt`` is written if ``cb`` wrote nothing at this step; on a SIGTERM it is written
    before Lightning stops the fit.  The hooks are wrapped on the instance because Lightning
    runs checkpoint callbacks after all others: a separate callback would run first.  Relies on
    ModelCheckpoint's ``_last_global_step_saved`` (the step of its latest write) to write nothing
    twice."""
    if not isinstance(cb, ModelCheckpoint) or not cb.save_last or cb.dirpath is None:
        return

    def save_last(trainer) -> None:
        if cb._last_global_step_saved != trainer.global_step:  # nothing written at this step
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))

    def after(hook, on_train_epoch_end: bool):
        def wrapped(trainer, pl_module, *args):
            hook(trainer, pl_module, *args)
            if (not trainer.fast_dev_run and not trainer.sanity_checking
                    and trainer.state.fn == TrainerFn.FITTING
                    and cb._should_save_on_train_epoch_end(trainer) == on_train_epoch_end):
                save_last(trainer)
        return wrapped

    on_exception = cb.on_exception

    def on_sigterm(trainer, pl_module, exception: BaseException) -> None:
        on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            save_last(trainer)

    cb.on_train_epoch_end = after(cb.on_train_epoch_end, True)
    cb.on_validation_end = after(cb.on_validation_end, False)
    cb.on_exception = on_sigterm
