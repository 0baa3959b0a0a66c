"""What ``import poolkit`` loads: the library's own needs, nothing that only a display or an extra uses.

Why it matters beyond import time: a fork pool's template and workers are
forks of your process, so every module the library imports makes each fork
slower and each worker's first writes copy more pages (a pool's cold start
paid about 1.5 ms for ``rich`` alone, imported for a progress bar that
most runs never draw).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

#: Packages that only the CLI's displays, the live progress bar, the Dask
#: backend, the tests or the benchmarks use.
NOT_FOR_THE_LIBRARY = ("rich", "dask", "distributed", "psutil", "numpy")


def _top_level_modules_after(code: str) -> set[str]:
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=True
    )
    return set(done.stdout.split())


def test_import_poolkit_loads_no_display_or_extra_package() -> None:
    loaded = _top_level_modules_after("import poolkit, poolkit.batch, poolkit.executor")
    assert "poolkit" in loaded and "cloudpickle" in loaded  # the check itself sees imports
    assert sorted(loaded.intersection(NOT_FOR_THE_LIBRARY)) == []


def test_a_pool_that_ran_a_job_has_still_not_loaded_rich() -> None:
    loaded = _top_level_modules_after(
        "import poolkit\n"
        "with poolkit.Pool(1) as pool:\n"
        "    assert list(pool.map(abs, [-1, -2], progress=lambda counts: None)) == [1, 2]\n"
    )
    assert "rich" not in loaded


def test_the_live_bar_loads_rich_when_it_is_shown() -> None:
    loaded = _top_level_modules_after("import poolkit.progress_bar")
    assert "rich" in loaded


_A_CRASH = (
    "import os, poolkit\n"
    "with poolkit.Pool(1) as pool:\n"
    "    try:\n"
    "        pool.submit(os._exit, 3).result(timeout=30)\n"
    "    except poolkit.WorkerCrashed:\n"
    "        pass\n"
)


def test_a_warning_nobody_listens_to_loads_no_logging_library() -> None:
    """With logging left alone, a crashed worker's warning reaches only poolkit's NullHandler.

    Importing structlog for it (and the display packages it pulls in) stalled
    the pool's manager thread for 60-100 ms in the middle of a crash storm.
    """
    assert "structlog" not in _top_level_modules_after(_A_CRASH)


def test_a_warning_someone_listens_to_is_logged() -> None:
    code = "import logging\nlogging.basicConfig(level=logging.WARNING)\n" + _A_CRASH
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert "job.crashed" in done.stderr or "worker.crashed" in done.stderr, done.stderr
