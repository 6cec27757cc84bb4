"""The ``aeventor`` command: db upgrade, runs, show, and its exit codes for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

import aeventor as evr
from aeventor.cli import main


async def ok() -> str:
    return "fine"


async def bad() -> None:
    raise RuntimeError("boom")


def make_runs(store: str, tmp_path: Path) -> tuple[str, str]:
    def program(func: object) -> evr.Eventor:
        ev = evr.Eventor(name="clitest", store=store, log_dir=tmp_path / "logs")
        go = ev.add_event("go")
        ev.add_step("only", func=func)  # type: ignore[arg-type]
        ev.add_assoc(go, "only")
        ev.trigger_event(go, 1)
        return ev

    good = program(ok).run_sync()
    failed = program(bad).run_sync()
    return good.run_id, failed.run_id


def test_db_upgrade_runs_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "cli.db")
    assert main(["db", "upgrade", "--store", store]) == 0
    good, failed = make_runs(store, tmp_path)
    capsys.readouterr()

    assert main(["runs", "--store", store, "--program", "clitest"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [failed, good]

    assert main(["show", good, "--store", store]) == 0
    out = capsys.readouterr().out
    assert "success" in out and "only[1] success -> 'fine'" in out

    assert main(["show", failed, "--store", store]) == 1
    out = capsys.readouterr().out
    assert "only[1] failure" in out and "RuntimeError: boom" in out


def test_bad_input_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade", "--store", "oracle://scott@db/x"]) == 2
    assert "does not support 'oracle'" in capsys.readouterr().err
    assert main(["show", "nope", "--store", str(tmp_path / "cli.db")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["submit", "--store", str(tmp_path / "cli.db")]) == 2
    assert "TARGET" in capsys.readouterr().err
