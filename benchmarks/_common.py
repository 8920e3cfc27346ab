"""What every benchmark reports the same way (run_all.py skips files starting with "_")."""

from __future__ import annotations

import platform
import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if platform.system() == "Darwin" else peak / 1024, 1)
