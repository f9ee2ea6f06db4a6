"""Progress text shared by the long jobs' console lines: done/total, percentage and ETA."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h07m: short and fixed in form, for log lines."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done: float, total: float, seconds_per_unit: float) -> str:
    """"43% ETA 1m12s" from progress so far and the current rate (seconds per unit of work)."""
    pct = 100.0 * done / total if total else 100.0
    return f"{pct:.0f}% ETA {duration(max(total - done, 0) * seconds_per_unit)}"
