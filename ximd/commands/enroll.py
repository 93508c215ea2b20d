"""`ximd enroll` and `ximd unenroll`: what the operator reads, and the exit status.

The work (reading the join key, talking to the router, saving the identity)
is ximd.enrollment's; this module turns its answers and refusals into one
line each and an exit status from ximd.exitcodes.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from xim_proto.joinkey import fingerprint
from ximd.commands.permissions import needs_privilege
from ximd.config import Config
from ximd.enrollment import (
    EnrollmentError,
    EnrollmentRejected,
    JoinKeyError,
    RouterConfigError,
    RouterUnreachable,
    enroll_and_save,
    key_policy,
    local_time,
    read_join_key,
    unenroll,
)
from ximd.exitcodes import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_REFUSED, EX_UNAVAILABLE
from ximd.identity import (
    Identity,
    IdentityDenied,
    IdentityError,
    IdentitySaveError,
    identity_path,
    load_identity,
    remove_identity,
)

# The domain's logger: the journal shows one source for everything enrollment does.
log = logging.getLogger("ximd.enrollment")

NO_KEY_HINT = ("no join key: pass one with --join-key-file PATH (or - for standard input), or set "
               "router.join_key / router.join_key_file in /etc/xerotier/agent.toml, "
               "XEROTIER_AGENT_JOIN_KEY, or the systemd credential 'join-key'")


def _say(text: str) -> None:
    print(text, flush=True)


def _fail(text: str) -> None:
    print(f"ximd: {text}", file=sys.stderr, flush=True)


async def main_enroll(cfg: Config, *, join_key_file: str | None = None, force: bool = False,
                      stdin: IO[str] | None = None) -> int:
    """`ximd enroll [--join-key-file PATH|-] [--force]`; returns the exit code."""
    state_dir = cfg.agent.state_dir
    try:
        current = load_identity(state_dir)
    except IdentityDenied as exc:
        return needs_privilege("enroll", f"read {exc.path}", group=None)
    except IdentityError as exc:
        if not force:
            _fail(f"{exc} (or run `ximd enroll --force` to replace it)")
            return EX_CONFIG
        current = None
    try:
        found = read_join_key(cfg, join_key_file=join_key_file, stdin=stdin)
    except JoinKeyError as exc:
        _fail(str(exc))
        return EX_CONFIG
    if current is not None and not force:
        if found is None or fingerprint(found[0]) == current.join_key_fingerprint:
            _say(f"already enrolled as agent {current.agent_id} (worker {current.worker_id}) with "
                 f"{current.router_url} since {local_time(current.enrolled_at)}")
            return EX_OK
        _fail(key_policy(current, fingerprint(found[0]), found[1])[1])
        return EX_REFUSED
    if found is None:
        _fail(NO_KEY_HINT)
        return EX_CONFIG
    key, source = found
    try:
        identity, path = await enroll_and_save(cfg, key, source=source)
    except IdentitySaveError as exc:
        _fail(str(exc))
        return EX_CANTCREAT
    except RouterConfigError as exc:
        _fail(str(exc))
        return EX_CONFIG
    except EnrollmentRejected as exc:
        _fail(f"enrollment refused by {cfg.router.url}: {exc.message} ({exc.code}); "
              "ask for a new join key (`xim-router join-key create`)")
        return EX_REFUSED
    except RouterUnreachable as exc:
        _fail(f"{exc}; nothing was changed, try again later")
        return EX_UNAVAILABLE
    _say(f"enrolled as agent {identity.agent_id} (worker {identity.worker_id}) with "
         f"{identity.router_url}; identity saved in {path}")
    if current is not None:
        await _leave_quietly(cfg, current)
    return EX_OK


async def _leave_quietly(cfg: Config, old: Identity) -> None:
    """After --force: tell the router the old identity is gone (best effort)."""
    try:
        await unenroll(cfg, old)
        _say(f"the previous identity (agent {old.agent_id}) was unenrolled")
    except EnrollmentError as exc:
        _say(f"the previous identity (agent {old.agent_id}) could not be unenrolled ({exc}); "
             "revoke it on the router with `xim-router revoke`")


async def main_unenroll(cfg: Config) -> int:
    """`ximd unenroll`: tell the router, then remove the identity."""
    state_dir = cfg.agent.state_dir
    try:
        identity = load_identity(state_dir)
    except IdentityDenied as exc:
        return needs_privilege("unenroll", f"read {exc.path}", group=None)
    except IdentityError as exc:
        _fail(str(exc))
        return EX_CONFIG
    if identity is None:
        _say("not enrolled; nothing to do")
        return EX_OK
    try:
        await unenroll(cfg, identity)
    except RouterConfigError as exc:
        _fail(str(exc))
        return EX_CONFIG
    except EnrollmentRejected as exc:
        # Already revoked or unknown there: nothing left to undo on the router.
        _say(f"the router no longer knows this identity ({exc.code}); removing it here")
    except RouterUnreachable as exc:
        _fail(f"{exc}; the identity was kept: run `ximd unenroll` again, or delete "
              f"{identity_path(state_dir)} to forget it here only")
        return EX_UNAVAILABLE
    try:
        removed = remove_identity(state_dir)
    except IdentityError as exc:
        _fail(f"the router let this node go, but {exc}")
        return EX_CONFIG
    _say(f"unenrolled agent {identity.agent_id}; removed {removed}")
    return EX_OK
