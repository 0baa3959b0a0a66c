"""Large arguments and results through shared memory (poolkit/shm.py).

What a user sees: large buffers arrive intact, of the same type, writable
where they were writable, readonly where they were readonly; numpy arrays
and memoryviews on the receiving side are built over a mapped region
instead of being copied (``large_jobs.in_region`` looks them up in
``/proc/PID/maps``); small payloads and ``shm_threshold=None`` take the
plain pickle path; nothing (descriptor, mapping) is left behind.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")

import large_jobs  # noqa: E402
from conftest import python_env, wait_for_pid_file, wait_until, worker_pids  # noqa: E402

from poolkit import (  # noqa: E402
    MemoryLimitExceeded,
    Pool,
    ProcessPoolExecutor,
    Shared,
    WorkerCrashed,
    shm,
)

MiB = 1 << 20
METHODS = ["fork", "forkserver", "spawn"]


@pytest.fixture(params=METHODS)
def pool(request: pytest.FixtureRequest, leak_check: object) -> Pool:
    with Pool(2, start_method=request.param, shm_threshold=MiB) as pool:
        yield pool


def _roundtrip(obj: object, threshold: int = MiB) -> tuple[object, bool]:
    payload, region = shm.dumps(obj, threshold)
    if region is None:
        return pickle.loads(payload), False
    incoming = shm.Incoming(os.dup(region.fd))
    region.close()
    return shm.loads(payload, incoming), True


# ----------------------------------------------------------------- correctness, every start method


def test_large_array_argument_arrives_mapped_and_result_comes_back_mapped(pool: Pool) -> None:
    a = np.random.default_rng(1).random(2 * MiB // 8)
    info = pool.submit(large_jobs.describe, a).result(timeout=60)
    assert info == {"type": "ndarray", "in_region": True, "writeable": True, "sum": pytest.approx(a.sum())}
    out = pool.submit(large_jobs.double, a).result(timeout=60)
    np.testing.assert_array_equal(out, a * 2.0)
    assert large_jobs.in_region(out), "the result should be rebuilt over the mapped region, not copied"
    assert out.flags.writeable
    out[:] = 0.0  # a private copy-on-write mapping: the caller may write its result
    assert pool.submit(large_jobs.double, a).result(timeout=60)[5] == a[5] * 2.0


def test_many_shapes_and_types_round_trip(pool: Pool) -> None:
    rng = np.random.default_rng(2)
    c = rng.random((512, 512))  # 2 MiB, C order
    cases = [
        c,
        np.asfortranarray(c),
        c[:, ::2],  # not contiguous: numpy pickles it as bytes (a hole)
        c.astype(np.float32),
        np.arange(MiB, dtype=np.int64).reshape(1024, -1),
    ]
    for array in cases:
        out = pool.submit(large_jobs.identity, array).result(timeout=60)
        np.testing.assert_array_equal(out, array)
        assert out.dtype == array.dtype and out.shape == array.shape
    small = np.arange(10.0)
    out = pool.submit(large_jobs.identity, small).result(timeout=60)
    np.testing.assert_array_equal(out, small)
    assert not large_jobs.in_region(out)


def test_object_arrays_fall_back_in_band(pool: Pool) -> None:
    objects = np.array([{"k": i} for i in range(200_000)], dtype=object)
    out = pool.submit(large_jobs.identity, objects).result(timeout=60)
    assert out.dtype == object and out[123_456] == {"k": 123_456}


def test_readonly_input_stays_readonly_in_the_worker_and_results_are_writable(pool: Pool) -> None:
    a = np.ones(2 * MiB // 8)
    a.flags.writeable = False
    info = pool.submit(large_jobs.describe, a).result(timeout=60)
    assert info["in_region"] is True and info["writeable"] is False
    out = pool.submit(large_jobs.identity, a).result(timeout=60)
    assert not out.flags.writeable  # it was readonly when the worker pickled it
    doubled = pool.submit(large_jobs.double, a).result(timeout=60)
    assert doubled.flags.writeable


def test_bytes_bytearray_memoryview_picklebuffer(pool: Pool) -> None:
    data = os.urandom(3 * MiB)
    assert pool.submit(large_jobs.identity, data).result(timeout=60) == data
    assert pool.submit(large_jobs.length, data).result(timeout=60) == len(data)
    back = pool.submit(large_jobs.identity, bytearray(data)).result(timeout=60)
    assert type(back) is bytearray and back == data
    nested = pool.submit(large_jobs.identity, {"a": [data, 1], "b": (bytearray(data),)}).result(timeout=60)
    assert nested["a"][0] == data and nested["b"][0] == data

    view = memoryview(np.arange(MiB, dtype=np.float64))  # 8 MiB, format "d"
    info = pool.submit(large_jobs.describe, view).result(timeout=60)
    assert info == {"type": "memoryview", "in_region": True, "writeable": True, "format": "d"}
    out = pool.submit(large_jobs.identity, view).result(timeout=60)
    assert type(out) is memoryview and out.format == "d" and out.shape == view.shape
    assert out[12345] == 12345.0 and not out.readonly
    assert large_jobs.in_region(out)
    readonly = pool.submit(large_jobs.identity, memoryview(data)).result(timeout=60)
    assert readonly.readonly and bytes(readonly) == data

    buffer = pool.submit(large_jobs.identity, pickle.PickleBuffer(bytearray(data))).result(timeout=60)
    assert bytes(buffer) == data


_PANDAS_SCRIPT = """
import numpy as np, pandas as pd, large_jobs
from poolkit import Pool
frame = pd.DataFrame({"x": np.arange(1 << 20, dtype=np.float64), "y": np.ones(1 << 20)})
with Pool(2, start_method=METHOD) as pool:
    out = pool.submit(large_jobs.identity, frame).result(timeout=60)
