"""Re-exec under tcmalloc when the machine has it: +18-35% measured on large allocations here
(training and decode). Set ANGELMED_NO_TCMALLOC=1 to opt out."""

from __future__ import annotations

import os
import sys

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by the same command with tcmalloc preloaded (no-op if unavailable or done)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if os.environ.get("ANGELMED_NO_TCMALLOC") or "tcmalloc" in preload or not os.path.exists(LIB):
        return
    env = dict(os.environ, LD_PRELOAD=f"{LIB}:{preload}" if preload else LIB, ANGELMED_NO_TCMALLOC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
