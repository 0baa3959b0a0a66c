"""Structured lifecycle logs, quiet unless the user asks for them.

poolkit logs through structlog wrapped around the standard library logger
``"poolkit"``, which carries a ``NullHandler``: nothing is printed until the
application configures logging (``logging.basicConfig(level=logging.INFO)``
shows worker and pool events, ``DEBUG`` adds per-job events) or calls
:func:`log_to_json` for JSON lines. The manager asks :func:`enabled` before
building an event, so a pool with logging off pays one integer comparison per
event and nothing per job.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

__all__ = ["LOGGER_NAME", "EventLog", "log_to_json"]

LOGGER_NAME = "poolkit"
_stdlib_logger = logging.getLogger(LOGGER_NAME)
_stdlib_logger.addHandler(logging.NullHandler())
_json_mode = [False]  # set by log_to_json; read by the renderer


def _render(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    if _json_mode[0]:
        event_dict.setdefault("level", method)
        return json.dumps(event_dict, default=repr)
    event = event_dict.pop("event")
    fields = " ".join(f"{key}={value!r}" for key, value in event_dict.items())
    return f"{event} {fields}".rstrip()


class EventLog:
    """The logger of one pool: structlog, bound with ``pool=<name>``."""

    def __init__(self, pool_name: str) -> None:
        self._logger = structlog.wrap_logger(
            _stdlib_logger,
            processors=[structlog.processors.TimeStamper(fmt="iso"), _render],
            wrapper_class=structlog.stdlib.BoundLogger,
        ).bind(pool=pool_name)

    @staticmethod
    def enabled(level: int = logging.INFO) -> bool:
        return _stdlib_logger.isEnabledFor(level)

    def info(self, event: str, **fields: Any) -> None:
        if _stdlib_logger.isEnabledFor(logging.INFO):
            self._logger.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        if _stdlib_logger.isEnabledFor(logging.WARNING):
            self._logger.warning(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        if _stdlib_logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(event, **fields)

    @property
    def bound(self) -> Any:
        """The structlog logger itself (for tests and advanced use)."""
        return self._logger


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def log_to_json(level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send poolkit's events to ``stream`` (default stderr) as JSON lines, from ``level`` up.

    Returns the handler so that it can be removed again.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter())
    handler.poolkit_json = True  # type: ignore[attr-defined]
    _stdlib_logger.addHandler(handler)
    _stdlib_logger.setLevel(level)
    _json_mode[0] = True
    return handler