pd.testing.assert_frame_equal(out, frame)
print("same frame")
"""


@pytest.mark.parametrize("start_method", METHODS)
def test_pandas_frame_rides_on_its_numpy_blocks(start_method: str) -> None:
    # In a child interpreter: importing pandas into the test process would
    # change what every later test's forked workers inherit.
    if importlib.util.find_spec("pandas") is None:
        pytest.skip("pandas is not installed")
    script = f"METHOD = {start_method!r}\n" + _PANDAS_SCRIPT
    done = subprocess.run(
        [sys.executable, "-c", script], env=python_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "same frame"


def test_executor_map_over_large_arrays(leak_check: object) -> None:
    arrays = [np.full(MiB // 4, float(i)) for i in range(6)]  # 2 MiB each
    with ProcessPoolExecutor(2) as executor:
        out = list(executor.map(large_jobs.double, arrays))
    for i, array in enumerate(out):
        assert array.shape == (MiB // 4,) and array[0] == 2.0 * i


# ----------------------------------------------------------------- the option and the fallback


def test_threshold_none_sends_everything_through_the_socket(leak_check: object) -> None:
    a = np.ones(2 * MiB // 8)
    with Pool(1, shm_threshold=None) as pool:
        info = pool.submit(large_jobs.describe, a).result(timeout=60)
        out = pool.submit(large_jobs.double, a).result(timeout=60)
    assert info["in_region"] is False
    assert not large_jobs.in_region(out)
    np.testing.assert_array_equal(out, a * 2.0)


def test_a_smaller_threshold_moves_smaller_buffers(leak_check: object) -> None:
    a = np.ones(64 * 1024 // 8)  # 64 KiB: under the default, over this pool's threshold
    with Pool(1, shm_threshold="32KiB") as pool:
        assert pool.submit(large_jobs.describe, a).result(timeout=60)["in_region"] is True
    with Pool(1) as pool:
        assert pool.submit(large_jobs.describe, a).result(timeout=60)["in_region"] is False


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), ("lots", ValueError), (True, TypeError), (1.5, TypeError), ([1], TypeError)],
)
def test_bad_threshold_is_refused_where_the_pool_is_built(value: object, error: type) -> None:
    with pytest.raises(error, match="shm_threshold"):
        Pool(1, shm_threshold=value)  # type: ignore[arg-type]


def test_zero_threshold_turns_it_off() -> None:
    assert Pool.__init__ is not None
    from poolkit.config import _threshold

    assert _threshold(0) is None and _threshold(None) is None and _threshold("2MiB") == 2 * MiB


# ----------------------------------------------------------------- the transport itself


def test_small_payloads_stay_plain_pickles() -> None:
    payload, region = shm.dumps((abs, (np.arange(100.0), b"x" * 1000), {}), MiB)
    assert region is None and payload[0] == 0x80  # a pickle, as without shared memory


def test_large_bytes_leave_the_stream_and_come_back_with_one_read() -> None:
    data = os.urandom(4 * MiB)
    payload, region = shm.dumps([data, b"small", data], MiB)
    assert region is not None and len(payload) < 64 * 1024
    region.close()
    back, used = _roundtrip([data, bytearray(data), {"x": data}])
    assert used and back == [data, bytearray(data), {"x": data}]
    assert type(back[1]) is bytearray


def test_received_mapping_is_private_and_unmapped_when_the_object_dies() -> None:
    a = np.arange(MiB, dtype=np.float64)
    out, used = _roundtrip(a)
    assert used and large_jobs.in_region(out)
    out[0] = -1.0
    assert a[0] == 0.0
    assert large_jobs.region_fds() == []  # the mapping holds no descriptor
    del out
    assert large_jobs.region_ranges() == []


# ----------------------------------------------------------------- memory accounting


def _baseline(start_method: str) -> int:
    """What a fresh worker of such a pool counts before any large job (its own heap and inherited pages)."""
    with Pool(1, start_method=start_method) as pool:
        return int(pool.submit(large_jobs.counted_memory).result(timeout=60))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_shared_pages_a_job_only_reads_do_not_retire_its_worker(start_method: str, leak_check: object) -> None:
    limit = _baseline(start_method) + 100 * MiB
    with Pool(1, start_method=start_method, max_memory_per_child=limit) as pool:
        # Made after the pool: a fork template would otherwise inherit it (as anonymous pages).
        a = np.ones(200 * MiB // 8)
        # Each job keeps the array it got, as a leak would.
        read = pool.submit(large_jobs.read_all, a, 0.0, True)
        assert read.result(timeout=120) == a.size
        assert read.stats.worker_retired is None, "pages it only mapped must not count"
        assert read.stats.rss_after < limit
        written = pool.submit(large_jobs.write_all, a, 0.0, True)
        assert written.result(timeout=120) == 3.0
        assert written.pid == read.pid
        assert written.stats.worker_retired == "memory", "pages it wrote are its own and count"
        after = pool.submit(large_jobs.counted_memory)
        assert after.result(timeout=60) < limit and after.pid != read.pid
    assert a[0] == 1.0  # the worker wrote its private copy, not the caller's array


def test_memory_limit_counts_what_a_job_writes_not_what_it_maps(leak_check: object) -> None:
    limit = _baseline("fork") + 100 * MiB
    with Pool(1, memory_limit_per_child=limit) as pool:
        a = np.ones(200 * MiB // 8)  # after the pool, as above
        # Mapped for a second while the template samples every 10 ms: not killed.
        assert pool.submit(large_jobs.read_all, a, 1.0).result(timeout=120) == a.size
        with pytest.raises(MemoryLimitExceeded):
            pool.submit(large_jobs.write_all, a, 30.0).result(timeout=120)
        assert pool.submit(large_jobs.read_all, a).result(timeout=120) == a.size  # the pool goes on


# ----------------------------------------------------------------- Pool.share


def test_a_shared_array_is_mapped_once_per_worker_and_reused_by_its_jobs(pool: Pool) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB
    handle = pool.share(big)
    assert isinstance(handle, Shared) and handle.nbytes >= big.nbytes
    facts = [f.result(timeout=60) for f in [pool.submit(large_jobs.shared_facts, handle) for _ in range(8)]]
    assert all(f["in_region"] for f in facts), "the worker should map the shared array, not copy it"
    assert all(f["sum"] == float(big.sum()) for f in facts)
    ids_per_worker: dict[int, set[int]] = {}
    for f in facts:
        ids_per_worker.setdefault(f["pid"], set()).add(f["id"])
    assert all(len(ids) == 1 for ids in ids_per_worker.values()), "each worker loads it once"
    assert list(pool.map(large_jobs.element, [handle] * 5, range(5))) == [0.0, 1.0, 2.0, 3.0, 4.0]
    outcomes = list(pool.batch(functools.partial(large_jobs.element, handle), [10, 20]))
    assert [o.value for o in outcomes] == [10.0, 20.0]


def test_a_shared_object_survives_worker_recycling(leak_check: object) -> None:
    big = np.arange(MiB, dtype=np.float64)
    with Pool(2, max_tasks_per_child=1) as pool:
        handle = pool.share(big)
        results = [pool.submit(large_jobs.element_and_pid, handle, i) for i in range(6)]
        values = [f.result(timeout=60) for f in results]
    assert [v for v, _ in values] == [float(i) for i in range(6)]
    assert len({pid for _, pid in values}) == 6  # every job on a new worker, each given the object again


def test_shared_objects_of_any_kind_and_the_executor(leak_check: object) -> None:
    table = {f"k{i}": i for i in range(100_000)}
    with ProcessPoolExecutor(2) as executor:
        handle = executor.share(table)
        assert list(executor.map(large_jobs.first_key, [handle, handle])) == ["k0", "k0"]


def test_released_share_leaves_every_worker_and_cannot_be_used(leak_check: object) -> None:
    with Pool(2) as pool:
        handle = pool.share(np.ones(2 * MiB))
        for f in [pool.submit(large_jobs.element, handle, 0) for _ in range(4)]:
            assert f.result(timeout=60) == 1.0
        pids = {w.pid for w in pool.stats().workers if w.pid}
        assert any(large_jobs.region_ranges(pid) for pid in pids)
        handle.release()
        assert handle.released and handle.nbytes == 0
        wait_until(
            lambda: not any(large_jobs.region_ranges(pid) for pid in pids),
            timeout=20,
            what="the workers to unmap the released object",
        )
        with pytest.raises(ValueError, match="released"):  # a pickling error: on its future
            pool.submit(large_jobs.element, handle, 0).result(timeout=10)


def test_a_dropped_handle_is_released_once_its_queued_jobs_have_run(leak_check: object) -> None:
    with Pool(1) as pool:
        handle = pool.share(np.full(MiB, 7.0))
        futures = [pool.submit(large_jobs.element, handle, i) for i in range(3)]
        del handle  # the jobs already queued still get it
        assert [f.result(timeout=60) for f in futures] == [7.0, 7.0, 7.0]
        pid = futures[0].pid
        wait_until(lambda: not large_jobs.region_ranges(pid), timeout=20, what="the object to be released")


def test_shutdown_with_shares_outstanding_releases_them(leak_check: object) -> None:
    pool = Pool(2)
    handles = [pool.share(np.full(MiB, float(i))) for i in range(3)]
    assert pool.submit(large_jobs.element, handles[2], 0).result(timeout=60) == 2.0
    pool.shutdown()
    assert all(h.released for h in handles)
    assert large_jobs.region_fds() == [] and large_jobs.region_ranges() == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.share(1)


def test_a_handle_is_only_for_poolkit_jobs() -> None:
    with Pool(1) as pool:
        handle = pool.share(b"x" * 100)
        with pytest.raises(TypeError, match="only be an argument of a job"):
            pickle.dumps(handle)


def test_dask_pool_says_share_is_not_available() -> None:
    dask_pool = pytest.importorskip("poolkit.dask")
    with pytest.raises(NotImplementedError, match="scatter"):
        dask_pool.DaskPool.share(object.__new__(dask_pool.DaskPool), 1)


# ----------------------------------------------------------------- faults: nothing lost, nothing leaked


def _dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _descriptors(pid: int) -> int:
    """How many descriptors ``pid`` holds, less its own /proc files (a worker opens two on first use, and keeps them)."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        count += not target.startswith(f"/proc/{pid}/")
    return count


