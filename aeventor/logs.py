"""Library logging: structlog's calling style, the standard library's loggers.

Every aeventor module logs through :func:`get_logger` with a name ``aeventor.<area>``
(``aeventor.store``, ``aeventor.pg_listener``, ``aeventor.ssh``, ...). What it returns is a
structlog :class:`~structlog.stdlib.BoundLogger` (``log.warning("event", key=value)``,
``log.bind(run_id=...)``) wrapped around ``logging.getLogger(name)`` with a fixed chain of
processors of its own. It never reads or changes structlog's global configuration, and
aeventor never calls :func:`structlog.configure`, so:

- the application's :mod:`logging` configuration decides what is shown, where and how
  (levels, handlers, formats); nothing is printed to stdout. With no configuration at all,
  Python's last-resort handler writes WARNING and above to stderr, as for any library;
- records arrive whatever structlog configuration the application has, or none.

Each call becomes one :class:`logging.LogRecord` whose message is the event followed by
its key/value pairs, ``event key=value ...`` (values as ``repr``), so a plain
``%(message)s`` format shows everything. Cheaply, the same data stays structured on the
record: ``record.event`` is the bare event and ``record.fields`` a dict of the pairs
(context variables bound with :func:`structlog.contextvars.bound_contextvars` and
:meth:`~structlog.stdlib.BoundLogger.bind` included). A formatter that knows them (the
agent's, see :func:`stderr_handler`) renders them as separate keys, e.g. JSON lines.
``exc_info`` and ``stack_info`` are handed to :mod:`logging` as such.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
from typing import Any, cast

import structlog

__all__ = ("get_logger", "stderr_handler")


def _to_stdlib(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Render the event dict as positional and keyword arguments of a ``logging`` call."""
    kwargs: dict[str, Any] = {}
    for key in ("exc_info", "stack_info"):
        if key in event_dict:
            kwargs[key] = event_dict.pop(key)
    event = str(event_dict.pop("event", ""))
    fields = dict(event_dict)
    message = " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
    kwargs["extra"] = {"event": event, "fields": fields}
    return (message,), kwargs


#: The level of each logging method (``log`` and others not listed go through).
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _BoundLogger(structlog.stdlib.BoundLogger):
    """A bound logger whose disabled levels cost one (cached) level check: no processor
    runs, no event dict is built (the worker logs each step run's start and end)."""

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: Any, **event_kw: Any
    ) -> Any:
        level = _METHOD_LEVELS.get(method_name)
        if level is not None and not self._logger.isEnabledFor(level):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger that writes to the standard library logger ``name``.

    Args:
        name: the :mod:`logging` logger's name, ``aeventor.<area>``.

    Returns:
        A bound logger; its level check comes first, so a disabled level costs little.

    .. versionadded:: 0.1
    """
    # Built directly rather than through structlog.get_logger()/wrap_logger(), which fill
    # what is not given from structlog's global configuration.
    return _BoundLogger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            _to_stdlib,
        ],
        context={},
    )


def _unpack_fields(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Give a record made by :func:`get_logger` its bare event and separate fields back."""
    record = event_dict.get("_record")
    event = getattr(record, "event", None)
    fields = getattr(record, "fields", None)
    if isinstance(event, str) and isinstance(fields, dict):
        event_dict.update(fields)
        event_dict["event"] = event
    return event_dict


def stderr_handler(*, json_lines: bool, colors: bool = False) -> logging.Handler:
    """A handler writing to stderr, as console lines or JSON lines (for programs only).

    Records made by :func:`get_logger` (and by structlog loggers routed to :mod:`logging`
    with :func:`structlog.stdlib.ProcessorFormatter.wrap_for_formatter`) show their event
    and fields as separate keys; other records show their message as the event.

    Args:
        json_lines: one JSON object per line instead of console lines.
        colors: colour the console lines.

    .. versionadded:: 0.1
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=colors)
    )
    handler = logging.StreamHandler()  # sys.stderr, looked up now
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_unpack_fields],
            processors=[
                # Here rather than in foreign_pre_chain: records from structlog loggers
                # routed to logging need them too.
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([structlog.processors.format_exc_info] if json_lines else []),
                renderer,
            ],
        )
    )
    return cast(logging.Handler, handler)
