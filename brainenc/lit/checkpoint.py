"""Read weights from checkpoint files without running code from them.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, so a crafted ``.ckpt`` runs
code.  Everything brainenc reads back (stage checkpoints of the AFO recipe, ``init_from`` of the
student, readout weights for partitions) needs only the tensors, so it is read with
``weights_only=True`` here.  A checkpoint that also pickles objects (e.g. hyperparameters of a
model built in Python) is read again with those objects replaced by inert stand-ins, so its
tensors load and nothing it names is called.  Every way a file can be wrong becomes a
:class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from brainenc.data.store import StoreError


class CheckpointError(StoreError):
    """A checkpoint file is missing, empty, truncated, unsafe or belongs to another model."""


def load_state_dict(path: str | os.PathLike, what: str = "a Lightning checkpoint") -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a file that *is* a plain state dict).

    Returns {parameter name: Tensor} on the CPU.  Raises :class:`CheckpointError` naming ``path``
    when the file is missing, empty, truncated, holds pickled objects other than tensors and
    plain containers, or has no tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "<file>", what, "missing")
    if p.stat().st_size == 0:
        raise CheckpointError(p, "<file>", what, "an empty file (an interrupted save?)")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses the whole file when any part (typically hyper_parameters built
            # in Python, e.g. a FeatureCache) holds an object; the tensors are still wanted, so
            # read again with every such object replaced by an inert stand-in.  Only a zip
            # checkpoint gets that second reading: torch's legacy (non-zip) reader calls the
            # pickle module's plain ``load`` for its header records, outside any Unpickler we
            # could restrict, so such a file is refused instead
            if not zipfile.is_zipfile(p):
                raise pickle.UnpicklingError(
                    "a legacy (non-zip) pickle holding objects other than tensors; brainenc reads "
                    "only torch.save zip checkpoints beyond plain tensors") from None
            obj = _load_with_inert_objects(p)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(p, "<pickle>", f"{what} holding tensors and plain values (brainenc "
                              "never unpickles objects from checkpoints)",
                              (first[0] if first else "")[:200]) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(p, "<file>", f"{what} (a complete torch.save zip file)",
                              f"an unreadable or truncated file ({str(e).splitlines()[0][:160]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(p, "state_dict", "{name: Tensor} (a Lightning checkpoint or a state dict)",
                              type(obj).__name__ if state is None else "no tensors or non-tensor values")
    return dict(state)


class _Inert:
    """Stands for any object a checkpoint pickles besides tensors and plain containers: built
    without calling anything from the file, it only records what it was given."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # pickle's SETITEM(S) on dict-like objects
        pass

    def append(self, value):  # APPEND(S) on list-like objects
        pass

    def extend(self, values):
        pass


def _load_with_inert_objects(path: Path):
    """``torch.load`` whose unpickler resolves only the globals ``weights_only`` allows (tensor
    rebuilding, dtypes, plain containers) and turns every other global into :class:`_Inert`,
    so no code named by the file runs."""
    import types

    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # a torch without the allow-list: refuse rather than guess
        raise pickle.UnpicklingError("objects other than tensors (and no safe way to skip them)") from None
    allowed = _get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return allowed.get(f"{module}.{name}", _Inert)

    def load(file, **kwargs):  # never pickle.load: every pickle in the file goes through find_class above
        return Unpickler(file, **kwargs).load()

    if not zipfile.is_zipfile(path):  # the legacy format would read records through ``load``
        raise pickle.UnpicklingError("not a torch.save zip file")
    module = types.ModuleType("brainenc_inert_pickle")
    module.Unpickler, module.load, module.__version__ = Unpickler, load, "1"
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)


def load_into(model: nn.Module, path: str | os.PathLike, what: str = "a checkpoint of this model") -> nn.Module:
    """Load the weights of ``path`` into ``model`` (strict), or raise a :class:`CheckpointError`
    that lists the first unexpected, missing or mis-shaped parameters."""
    state = load_state_dict(path, what)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    shape = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unexpected or missing or shape:
        raise CheckpointError(path, "state_dict", f"{what} (same parameter names and shapes)",
                              f"from another model: unexpected {unexpected[:3]}, missing {missing[:3]}, "
                              f"mis-shaped {shape[:3]}")
    model.load_state_dict(state)
    return model