def _assert_nothing_left_here() -> None:
    # A dropped future or an abandoned map iterator may sit in a reference
    # cycle; its result's mapping goes when the cycle is collected.
    gc.collect()
    assert large_jobs.region_fds() == []
    assert large_jobs.region_ranges() == []


def test_worker_killed_while_it_maps_a_large_argument(tmp_path: Path, leak_check: object) -> None:
    shm_before = _dev_shm()
    with Pool(2) as pool:
        started = tmp_path / "started"
        a = np.ones(4 * MiB)
        doomed = pool.submit(large_jobs.wait_mapped_then_block, a, str(started))
        pid = wait_for_pid_file(started)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            doomed.result(timeout=60)
        assert pool.submit(large_jobs.double, a).result(timeout=60)[0] == 2.0  # the pool goes on
    _assert_nothing_left_here()
    assert _dev_shm() == shm_before


def test_worker_killed_at_any_point_of_sending_a_large_result(leak_check: object) -> None:
    delays = [0.0005 * i for i in range(24)]  # across pickling, writing the region and sending
    with Pool(2) as pool:
        futures = [pool.submit(large_jobs.array_then_die_at, MiB, d) for d in delays]
        futures.append(pool.submit(large_jobs.large_then_die_in_pickling, MiB))
        for future in futures:
            error = future.exception(timeout=120)
            if error is None:
                assert future.result()[0] in (5.0, 1.0)
            else:
                assert isinstance(error, WorkerCrashed), error
        assert futures[-1].exception() is not None  # it always dies
        pids = [w.pid for w in pool.stats().workers if w.pid]
        for pid in pids:
            wait_until(
                lambda pid=pid: not large_jobs.region_fds(pid) and not large_jobs.region_ranges(pid),
                timeout=10,
                what=f"worker {pid} to hold no region (it closes one just after sending it)",
            )
    del futures  # the results that came back are mapped until then
    _assert_nothing_left_here()


