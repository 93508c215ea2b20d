"""The engine sandbox's rules (ximd/engine/sandbox.py), computed over a fake file system (pure).

Landlock only grants: "everything but the secrets" is granted as the secrets'
siblings on every level, the directories on the way listable only. The real
kernel enforcement is tested in tests/security/test_engine_reads_secrets.py.
"""

from __future__ import annotations

import posixpath

from ximd.engine import sandbox
from ximd.engine.sandbox import LIST, READ, WRITE, FileSystem, Policy, carve, plan

TREE = {
    "/": ["etc", "usr", "var", "run", "proc", "dev", "tmp"],
    "/etc": ["hostname", "ssl", "xerotier", "resolv.conf"],
    "/etc/xerotier": ["agent.toml"],
    "/var": ["lib", "run"],
    "/var/lib": ["apt", "xerotier"],
    "/var/lib/xerotier": ["enrollment", "models", "lmcache_config.yaml"],
    "/var/lib/xerotier/enrollment": ["identity.json"],
    "/run": ["credentials", "ximd", "systemd"],
    "/run/credentials": ["ximd.service", "other.service"],
    "/run/credentials/ximd.service": ["join-key"],
    "/dev": ["null", "nvidia0", "shm"],
    "/dev/shm": [],
    "/tmp": ["sneaky"],
    "/usr": ["bin"],
    "/proc": ["self"],
}
LINKS = {"/var/run": "/run", "/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf",
         "/etc/ssl": "/usr/share/ssl", "/tmp/sneaky": "/etc/xerotier"}


def exists(path: str) -> bool:
    return path in TREE or path in LINKS or any(
        posixpath.basename(path) in names and posixpath.dirname(path) == d for d, names in TREE.items())


FAKE = FileSystem(listdir=lambda p: list(TREE[p]), realpath=lambda p: LINKS.get(p, p), exists=exists)
HIDDEN = ("/var/lib/xerotier/enrollment", "/etc/xerotier", "/run/credentials/ximd.service")


def rights(rules, path):
    return {access for p, access in rules if p == path}


def test_carving_grants_the_siblings_on_every_level_and_never_a_hidden_path():
    granted, listed = carve("/", list(HIDDEN), FAKE)
    assert set(listed) == {"/", "/etc", "/var", "/var/lib", "/var/lib/xerotier", "/run", "/run/credentials"}
    assert {"/usr", "/proc", "/dev", "/etc/hostname", "/var/lib/apt", "/var/lib/xerotier/models",
            "/var/lib/xerotier/lmcache_config.yaml", "/run/ximd", "/run/credentials/other.service"} <= set(granted)
    for path in granted:
        assert not any(sandbox.within(path, h) or sandbox.within(h, path) for h in HIDDEN), path


def test_a_link_is_granted_only_when_its_target_keeps_clear_of_the_hidden_paths():
    granted, _ = carve("/", list(HIDDEN), FAKE)
    assert "/etc/ssl" in granted and "/etc/resolv.conf" in granted
    assert "/var/run" not in granted, "a link to a directory that holds a hidden path would grant all of it"
    assert "/tmp/sneaky" not in granted


def test_nothing_hidden_grants_the_top_whole():
    assert carve("/usr", list(HIDDEN), FAKE) == (["/usr"], [])
    assert carve("/etc/xerotier", list(HIDDEN), FAKE) == ([], [])


def test_the_plan_reads_everywhere_writes_where_allowed_and_uses_the_devices():
    rules = plan(Policy(writable=("/var/lib/xerotier",), hidden=HIDDEN), FAKE)
    assert rights(rules, "/usr") == {READ}
    assert rights(rules, "/var/lib/xerotier/models") == {READ, WRITE}
    assert rights(rules, "/var/lib/xerotier") == {LIST}
    assert rights(rules, "/dev") == {READ, sandbox.DEVICES}
    assert rights(rules, "/dev/shm") == {WRITE}
    assert rights(rules, "/proc") == {READ, sandbox.PROC}
    assert not any(sandbox.within(p, h) for p, _ in rules for h in HIDDEN)


def test_a_missing_hidden_path_or_writable_directory_is_left_out():
    rules = plan(Policy(writable=("/nowhere",), hidden=("/also/nowhere",)), FAKE)
    assert ("/", READ) in rules and not any(p.startswith(("/nowhere", "/also")) for p, _ in rules)


def test_every_right_of_the_abi_is_handled():
    assert sandbox.handled_access(1) == (1 << 13) - 1
    assert sandbox.handled_access(3) & sandbox.TRUNCATE and not sandbox.handled_access(3) & sandbox.IOCTL_DEV
    assert sandbox.handled_access(7) & sandbox.IOCTL_DEV


def test_the_policy_travels_as_json_in_the_launchers_argv():
    policy = Policy(writable=("/var/lib/xerotier",), hidden=HIDDEN)
    argv = sandbox.launcher_argv(policy, python="/usr/bin/python3")
    assert argv[:3] == ("/usr/bin/python3", "-I", "-S") and argv[3].endswith("ximd/engine/sandbox.py")
    assert Policy.from_json(argv[4]) == policy
