"""The cost of a run: peak resident memory (``peak_rss_gb``)."""

from __future__ import annotations

import resource


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
