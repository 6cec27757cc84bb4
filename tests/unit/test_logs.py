"""Library logging goes to the standard library's ``aeventor.*`` loggers, never to stdout."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
import structlog
from structlog.testing import capture_logs

from aeventor.logs import get_logger, stderr_handler


def test_a_call_becomes_one_stdlib_record(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="aeventor")
    log = get_logger("aeventor.test").bind(agent="a1")
    with structlog.contextvars.bound_contextvars(run_id="r1"):
        log.warning("thing.happened", attempt=2, error="no route")

    [record] = caplog.records
    assert (record.name, record.levelno) == ("aeventor.test", logging.WARNING)
    assert record.getMessage() == "thing.happened agent='a1' attempt=2 error='no route' run_id='r1'"
    assert record.event == "thing.happened"  # type: ignore[attr-defined]
    assert record.fields == {  # type: ignore[attr-defined]
        "agent": "a1",
        "attempt": 2,
        "error": "no route",
        "run_id": "r1",
    }
    assert capsys.readouterr() == ("", "")


def test_levels_below_the_loggers_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aeventor")
    get_logger("aeventor.test").debug("too.quiet")
    assert caplog.records == []


def test_exc_info_reaches_logging(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("aeventor.test").exception("it.failed")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_structlog_global_configuration_is_neither_used_nor_needed(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with capture_logs() as captured:
        get_logger("aeventor.test").warning("still.stdlib")
    assert captured == []
    assert [r.getMessage() for r in caplog.records] == ["still.stdlib"]
    assert capsys.readouterr().out == ""


def test_importing_aeventor_configures_nothing() -> None:
    code = (
        "import logging, structlog, aeventor, aeventor.agent, aeventor.logs, "
        "aeventor.backends.stores.postgres, aeventor.backends.stores.sqlite, "
        "aeventor.backends.executors.ssh, aeventor.dispatch.worker\n"
        "assert not structlog.is_configured()\n"
        "assert logging.getLogger().handlers == []\n"
        "assert logging.getLogger('aeventor').handlers == []\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_RETRY_ONCE = """
import asyncio
from aeventor.backends.stores.base import retry_transient
from aeventor.exceptions import ConnectionLost

class Store:
    reconnect_deadline = 60.0
    calls = 0

    def clock(self):
        return 0.0

    async def sleep(self, delay):
        pass

    @retry_transient
    async def work(self):
        self.calls += 1
        if self.calls == 1:
            raise ConnectionLost("server closed the connection")
        return "done"

assert asyncio.run(Store().work()) == "done"
"""


def test_a_retry_in_an_unconfigured_program_prints_nothing_to_stdout() -> None:
    """A program that configures neither logging nor structlog, with structlog installed.

    The retry's warning reaches only Python's last-resort handler (stderr); stdout, which
    belongs to the program, stays empty.
    """
    result = subprocess.run(
        [sys.executable, "-c", _RETRY_ONCE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == ""
    assert "store unreachable; retrying" in result.stderr


@pytest.mark.parametrize("json_lines", [True, False])
def test_stderr_handler_renders_event_and_fields(json_lines: bool) -> None:
    handler = stderr_handler(json_lines=json_lines)
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger("aeventor.test.handler")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        get_logger("aeventor.test.handler").bind(run_id="r1", step="s", sequence="0").info(
            "step.ended", status="success"
        )
        logger.warning("plain %s", "record")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)

    first, second = stream.getvalue().splitlines()
    if json_lines:
        ended = json.loads(first)
        assert {k: ended[k] for k in ("event", "run_id", "step", "sequence", "status")} == {
            "event": "step.ended",
            "run_id": "r1",
            "step": "s",
            "sequence": "0",
            "status": "success",
        }
        assert (ended["level"], ended["logger"]) == ("info", "aeventor.test.handler")
        assert "timestamp" in ended
        assert json.loads(second)["event"] == "plain record"
    else:
        assert "step.ended" in first and "run_id=r1" in first and "status=success" in first
        assert "plain record" in second
