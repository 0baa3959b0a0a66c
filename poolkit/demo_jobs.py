"""The jobs of ``poolkit demo``: the code that runs in the workers.

They live at module level, apart from the parent's side (``demo.py``), so
that they pickle by reference; the workers are forked from a template that
already imported this module. Each returns what it saw of itself (its job id,
job type and pid), which the parent checks against the job's future.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import resource
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .context import report_progress

__all__ = ["backup", "close_source_db", "crash", "extract", "fine_tune", "hang", "leak", "open_source_db"]

_source: sqlite3.Connection | None = None
_leaked: list[bytes] = []


def _identity() -> dict[str, Any]:
    """What the job sees of itself, checked by the parent against the future."""
    return {
        "job_id": os.environ.get("POOLKIT_JOB_ID"),
        "job_type": os.environ.get("POOLKIT_JOB_TYPE"),
        "pid": os.getpid(),
    }


def open_source_db(directory: str) -> None:
    """Worker initializer: one connection per worker, reused by all its backup jobs."""
    global _source
    _source = sqlite3.connect(os.path.join(directory, "source.db"))
    Path(directory, "connections", f"opened-{os.getpid()}").touch()


def close_source_db(directory: str) -> None:
    """Worker finalizer: runs when the worker retires or the pool shuts down (not when it is killed)."""
    global _source
    if _source is not None:
        _source.close()
        _source = None
        Path(directory, "connections", f"closed-{os.getpid()}").touch()


def extract(seed: int, records: int) -> dict[str, Any]:
    """Render ``records`` CSV sales records, parse them back and aggregate revenue per region."""
    rng = random.Random(seed)
    regions = ("north", "south", "east", "west")
    products = ("widget", "gadget", "gizmo", "doohickey")
    text = io.StringIO()
    writer = csv.writer(text)
    for i in range(records):
        day = f"2024-05-{1 + i % 28:02d}"
        price = rng.randint(100, 9999) / 100
        writer.writerow((day, rng.choice(regions), rng.choice(products), rng.randint(1, 9), price))
    revenue: dict[str, float] = dict.fromkeys(regions, 0.0)
    count: Counter[str] = Counter()
    text.seek(0)
    for n, (_day, region, _product, qty, unit_price) in enumerate(csv.reader(text), 1):
        revenue[region] += int(qty) * float(unit_price)
        count[region] += 1
        if n % 5000 == 0:
            report_progress(f"parsed {n}/{records}")
    return {
        "records": sum(count.values()),
        "per_region": dict(count),
        "revenue": round(sum(revenue.values()), 2),
        **_identity(),
    }


def backup(directory: str) -> dict[str, Any]:
    """Copy the source database with SQLite's online backup API, then check the copy."""
    if _source is None:
        raise RuntimeError("the worker initializer did not open the source database")
    job_id = os.environ.get("POOLKIT_JOB_ID", str(os.getpid()))
    target = os.path.join(directory, "backups", f"{job_id}.db")

    def copied(status: int, remaining: int, total: int) -> None:
        report_progress(f"pages {total - remaining}/{total}")
        time.sleep(0.02)  # a real backup competes with writers; let the display see it move

    destination = sqlite3.connect(target)
    try:
        _source.backup(destination, pages=16, progress=copied)
        rows = destination.execute("SELECT count(*) FROM events").fetchone()[0]
        integrity = destination.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        destination.close()
    return {"rows": rows, "integrity": integrity, "bytes": os.path.getsize(target), **_identity()}


def fine_tune(seed: int, epochs: int) -> dict[str, Any]:
    """A small training loop (linear model, mini-batch SGD) reporting epoch and loss."""
    rng = random.Random(seed)
    features = 6
    true_w = [rng.uniform(-2, 2) for _ in range(features)]
    data = []
    for _ in range(192):
        x = [rng.uniform(-1, 1) for _ in range(features)]
        data.append((x, sum(w * v for w, v in zip(true_w, x, strict=True)) + rng.gauss(0, 0.05)))
    w = [0.0] * features

    def loss() -> float:
        return sum((sum(a * b for a, b in zip(w, x, strict=True)) - y) ** 2 for x, y in data) / len(data)

    first = loss()
    rate = 0.1
    for epoch in range(1, epochs + 1):
        rng.shuffle(data)
        for start in range(0, len(data), 16):
            batch = data[start : start + 16]
            grad = [0.0] * features
            for x, y in batch:
                error = sum(a * b for a, b in zip(w, x, strict=True)) - y
                for k in range(features):
                    grad[k] += 2 * error * x[k] / len(batch)
            w = [a - rate * g for a, g in zip(w, grad, strict=True)]
        report_progress(f"epoch {epoch}/{epochs} loss {loss():.4f}")
        time.sleep(0.08)  # the simulated accelerator step
    return {"initial_loss": first, "final_loss": loss(), "epochs": epochs, **_identity()}


def leak(megabytes: int) -> dict[str, Any]:
    """Keep ``megabytes`` of touched memory for the life of the worker, as leaky job code does."""
    _leaked.append(b"\x01" * (megabytes * 2**20))
    time.sleep(0.5)
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss": rss, "leaked_mib": megabytes * len(_leaked), **_identity()}


def crash(how: str) -> None:
    """Kill this worker: ``exit`` calls ``os._exit(3)``, ``segfault`` reads address 0."""
    time.sleep(0.3)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
    if how == "segfault":
        import ctypes

        ctypes.string_at(0)
    os._exit(3)


def hang(seconds: float) -> None:
    """Sleep far longer than the job's timeout allows."""
    time.sleep(seconds)
