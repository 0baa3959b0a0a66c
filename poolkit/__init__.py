"""poolkit: a process pool that never hangs and never loses a job.

Warm forked workers, recycling on jobs, memory and lifetime, per-job
timeouts, crash isolation, job context and progress, and a drop-in
``concurrent.futures`` executor.
"""

from .batch import Outcome
from .context import JobContext, current_job, report_progress
from .errors import (
    BrokenPool,
    JobTimeout,
    MemoryLimitExceeded,
    PoolkitError,
    RemoteTraceback,
    UnpicklableJobError,
    UnpicklingFailed,
    WorkerCrashed,
)
from .executor import ProcessPoolExecutor
from .futures import JobFuture
from .job_progress import ProgressCounts
from .logs import log_to_json
from .pool import JobOptions, Pool
from .share import Shared
from .shortcuts import batch  # from here on poolkit.batch is the function, not the module
from .stats import JobStats, PoolStats, WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "BrokenPool",
    "JobContext",
    "JobFuture",
    "JobOptions",
    "JobStats",
    "JobTimeout",
    "MemoryLimitExceeded",
    "Outcome",
    "Pool",
    "PoolStats",
    "PoolkitError",
    "ProcessPoolExecutor",
    "ProgressCounts",
    "RemoteTraceback",
    "Shared",
    "UnpicklableJobError",
    "UnpicklingFailed",
    "WorkerCrashed",
    "WorkerInfo",
    "__version__",
    "batch",
    "current_job",
    "log_to_json",
    "report_progress",
]
