"""How poolkit writes a span of time for people: progress lines, bars and summaries.

A module of its own, with no imports, so that the library's progress lines
(``job_progress``) and the CLI's displays (``progress``, which needs ``rich``)
write times the same way without the library importing ``rich``.
"""

from __future__ import annotations

__all__ = ["format_duration", "format_eta"]


def format_duration(seconds: float) -> str:
    """``"4.2 s"`` under a minute, ``"3 min 05 s"`` above."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def format_eta(seconds: float | None) -> str:
    """``"0:03:05"`` (hours, minutes, seconds), or ``"-:--:--"`` while the time left is not known."""
    if seconds is None:
        return "-:--:--"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
