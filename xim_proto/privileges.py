"""Root running an admin command on a service account's files.

ximd runs as ``xerotier`` and owns its state and model cache; xim-router runs
as ``xim-router`` and owns its store. When an operator runs `ximd model pull`
or `xim-router join-key create` as root, the files must still end up the
service's: the command reads what only root may (a token) and then becomes the
owner of the directory for the rest, as `sudo -u ACCOUNT` would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

Owner = tuple[int, int]


def owner_to_become(paths: Iterable[Path]) -> Owner | None:
    """The owner of the first of ``paths`` that exists, when we are root and it is someone
    else; None when there is nobody to become."""
    if os.geteuid() != 0:
        return None
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        return (st.st_uid, st.st_gid) if st.st_uid != 0 else None
    return None


def become(owner: Owner) -> None:
    """Drop root for good: no supplementary groups, the owner's group, then its uid."""
    uid, gid = owner
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
