"""The ``aeventor`` command: db upgrade, runs, show, its exit codes for bad input, and one
parser tree reaching every command (``agent`` and ``config`` included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import aeventor as evr
from aeventor.cli import build_parser, main


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
    listed = capsys.readouterr().out.splitlines()[1:]  # under the header
    assert [line.split()[0] for line in listed] == [failed[:8], good[:8]]

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
    assert main(["db", "upgrade", "--store", str(tmp_path / "cli.db")]) == 0
    assert main(["show", "nope", "--store", str(tmp_path / "cli.db")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["submit", "--store", str(tmp_path / "cli.db")]) == 2
    assert "TARGET" in capsys.readouterr().err


def test_runs_limit_keeps_the_newest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "cli.db")
    _, failed = make_runs(store, tmp_path)
    capsys.readouterr()
    assert main(["runs", "--store", store, "--limit", "1"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [failed[:8]]
    assert main(["runs", "--store", store, "--program", "other"]) == 0
    assert capsys.readouterr().out.split() == [
        "RUN",
        "PROGRAM",
        "STATUS",
        "CREATED",
        "(UTC)",
        "DURATION",
    ]
    with pytest.raises(SystemExit) as info:
        main(["runs", "--store", store, "--limit", "0"])
    assert info.value.code == 2


# -- the parser tree ----------------------------------------------------------------------------


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aeventor {evr.__version__}"


def test_help_lists_every_command_on_one_line_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = help_of([], capsys)
    commands = out.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split()[0] for line in commands] == [
        "agent",
        "submit",
        "runs",
        "show",
        "watch",
        "logs",
        "diff",
        "programs",
        "db",
        "cancel",
        "cleanup",
        "recover",
        "rerun",
        "continue",
        "config",
    ]
    assert all(len(line.split()) > 1 for line in commands), commands  # each has its line
    epilog = out.split("\nexit codes:\n", 1)[1]
    for code in [*"0123456", "130", "141"]:
        assert f"\n  {code}  " in f"\n{epilog}"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["agent"], ["--store", "--ssh-host", "--allow", "--json-logs", "start"]),
        (["agent", "start"], ["--host", "--ssh", "--forward-env", "--log"]),
        (["config"], ["genkey", "encrypt"]),
        (["config", "genkey"], ["--key-file"]),
        (["db"], ["upgrade"]),
        (["submit"], ["--program", "--trigger", "--wait"]),
        (["runs"], ["--program", "--status", "--since", "--limit", "--json"]),
        (
            ["show"],
            ["RUN", "--json", "0  the run succeeded", "1  the run failed", "4  the run is still "],
        ),
        (["watch"], ["RUN", "1  the run failed", "130  Ctrl-C"]),
        (["logs"], ["STEP[.SEQ]", "--follow", "--log-dir", "130  Ctrl-C"]),
        (["diff"], ["RUN1", "RUN2", "--log-dir", "--json", "1  the runs differ"]),
        (["programs"], ["--store", "--json"]),
    ],
)
def test_every_subtree_is_reachable_from_aeventor(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = help_of(argv, capsys)
    assert out.startswith(f"usage: aeventor {' '.join(argv)}")
    for word in expected:
        assert word in out


def test_agent_without_a_store_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--host", "s1"], environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith("aeventor agent: no store: name the store(s) this agent serves")
    assert "--store STORE" in err and "$AEVENTOR_STORE" in err


def test_agent_start_without_a_host_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "start", "--", "--store", "x"]) == 2
    assert "aeventor agent start: name the host with --host" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["aeventor", "aeventor.agent", "aeventor.config"])
def test_python_m_entry_points_are_the_same_tree(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    command = {"aeventor": "aeventor", "aeventor.agent": "aeventor agent"}.get(
        module, "aeventor config"
    )
    assert proc.stdout.startswith(f"usage: {command} ")


def test_agent_start_options_are_not_read_as_agent_abbreviations() -> None:
    # `--ssh` is a prefix of the agent's --ssh-host and --ssh-python: it must reach `start`.
    agent_args = ["--store", "pg", "--json-logs"]
    start = ["agent", "start", "--host", "s2", "--ssh", "root@10.0.0.2:2222", "--python", "py"]
    args = build_parser().parse_args(
        [*start, "--forward-env", "AEVENTOR_CLUSTER_KEY", "--", *agent_args]
    )
    assert (args.agent_command, args.host, args.ssh, args.python) == (
        "start",
        "s2",
        "root@10.0.0.2:2222",
        "py",
    )
    assert args.forward_env == ["AEVENTOR_CLUSTER_KEY"]
    assert [a for a in args.agent_args if a != "--"] == agent_args
