"""Child processes that do not outlive their parent.

``brainenc afo`` and ``brainenc sweep`` run each fit as a child ``python -m brainenc.cli``.  If
only the parent is killed, an orphaned child would keep training and writing into the run folder,
and a rerun of the parent would start a second fit beside it.  On Linux the child asks the kernel
to SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG)``).  SIGKILL rather than SIGTERM:
Lightning turns SIGTERM into a stop at the next batch, which never comes if the child is stuck
in data loading; an interrupted fit resumes exactly from its last checkpoint anyway.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` for :mod:`subprocess` that ties the child's life to this process
    (None where the platform has no such mechanism)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    parent = os.getpid()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # the parent may have died between fork and prctl: then nobody would signal us
        if os.getppid() != parent:
            os._exit(1)

    return preexec
