"""The engine's sandbox: Landlock keeps the node's secrets out of the engine's reach.

vLLM parses untrusted prompts and runs as the same user as ximd, so file
permissions cannot keep it from the identity (the node's CURVE secret key and
token), the configuration (the join key) or the join-key credential. Landlock
can, without privileges and under the unit's NoNewPrivileges=, with the GPU
untouched: the engine is started through this file, run as a script by ximd's
own interpreter,

    python -I -S sandbox.py '{"writable": [...], "hidden": [...]}' <engine argv...>

which restricts itself and then execs the engine (the restriction is inherited
by every process the engine starts, and cannot be lifted). The engine may read
and execute everything but the hidden paths, write in ximd's directories and
the temporary ones, and use the devices in /dev (ioctl included: the GPU).
Landlock also keeps it from ptrace-like access to processes outside its
sandbox, so ximd's /proc/<pid>/environ and memory are out of reach too.

Landlock only grants; "everything but X" is granted as X's siblings, on every
level from the root down to X (``plan``); the directories on the way get the
right to be listed only, so the names in them show, not their content.

This file is also imported by ximd (``landlock_abi``, ``Policy``,
``launcher_argv``), so it uses the standard library only and no other module
of ximd: it must run as a bare script.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# System call numbers: the same on every architecture (the unified table).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Filesystem access rights (include/uapi/linux/landlock.h) and the ABI that brought them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13        # ABI 2
TRUNCATE = 1 << 14     # ABI 3
IOCTL_DEV = 1 << 15    # ABI 5

# What a rule on a file (not a directory) may carry.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO
         | MAKE_SYM | REFER | TRUNCATE)
DEVICES = READ | WRITE_FILE | TRUNCATE | IOCTL_DEV
PROC = READ | WRITE_FILE            # /proc/self/... knobs some libraries set
LIST = READ_DIR                     # a directory on the way to a hidden path: names only

# Written by every engine whatever ximd's configuration says.
TEMPORARY_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

EXIT_CANNOT_CONFINE = 126


def handled_access(abi: int) -> int:
    """Every filesystem right the kernel's Landlock ABI knows: all of them are restricted."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


# ---------------------------------------------------------------- the kernel


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args) -> int:
    result = _libc().syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when there is none (not built, not enabled
    at boot, or the system call is filtered)."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def unavailable_reason() -> str:
    """Why landlock_abi() is 0, in words."""
    try:
        _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                 ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError as exc:
        return {errno.ENOSYS: "the kernel has no Landlock (Linux 5.13 or later built with it)",
                errno.EOPNOTSUPP: "Landlock is built but not enabled (add landlock to the lsm= "
                                  "boot parameter)",
                errno.EPERM: "the landlock system calls are filtered (the unit's SystemCallFilter= "
                             "must allow landlock_create_ruleset, landlock_add_rule and "
                             "landlock_restrict_self)"}.get(exc.errno or 0, exc.strerror or str(exc))
    return ""


def drop_capabilities() -> None:
    """Give up every capability (a no-op for the unit's xerotier user, which has none).

    The engine needs none, and a capable one could step around the sandbox: since
    Linux 6.12 CAP_PERFMON or CAP_SYS_ADMIN reads any process's /proc/<pid>/environ
    without the ptrace check Landlock takes part in. With no_new_privs set, the
    exec of the engine cannot give them back, not even to root.
    """
    header = struct.pack("=Ii", LINUX_CAPABILITY_VERSION_3, 0)
    no_capabilities = bytes(2 * 3 * 4)     # two {effective, permitted, inheritable} u32 triples
    if _libc().capset(ctypes.c_char_p(header), ctypes.c_char_p(no_capabilities)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def set_no_new_privs() -> None:
    """What Landlock requires of an unprivileged caller (the unit sets it too: NoNewPrivileges=yes)."""
    if _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def restrict_self(rules: Iterable[tuple[str, int]], abi: int) -> list[str]:
    """Confine this process (and all it will exec and start) to ``rules``; the paths that
    could not be granted (gone since they were listed, say), with why."""
    handled = handled_access(abi)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(struct.pack("=Q", handled)),
                       ctypes.c_size_t(8), ctypes.c_uint32(0))
    skipped = []
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                skipped.append(f"{path} ({exc.strerror})")
                continue
            try:
                mask = handled if stat.S_ISDIR(os.fstat(fd).st_mode) else handled & FILE_RIGHTS
                attr = struct.pack("=Qi", access & mask, fd)
                _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                         ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.c_char_p(attr), ctypes.c_uint32(0))
            except OSError as exc:
                skipped.append(f"{path} ({exc.strerror})")
            finally:
                os.close(fd)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return skipped


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Policy:
    """What the engine may write (besides TEMPORARY_DIRS and /dev) and what it may not see."""

    writable: tuple[str, ...]
    hidden: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"writable": list(self.writable), "hidden": list(self.hidden)})

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        return cls(tuple(data["writable"]), tuple(data["hidden"]))


