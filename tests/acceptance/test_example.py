"""The design notes' example program, run as a user runs it: ``python examples/distribution_notes.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distribution_notes.py"

STEP_LINE = re.compile(
    r"^  (?P<step>\S+)\s+sequence=(?P<sequence>\S+) host=(?P<host>\S+) (?P<status>\S+)\s+"
    r"returned (?P<result>.*)$"
)


def test_distribution_notes_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        # Import aeventor from this checkout, whatever is installed.
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"run [0-9a-f]{32}: success", lines[0]), proc.stdout
    steps = [m.groupdict() for m in map(STEP_LINE.match, lines) if m]
    # s11 and s12 (either order), then s2 once although both fired its event, then s3.
    order = [s["step"] for s in steps]
    assert sorted(order[:2]) == ["s11", "s12"] and order[2:] == ["s2", "s3"], proc.stdout
    hosts = {"s11": "s1", "s12": "s2", "s2": "s2", "s3": "s1"}
    for step in steps:
        assert step["sequence"] == "1", step
        assert step["status"] == "success", step
        assert step["host"] == hosts[step["step"]], step
        assert step["result"] == repr("prog" + step["step"][1:]), step
    # Each step's log, printed under it, shows the sequence it saw.
    assert proc.stdout.count("EVENTOR_STEP_SEQUENCE: 1") == 4, proc.stdout
    # The default store and log directory are in the working directory.
    assert (tmp_path / "distribution_notes.run.db").is_file()
    assert (tmp_path / "aeventor_logs" / "distribution_notes").is_dir()
