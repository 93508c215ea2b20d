"""Files both programs write the same careful way: secrets and generated configuration.

A crash or a full disk must leave the old file or the new one, never half of
either: write a temporary file beside it, fsync it, rename it over the old one,
then fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, text: str, *, mode: int = 0o600,
                     owner: tuple[int, int] | None = None) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), created with ``mode`` and, when given,
    owned by ``owner`` (uid, gid) before any byte is written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)       # the umask may have narrowed O_CREAT's mode
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path
