"""The pool's options are declared once (poolkit/options.py); every front end takes the same ones.

These tests fail when ``Pool``, ``PoolConfig.build``, ``ProcessPoolExecutor``,
``DaskPool`` or the flags of ``poolkit run`` drift from the declaration: an
option missing, renamed, or with another default.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

import pytest

from poolkit import Pool, ProcessPoolExecutor
from poolkit.cli import build_parser
from poolkit.config import PoolConfig
from poolkit.options import POOL_OPTIONS, option

DECLARED = {o.name: o.default for o in POOL_OPTIONS}


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    return {
        name: p for name, p in inspect.signature(fn).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def test_pool_takes_every_declared_option_in_order_with_its_default() -> None:
    parameters = _parameters(Pool.__init__)
    assert list(parameters) == list(DECLARED)
    assert {name: p.default for name, p in parameters.items()} == DECLARED


def test_pool_config_builds_from_the_same_options() -> None:
    assert set(_parameters(PoolConfig.build)) == set(DECLARED)


def test_process_pool_executor_takes_the_same_options() -> None:
    signature = inspect.signature(ProcessPoolExecutor.__init__)
    parameters = _parameters(ProcessPoolExecutor.__init__)
    for name, parameter in parameters.items():
        assert parameter.default == DECLARED[name], name
    # Every other option reaches Pool through **poolkit_options.
    assert any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    assert issubclass(ProcessPoolExecutor, Pool)


def test_dask_pool_takes_every_option_that_applies_to_a_node() -> None:
    dask_backend = pytest.importorskip("poolkit.dask_backend")
    parameters = _parameters(dask_backend.DaskPool.__init__)
    own = {"address_or_client", "progress_interval", "connect_timeout"}
    assert set(parameters) - own == {o.name for o in POOL_OPTIONS if o.dask}
    # The node pools start from a fresh interpreter by default (see docs/dask.md).
    differ = {"start_method": "forkserver"}
    for o in POOL_OPTIONS:
        if o.dask:
            assert parameters[o.name].default == differ.get(o.name, o.default), o.name


def _pool_flags() -> dict[str, argparse.Action]:
    parser = build_parser()
    [run] = [
        action.choices["run"] for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    [group] = [g for g in run._action_groups if g.title == "the pool"]
    return {action.dest: action for action in group._group_actions if action.dest != "dask"}


def test_cli_pool_flags_are_named_after_the_options() -> None:
    flags = _pool_flags()
    assert set(flags) == {o.name for o in POOL_OPTIONS if o.cli is not None}
    for dest, action in flags.items():
        declared = option(dest)
        assert declared.flag in action.option_strings
        assert set(action.option_strings) == {declared.flag, *declared.aliases}
        assert action.default is None  # left out: the pool's own default


def test_cli_keeps_the_old_spellings() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "m:f", "-w", "3", "--memory-limit", "1GiB"])
    assert (args.max_workers, args.memory_limit_per_child) == (3, "1GiB")
    args = parser.parse_args(["run", "m:f", "--workers", "2", "--memory-limit-per-child", "5"])
    assert (args.max_workers, args.memory_limit_per_child) == (2, 5)
