"""Helper processes that must not outlive the process that started them.

A screening worker holds a GPU and a probe server holds open files; if their parent is killed
(kill -9 gives it no chance to stop them) they must go too. Linux's parent-death signal does that
in the kernel, even while the child is stuck in native code holding the GIL, where a watchdog
thread could not run.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits; exits at once when the
    parent is already gone (it may have died before the request). False where the call is not
    available (not Linux): the caller keeps its fallback."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != expected_parent:
        os._exit(3)
    return True
