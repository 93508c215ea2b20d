"""A booted Debian guest with a real systemd as PID 1, for the system tests.

`systemd-nspawn --boot` runs the guest's own systemd on a machine whose PID 1 is not
systemd: `--register=no --keep-unit` keep nspawn away from the (absent) host bus, and
the guest is driven with `nsenter -t LEADER -a`, since machinectl needs that bus too
(see research/systemd-testing.md). The rootfs is extracted from a cached tarball for
each guest and removed afterwards, so every guest starts from the same clean state.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# What a command inside the guest sees: the guest's tools, not the test's venv.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}
BOOT_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0


class GuestError(AssertionError):
    """A guest command failed or a wait ran out; the message carries the evidence."""


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll until `predicate()` is truthy and return it, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise GuestError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse_properties(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B` output (A=1\\nB=2) as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def nspawn_argv(root: Path, machine: str, binds_ro: Mapping[Path, str], private_network: bool) -> list[str]:
    argv = ["systemd-nspawn", "--quiet", "-D", str(root), "--boot", "-M", machine,
            # No host bus, no machined: without these two nspawn refuses to start.
            "--register=no", "--keep-unit",
            # nspawn's own syscall filter (systemd 252) lacks Landlock's calls; a real host
            # has no such filter, and ximd.service allows them to its engine sandbox.
            "--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self"]
    if private_network:
        argv.append("--private-network")
    argv += [f"--bind-ro={host}:{inside}" for host, inside in binds_ro.items()]
    return argv


def extract_rootfs(tarball: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "--zstd", "--numeric-owner", "-C", str(dest), "-xpf", str(tarball)],
                   check=True, capture_output=True)


def pid_in_namespace(pid: int) -> int | None:
    """The PID that `pid` has inside its innermost PID namespace (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        return None
    return None


def mounts_under(path: Path) -> list[str]:
    """Mount points below `path` in our mount namespace (nspawn's live in its own)."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix) or p == prefix.rstrip("/")]


@dataclass
class Guest:
    root: Path
    console_log: Path
    nspawn: subprocess.Popen
    leader: int
    _console: object = field(repr=False, default=None)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def boot(cls, tarball: Path, workdir: Path, *, machine: str = "ximd-guest",
             binds_ro: Mapping[Path, str] | None = None, private_network: bool = True,
             timeout: float = BOOT_TIMEOUT_S) -> Guest:
        """Extract `tarball` under `workdir`, boot it, and wait until systemd is up."""
        root = workdir / "root"
        extract_rootfs(tarball, root)
        console_log = workdir / "console.log"
        console = open(console_log, "wb")
        # A pure cgroup v2 hierarchy inside the guest, whatever the host mounts.
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        proc = subprocess.Popen(nspawn_argv(root, machine, binds_ro or {}, private_network),
                                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        guest = cls(root=root, console_log=console_log, nspawn=proc, leader=0, _console=console)
        try:
            guest.leader = wait_until(guest._find_leader, timeout, "the guest's PID 1 to appear")
            wait_until(guest._system_up, timeout, "the guest's systemd to finish booting", interval=0.3)
        except BaseException:
            guest.shutdown()
            raise
        return guest

    def _find_leader(self) -> int:
        if self.nspawn.poll() is not None:
            raise GuestError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n{self.console_tail()}")
        try:
            children = psutil.Process(self.nspawn.pid).children()
        except psutil.NoSuchProcess:
            return 0
        # nspawn forks through an intermediate process: the leader is the child that
        # is PID 1 in its own PID namespace.
        return next((child.pid for child in children if pid_in_namespace(child.pid) == 1), 0)

    def _system_up(self) -> bool:
        if self.nspawn.poll() is not None:
            raise GuestError(f"the guest died while booting:\n{self.console_tail()}")
        # Before /run/systemd/private exists this fails with "Failed to connect to bus".
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
        # "degraded" still means booted; the caller sees failed units in the journal.
        return state in ("running", "degraded")

    def shutdown(self) -> None:
        """Power the guest off (SIGTERM makes nspawn ask the guest's systemd), then
        remove the extracted rootfs. Safe to call twice."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=SHUTDOWN_TIMEOUT_S)
        if self._console is not None:
            self._console.close()
            self._console = None
        left = mounts_under(self.root) if self.root.exists() else []
        if left:
            # Deleting through a bind mount would delete host files: refuse loudly.
            raise GuestError(f"not removing {self.root}: still mounted there: {left}")
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=True)

    # ------------------------------------------------------------ commands

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 120,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the guest (a string goes through /bin/sh -c)."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        try:
            done = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout,
                                  env={**GUEST_ENV, **(env or {})})
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"guest command timed out after {timeout}s: {shlex.join(argv)}") from exc
        if check and done.returncode != 0:
            raise GuestError(f"guest command failed with {done.returncode}: {shlex.join(argv)}\n"
                             f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
        return done

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def write_file(self, path: str, content: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run(["install", "-D", "-m", mode, "-o", owner.split(":")[0], "-g", owner.split(":")[1],
                  "/dev/stdin", path], input=content)

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def stat(self, path: str) -> str:
        """'<octal mode> <user>:<group>' of a path inside the guest."""
        return self.run(["stat", "-c", "%a %U:%G", path]).stdout.strip()

    # ------------------------------------------------------------ systemd

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = [arg for prop in props for arg in ("-p", prop)]
        return parse_properties(self.systemctl("show", *args, unit).stdout)

    def active_state(self, unit: str) -> str:
        return self.systemctl("is-active", unit, check=False).stdout.strip()

    def wait_active(self, unit: str, timeout: float = 60) -> dict[str, str]:
        """Wait until `unit` is active; fail at once if it fails instead."""
        def active() -> dict[str, str] | None:
            props = self.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
            if props["ActiveState"] == "failed":
                raise GuestError(f"{unit} failed instead of becoming active:\n{self.journal(unit, lines=40)}")
            return props if props["ActiveState"] == "active" else None
        return wait_until(active, timeout, f"{unit} to become active")

    def wait_state(self, unit: str, states: Sequence[str], timeout: float = 60) -> str:
        return wait_until(lambda: (s := self.active_state(unit)) in states and s, timeout,
                          f"{unit} to reach one of {list(states)}")

    def journal(self, unit: str | None = None, *, lines: int | None = None, after_cursor: str | None = None,
                output: str = "short-precise", identifier: str | None = None) -> str:
        """The guest's journal, of one unit (both its own lines and systemd's about it) and/or
        of one SYSLOG_IDENTIFIER; with `after_cursor`, what came after that mark."""
        matches = (["-u", unit] if unit else []) + (["-t", identifier] if identifier else [])
        args = ["journalctl", "--no-pager", "-o", output, *matches]
        if lines:
            args += ["-n", str(lines)]
        if after_cursor:
            args += self._after(after_cursor, matches)
        return self.run(args, check=False).stdout

    def _after(self, cursor: str, matches: Sequence[str]) -> list[str]:
        """journalctl's arguments for the entries among `matches` that came after `cursor`'s.

        Not --after-cursor alone: the guest's journalctl (systemd 252) seeks to the cursor and
        then skips one entry *among the matches*, so when the cursor's own entry is not one of
        them (another unit's line was the journal's last) it drops the first matching entry
        after the mark instead (systemd#30288, fixed in 255). --cursor starts at the first
        matching entry from the cursor's on: --after-cursor is right only when that is the
        cursor's own entry."""
        if not matches:
            return ["--after-cursor", cursor]
        first = self.run(["sh", "-c", 'c=$1; shift; journalctl --no-pager -o json --output-fields=__CURSOR '
                                      '--cursor "$c" "$@" | head -n 1', "sh", cursor, *matches], check=False).stdout
        own = bool(first.strip()) and json.loads(first).get("__CURSOR") == cursor
        return ["--after-cursor" if own else "--cursor", cursor]

    def journal_cursor(self) -> str:
        """A mark in the journal; pass it to journal(after_cursor=) to read what came later."""
        out = self.run(["journalctl", "-n", "1", "--show-cursor", "--no-pager", "-o", "cat"]).stdout
        return out.strip().rsplit("-- cursor: ", 1)[-1]

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def processes_of(self, user: str) -> list[str]:
        """'pid command' lines of every process `user` runs inside the guest."""
        done = self.run(["ps", "-u", user, "-o", "pid=,args="], check=False)
        return [line.strip() for line in done.stdout.splitlines() if line.strip()]
