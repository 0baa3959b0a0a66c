"""poolkit's benchmark harness: scenarios S1-S7 of docs/mission.md against its peers.

``python -m benchmarks`` runs every scenario for poolkit, the standard
library's ProcessPoolExecutor (fork, forkserver, spawn), loky,
multiprocessing.Pool, pebble, billiard, mpire and a minimal hand-written
reference pool, each measurement in its own fresh interpreter under a
wall-clock cap; see ``docs/benchmarks.md`` for the latest figures.
"""