def test_a_result_larger_than_the_memory_limit_fails_that_job_only(leak_check: object) -> None:
    limit = _baseline("fork") + 64 * MiB
    with Pool(1, memory_limit_per_child=limit) as pool:
        with pytest.raises(MemoryLimitExceeded):
            pool.submit(large_jobs.allocate, 256 * MiB).result(timeout=120)
        assert pool.submit(large_jobs.allocate, 8 * MiB).result(timeout=60).nbytes == 8 * MiB
    _assert_nothing_left_here()


def test_dropped_futures_and_an_abandoned_map_leave_nothing(leak_check: object) -> None:
    arrays = [np.full(MiB // 4, float(i)) for i in range(12)]  # 2 MiB each
    with Pool(2) as pool:
        for array in arrays[:6]:
            pool.submit(large_jobs.double, array)  # dropped at once
        results = pool.map(large_jobs.double, arrays)
        assert next(results)[0] == 0.0
        del results  # abandoned after one result
        kept = [pool.submit(large_jobs.double, array) for array in arrays[:3]]
        assert [f.result(timeout=60)[0] for f in kept] == [0.0, 2.0, 4.0]
        del kept
    _assert_nothing_left_here()


def test_a_thousand_large_jobs_in_a_row_leave_no_descriptor_or_mapping(leak_check: object) -> None:
    shm_before = _dev_shm()
    array = np.arange(16 * 1024, dtype=np.float64)  # 128 KiB: over this pool's threshold
    with Pool(2, shm_threshold="64KiB") as pool:
        assert [a[1] for a in pool.map(large_jobs.double, [array] * 4, chunksize=1)] == [2.0] * 4
        for pid in worker_pids(pool):  # the last result's region is closed just after it is sent
            wait_until(lambda pid=pid: not large_jobs.region_fds(pid), timeout=10, what="no region held")
        before = {pid: _descriptors(pid) for pid in worker_pids(pool)}
        total = 0.0
        for out in pool.map(large_jobs.double, [array] * 1000, chunksize=1):
            total += out[1]
        del out  # the last result is mapped while it lives
        assert total == 2000.0
        for pid, count in before.items():
            # A worker closes its last result's region just after sending it: allow it that moment.
            wait_until(
                lambda pid=pid, count=count: _descriptors(pid) == count,
                timeout=10,
                what=f"worker {pid} back to its {count} descriptors",
            )
            assert large_jobs.region_fds(pid) == [] and large_jobs.region_ranges(pid) == []
        assert worker_pids(pool) == set(before)
    _assert_nothing_left_here()
    assert _dev_shm() == shm_before
