"""What an agent agrees to run: modules, scripts and commands matching its --allow patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

import aeventor as evr
from aeventor.agent import Agent, AgentConfig, Refused
from aeventor.backends.stores import open_store


def module_level() -> None:
    """A step function importable as tests.unit.test_agent_allow:module_level."""


def agent(*allow: str) -> Agent:
    config = AgentConfig(hosts=["h"], cluster_key=b"k" * 32, allow=allow, log_dir=Path("."))
    return Agent(db=open_store(":memory:", program="x"), config=config)


def program() -> evr.ProgramDef:
    ev = evr.Eventor(name="allow", store=":memory:")
    ev.add_step("func", func=module_level)
    ev.add_step("cmd", command=["/usr/bin/env", "true"])
    ev.add_step("noop")
    return ev.program


@pytest.mark.parametrize(
    ("allow", "step", "allowed"),
    [
        (("tests.unit.*",), "func", True),
        (("tests.integration.*",), "func", False),
        ((), "func", False),
        (("/usr/bin/*",), "cmd", True),
        (("tests.unit.*",), "cmd", False),
        ((), "noop", True),
    ],
)
def test_allow_patterns(allow: tuple[str, ...], step: str, allowed: bool) -> None:
    check = agent(*allow).programs.check_step
    if allowed:
        check(program(), step)
    else:
        with pytest.raises(
            Refused, match="not allowed on this agent; start the agent with --allow"
        ):
            check(program(), step)
