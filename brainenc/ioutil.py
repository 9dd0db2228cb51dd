"""Small helpers every layer shares: atomic writes, file hashes and the DDP world.

They live here, below everything else, so that the store, the feature cache, the results table,
the reports and the sweep write files the same way and no layer imports another just for a helper.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write", "ddp_world", "file_digest", "tmp_name"]


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``.

    Hidden, beside ``path`` (a rename within one directory is atomic) and keyed by the process,
    so two processes writing the same file never share a temporary one.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    On an error inside the block the temporary file is removed and ``path`` keeps its old
    content (or stays absent), so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in chunks of ``chunk`` bytes (any size of file)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ddp_world() -> tuple[int, int]:
    """(world size, rank) of the initialised torch.distributed group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
