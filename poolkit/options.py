"""The pool's options, declared once.

Every front end of a pool takes the same options: [`Pool`][poolkit.Pool] and
``ProcessPoolExecutor`` as keyword arguments, ``DaskPool`` for the pool on
each node, and ``poolkit run`` as command-line flags. Each option is declared
here once (name, default, what it does, and how the command line spells and
reads it); the CLI builds its pool flags from this table, and
``tests/test_options.py`` fails when a signature drifts from it.

Validation is ``PoolConfig.build``'s (``config.py``), so every front end
reports a bad value with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["POOL_OPTIONS", "Option", "option"]

# How a command-line flag reads its text (see cli.py).
CliKind = Literal["count", "size", "seconds", "choice"]


@dataclass(frozen=True)
class Option:
    """One pool option."""

    name: str
    default: Any
    help: str
    cli: CliKind | None = None  # None: not a command-line flag
    aliases: tuple[str, ...] = ()  # older or shorter spellings of its flag
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    dask: bool = True  # DaskPool takes it (for the pool on every node)

    @property
    def flag(self) -> str:
        """Its command-line flag: the option's name with dashes."""
        return "--" + self.name.replace("_", "-")


POOL_OPTIONS: tuple[Option, ...] = (
    Option("max_workers", None, "worker processes (default: the CPUs available)",
           cli="count", aliases=("-w", "--workers"), metavar="N"),
    Option("mp_context", None, "a multiprocessing context; only its start method is used", dask=False),
    Option("initializer", None, "run once in each worker before its first job"),
    Option("initargs", (), "arguments for initializer"),
    Option("start_method", None, "how workers start (default: fork)",
           cli="choice", choices=("fork", "forkserver", "spawn")),
    Option("preload", (), "modules the template imports so that workers start with them"),
    Option("finalizer", None, "run in each worker when it retires or the pool shuts down"),
    Option("finalargs", (), "arguments for finalizer"),
    Option("max_tasks_per_child", None, "recycle a worker after N jobs", cli="count", metavar="N"),
    Option("recycle_jitter", 0.1, "retire up to this fraction earlier, at random (0..1)"),
    Option("max_memory_per_child", None,
           "recycle a worker whose memory after a job is above SIZE (bytes or e.g. 512MiB)",
           cli="size", metavar="SIZE"),
    Option("memory_limit_per_child", None,
           "kill a worker whose memory goes above SIZE while a job runs (that input fails)",
           cli="size", aliases=("--memory-limit",), metavar="SIZE"),
    Option("memory_check_interval", 0.01, "seconds between two samples of a busy worker's memory"),
    Option("max_lifetime_per_child", None, "recycle a worker after this many seconds",
           cli="seconds", metavar="SECONDS"),
    Option("idle_timeout", None, "a worker idle this long exits (down to min_workers)"),
    Option("min_workers", None, "the floor for idle_timeout (default: max_workers)"),
    Option("job_timeout", None, "default per-job timeout in seconds"),
    Option("kill_grace", 1.0, "seconds between SIGTERM and SIGKILL when stopping a worker"),
    Option("exit_timeout", 10.0, "seconds a retiring worker has to run its finalizer and exit"),
    Option("start_timeout", 300.0, "seconds a new worker has to become ready"),
    Option("stall_timeout", 60.0, "seconds the pool's thread may spend in a callback before the pool counts as stuck"),
    Option("name", None, "a name for logs and stats"),
    # Dask moves a job's data with its own transport; a node pool's jobs come from there.
    Option("shm_threshold", 1 << 20,
           "arguments and results with buffers of at least this many bytes go through shared memory",
           dask=False),
)

_BY_NAME = {option.name: option for option in POOL_OPTIONS}


def option(name: str) -> Option:
    """The declared option called ``name``."""
    return _BY_NAME[name]
