"""What a step's process inherits of the environment of the process that starts it."""

from __future__ import annotations

from aeventor.context import DEFAULT_PASS_ENV, SECRET_ENV, EnvPolicy, process_env

ENVIRON = {
    "PATH": "/usr/bin",
    "HOME": "/home/agent",
    "USER": "agent",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "C",
    "TZ": "UTC",
    "TMPDIR": "/tmp",
    "PYTHONPATH": "/src",
    "PGPASSWORD": "db-secret",
    "STORE": "postgresql+asyncpg://app:db-secret@db/prod",
    "PROJECT_ROOT": "/srv/project",
    "PROJECT_MODE": "fast",
    "AEVENTOR_CLUSTER_KEY": "cluster-key-0123456789abcdef0123456789",
    "AEVENTOR_CLUSTER_KEY_FILE": "/etc/aeventor/cluster.key",
    "AEVENTOR_KEY": "fernet",
    "AEVENTOR_KEY_FILE": "/etc/aeventor/key",
    "AEVENTOR_CONFIG": "/etc/aeventor/config.toml",
    "lc_lower": "x",
}
OWN = {"EVENTOR_RUN_ID": "r1", "EVENTOR_HOST": "h1", "GROUP_VAR": "g", "PATH": "/step/bin"}


def test_a_standalone_step_inherits_everything_but_the_secrets() -> None:
    env = process_env(OWN, EnvPolicy(), environ=ENVIRON)
    assert not SECRET_ENV & env.keys()
    assert env.keys() == (ENVIRON.keys() - SECRET_ENV) | OWN.keys()
    assert env["PATH"] == "/step/bin"  # its own variables win


def test_an_agents_step_inherits_the_allow_list_only() -> None:
    env = process_env(OWN, EnvPolicy.agent(), environ=ENVIRON)
    inherited = env.keys() - OWN.keys()
    assert inherited == {"HOME", "USER", "LANG", "LC_ALL", "LC_TIME", "TZ", "TMPDIR"}
    assert env["PATH"] == "/step/bin"
    assert "db-secret" not in "".join(env.values())
    # Patterns are case-sensitive, as environment variable names are.
    assert "lc_lower" not in env


def test_pass_env_extends_the_allow_list_but_never_to_secrets() -> None:
    policy = EnvPolicy.agent(["PROJECT_*", "PGPASSWORD", "AEVENTOR_*"])
    env = process_env({}, policy, environ=ENVIRON)
    assert {"PROJECT_ROOT", "PROJECT_MODE", "PGPASSWORD", "AEVENTOR_CONFIG"} <= env.keys()
    assert not SECRET_ENV & env.keys()
    everything = process_env({}, EnvPolicy.agent(["*"]), environ=ENVIRON)
    assert everything.keys() == ENVIRON.keys() - SECRET_ENV


def test_ssh_hosts_are_sent_only_what_pass_env_names() -> None:
    assert process_env(OWN, EnvPolicy.agent(), remote=True, environ=ENVIRON) == OWN
    policy = EnvPolicy.agent(["PROJECT_ROOT", "AEVENTOR_CLUSTER_KEY"])
    sent = process_env(OWN, policy, remote=True, environ=ENVIRON)
    assert sent == {**OWN, "PROJECT_ROOT": "/srv/project"}
    # A standalone policy sends nothing of its own.
    assert process_env(OWN, EnvPolicy(), remote=True, environ=ENVIRON) == OWN


def test_the_default_allow_list_is_conventional_and_documented() -> None:
    assert set(DEFAULT_PASS_ENV) >= {"PATH", "HOME", "LANG", "LC_*", "TZ", "USER", "TMPDIR"}
    assert not any(name.startswith("AEVENTOR") for name in DEFAULT_PASS_ENV)
    assert {"AEVENTOR_CLUSTER_KEY", "AEVENTOR_CLUSTER_KEY_FILE"} <= SECRET_ENV
