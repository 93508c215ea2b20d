"""What a user who may not do what a command needs is told: who may, and how to become one.

The configuration (0640 root:xerotier) and the control socket (root and the
xerotier group) keep the join key and the daemon's state from other users; a
command that meets either says so, with exit 77 (EX_NOPERM), instead of calling
a file it may not read an invalid configuration.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from ximd.exitcodes import EX_NOPERM

DEFAULT_GROUP = "xerotier"


def group_of(path: str | os.PathLike) -> str:
    """The group that may read `path` (the package's group when it cannot be told)."""
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return DEFAULT_GROUP


def user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def needs_privilege(command: str, what: str, group: str | None = DEFAULT_GROUP) -> int:
    """`ximd COMMAND needs root or the GROUP group: USER may not WHAT`, the fix, and exit 77.

    `group` None: only root will do (the identity is the service account's alone, 0600 in 0700).
    """
    who = user_name()
    if group is None:
        print(f"ximd: `ximd {command}` needs root: {who} may not {what}", file=sys.stderr)
        print(f"  run it with sudo: sudo ximd {command}", file=sys.stderr)
        return EX_NOPERM
    print(f"ximd: `ximd {command}` needs root or membership of the {group} group: {who} may not {what}",
          file=sys.stderr)
    print(f"  run it with sudo, or add the user to the group: sudo usermod -aG {group} {who} "
          "(then log in again)", file=sys.stderr)
    return EX_NOPERM
