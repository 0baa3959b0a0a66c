"""A job module that prints while it is imported: ``poolkit run`` must keep that off its JSON lines."""

from __future__ import annotations

print("noisy module imported")


def double(x: int) -> int:
    return 2 * x