def launcher_argv(policy: Policy, python: str = sys.executable) -> tuple[str, ...]:
    """What goes in front of the engine's argv: this file run by ``python`` (ximd's own)."""
    return (python, "-I", "-S", os.path.abspath(__file__), policy.to_json())


def within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class FileSystem:
    """The three questions ``carve`` asks of the file system (a fake in unit tests)."""

    listdir: Callable[[str], list[str]] = os.listdir
    realpath: Callable[[str], str] = os.path.realpath
    exists: Callable[[str], bool] = os.path.exists


def carve(top: str, hidden: Sequence[str], fs: FileSystem) -> tuple[list[str], list[str]]:
    """(paths to grant, directories to let be listed) that together cover ``top`` except
    every hidden path in it. ``top`` and ``hidden`` are real paths (no links)."""
    if any(within(top, h) for h in hidden):
        return [], []
    inside = [h for h in hidden if within(h, top)]
    if not inside:
        return [top], []
    granted, listed = [], [top]
    try:
        names = sorted(fs.listdir(top))
    except OSError:
        return [], [top]
    for name in names:
        child = os.path.join(top, name)
        real = fs.realpath(child)
        if real != child:
            # A link: a rule on it lands on its target, so grant it only when the
            # target neither is nor holds a hidden path.
            if not any(within(real, h) or within(h, real) for h in hidden):
                granted.append(child)
            continue
        more, more_listed = carve(child, inside, fs)
        granted += more
        listed += more_listed
    return granted, listed


def plan(policy: Policy, fs: FileSystem = FileSystem()) -> list[tuple[str, int]]:
    """The Landlock rules (path, rights) for ``policy``: read everywhere, write where allowed,
    the devices, /proc, never a hidden path."""
    hidden = [fs.realpath(h) for h in policy.hidden if fs.exists(h)]
    rules: list[tuple[str, int]] = []

    def grant(top: str, access: int) -> None:
        if not fs.exists(top):
            return
        granted, listed = carve(fs.realpath(top), hidden, fs)
        rules.extend((path, access) for path in granted)
        rules.extend((path, LIST) for path in listed)

    grant("/", READ)
    grant("/proc", PROC)
    grant("/dev", DEVICES)
    for path in (*TEMPORARY_DIRS, *policy.writable):
        grant(path, WRITE)
    return rules


# ---------------------------------------------------------------- the launcher


def main(argv: list[str]) -> int:
    """Confine this process by the policy in argv[1], then exec argv[2:] (the engine)."""
    if len(argv) < 3:
        sys.stderr.write("usage: sandbox.py POLICY-JSON ENGINE-ARGV...\n")
        return 2
    policy, command = Policy.from_json(argv[1]), argv[2:]
    abi = landlock_abi()
    try:
        set_no_new_privs()
        drop_capabilities()
    except OSError as exc:
        sys.stderr.write(f"ximd engine sandbox: cannot drop privileges: {exc.strerror or exc}; "
                         "not starting the engine\n")
        return EXIT_CANNOT_CONFINE
    if abi:      # without Landlock ximd has said so once; the engine runs as before
        try:
            skipped = restrict_self(plan(policy), abi)
        except OSError as exc:
            sys.stderr.write(f"ximd engine sandbox: cannot confine the engine with Landlock "
                             f"(ABI {abi}): {exc.strerror or exc}; not starting it\n")
            return EXIT_CANNOT_CONFINE
        if skipped:
            sys.stderr.write("ximd engine sandbox: not granted (the engine cannot use them): "
                             + ", ".join(skipped) + "\n")
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"ximd engine sandbox: cannot start {command[0]}: {exc.strerror or exc}\n")
    return EXIT_CANNOT_CONFINE


if __name__ == "__main__":
    sys.exit(main(sys.argv))
