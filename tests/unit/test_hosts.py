"""Host assignment rules of distributed mode, and the signatures agents check."""

from __future__ import annotations

import pytest

import aeventor as evr
from aeventor import signing as _signing
from aeventor.program.hosts import assign_hosts, predecessors

S = evr.StepStatus


def two_before_one(host_a: str | None, host_b: str | None, **kwargs: object) -> evr.Eventor:
    ev = evr.Eventor(name="hosts", store=":memory:", **kwargs)  # type: ignore[arg-type]
    start = ev.add_event("start")
    after = ev.add_event("after")
    ev.add_step("a", host=host_a, triggers={S.success: (after,)})
    ev.add_step("b", host=host_b, triggers={S.failure: (after,)})
    ev.add_step("c")
    ev.add_assoc(start, "a", "b")
    ev.add_assoc(after, "c")
    return ev


def test_explicit_hosts_are_kept() -> None:
    ev = two_before_one("h1", "h1")
    assert assign_hosts(ev.program, default_host=None) == {"a": "h1", "b": "h1", "c": "h1"}


def test_default_host_comes_before_the_previous_steps_host() -> None:
    ev = two_before_one("h1", "h2")
    assert assign_hosts(ev.program, default_host="d")["c"] == "d"


def test_previous_steps_on_different_hosts_are_ambiguous() -> None:
    ev = two_before_one("h1", "h2")
    with pytest.raises(evr.ProgramDefinitionError, match=r"'c'.*different hosts.*a on h1, b on h2"):
        assign_hosts(ev.program, default_host=None)


def test_a_first_step_without_host_is_an_error_naming_the_fixes() -> None:
    ev = two_before_one(None, "h2")
    with pytest.raises(evr.ProgramDefinitionError, match=r"'a' has no host.*default_host"):
        assign_hosts(ev.program, default_host=None)


def test_host_follows_through_events_and_derived_events() -> None:
    ev = evr.Eventor(name="hosts", store=":memory:")
    start, mid, other = ev.add_event("start"), ev.add_event("mid"), ev.add_event("other")
    both = ev.add_event("both", expr=(mid, other))
    ev.add_step("first", host="h9", triggers={S.complete: (mid,)})
    ev.add_step("second")
    ev.add_assoc(start, "first")
    ev.add_assoc(both, "second")
    assert predecessors(ev.program)["second"] == {"first"}
    assert assign_hosts(ev.program, default_host=None)["second"] == "h9"


def test_a_loop_takes_the_host_of_its_anchor() -> None:
    ev = evr.Eventor(name="hosts", store=":memory:")
    start, again = ev.add_event("start"), ev.add_event("again")
    ev.add_step("seed", host="h3", triggers={S.success: (again,)})
    ev.add_step("loop", triggers={S.success: (again,)})
    ev.add_assoc(start, "seed")
    ev.add_assoc(again, "loop")
    assert assign_hosts(ev.program, default_host=None)["loop"] == "h3"


def test_signatures_bind_the_definition_and_the_run() -> None:
    key = b"k" * 32
    program = two_before_one("h1", "h1").program
    signature = _signing.program_signature(key, program)
    assert _signing.verify(signature, _signing.program_signature(key, program))
    assert not _signing.verify(signature, _signing.program_signature(b"x" * 32, program))
    changed = _signing.definition_signature(
        key, program.name, program.version, program.canonical_json().replace("h1", "h2")
    )
    assert not _signing.verify(signature, changed)
    run = _signing.run_signature(key, run_id="r", program_id=1, version=program.version)
    assert not _signing.verify(
        run, _signing.run_signature(key, run_id="r", program_id=2, version=program.version)
    )
    assert not _signing.verify(None, run)


def test_cluster_key_errors_name_the_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(evr.ConfigurationError, match="genkey"):
        _signing.load_cluster_key(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    with pytest.raises(evr.ConfigurationError, match="too short"):
        _signing.load_cluster_key(environ={"AEVENTOR_CLUSTER_KEY": "short"})
    key_file = tmp_path / "cluster.key"
    key_file.write_text("z" * 40)
    key_file.chmod(0o644)
    with pytest.raises(evr.ConfigurationError, match="chmod 600"):
        _signing.load_cluster_key(environ={"AEVENTOR_CLUSTER_KEY_FILE": str(key_file)})
    key_file.chmod(0o600)
    assert (
        _signing.load_cluster_key(environ={"AEVENTOR_CLUSTER_KEY_FILE": str(key_file)}) == b"z" * 40
    )
