"""Structured lifecycle logs, quiet unless the user asks for them.

poolkit logs through structlog wrapped around the standard library logger
``"poolkit"``, which carries a ``NullHandler``: nothing is printed until the
application configures logging (``logging.basicConfig(level=logging.INFO)``
shows worker and pool events, ``DEBUG`` adds per-job events) or calls
[`log_to_json`][poolkit.log_to_json] for JSON lines. An event is built only if
a handler would write it: with logging left alone, a warning (a worker that
crashed) reaches nothing but poolkit's ``NullHandler``, and importing
structlog for it would stall the pool's manager thread for 60-100 ms in the
middle of the run. The manager asks ``enabled`` before building a per-job
event, so a pool with logging off pays nothing per job.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any

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


def _heard(level: int) -> bool:
    """True if an event at ``level`` would reach a handler that writes it (poolkit's NullHandler does not).

    The logger's own level is ``EventLog.enabled``'s to check, first.
    """
    logger: logging.Logger | None = _stdlib_logger
    while logger is not None:
        for handler in logger.handlers:
            if level >= handler.level and not isinstance(handler, logging.NullHandler):
                return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False  # the NullHandler keeps logging's last-resort handler away too


def _capturing() -> bool:
    """True inside ``structlog.testing.capture_logs()``."""
    structlog = sys.modules.get("structlog")
    if structlog is None or not structlog.is_configured():
        return False
    from structlog.testing import LogCapture

    return any(isinstance(p, LogCapture) for p in structlog.get_config().get("processors", ()))


class EventLog:
    """The logger of one pool: structlog, bound with ``pool=<name>``.

    Levels are always those of the stdlib logger ``"poolkit"``, and events go
    to that logger (through poolkit's own structlog renderer), which prints
    nothing until the application configures logging. While a test holds
    ``structlog.testing.capture_logs()``, events go to structlog's configured
    processors instead, so that structlog's own testing helper sees them.
    """

    def __init__(self, pool_name: str) -> None:
        self._pool_name = pool_name
        self._logger: Any = None  # built on the first event: importing structlog costs ~50 ms

    def _own_logger(self) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.wrap_logger(
                _stdlib_logger,
                processors=[structlog.processors.TimeStamper(fmt="iso"), _render],
                wrapper_class=structlog.stdlib.BoundLogger,
            ).bind(pool=self._pool_name)
        return self._logger

    @staticmethod
    def enabled(level: int = logging.INFO) -> bool:
        return _stdlib_logger.isEnabledFor(level) and (_heard(level) or _capturing())

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if not self.enabled(level):
            return
        # The pool's manager thread logs as it fails jobs and breaks pools: a
        # log that cannot be written (structlog will not import, a handler
        # raises) must never stop it, or futures would wait for ever.
        try:
            if _capturing():
                import structlog

                getattr(structlog.get_logger(LOGGER_NAME), method)(
                    event, pool=self._pool_name, **fields
                )
            else:
                getattr(self._own_logger(), method)(event, **fields)
        except Exception:
            try:
                _stdlib_logger.log(level, "%s pool=%r %r", event, self._pool_name, fields)
            except Exception:
                pass

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def log_to_json(level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send poolkit's events to ``stream`` as JSON lines, from ``level`` up.

    Args:
        level: the lowest level sent (``logging.DEBUG`` adds one event per job).
        stream: where the lines go; default ``sys.stderr``.

    Returns:
        The handler, so that it can be removed again
        (``logging.getLogger("poolkit").removeHandler(handler)``).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter())
    handler.poolkit_json = True  # type: ignore[attr-defined]
    _stdlib_logger.addHandler(handler)
    _stdlib_logger.setLevel(level)
    _json_mode[0] = True
    return handler
