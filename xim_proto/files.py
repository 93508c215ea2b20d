"""Files both programs write the same careful way: secrets and generated configuration.

A crash or a full disk must leave the old file or the new one, never half of
either: write a temporary file beside it, fsync it, rename it over the old one,
then fsync the directory so the rename itself survives a power cut.

A directory may belong to someone less trusted than the writer: root runs
`ximd enroll` into the state directory the service account owns. Whatever is
inside such a directory is the owner's to plant, so below the directory the
caller chose, nothing is reached by path: each step opens the next name
relative to a directory descriptor, never follows a symbolic link
(``O_NOFOLLOW``), never reuses an existing temporary name (``O_EXCL``) and
checks who owns what it opened. ``UnsafePath`` says what was found instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

Owner = tuple[int, int]            # (uid, gid)

TEMP_NAME_TRIES = 8


class UnsafePath(Exception):
    """A name that must be a plain directory or file is a link, something else, or
    belongs to an unexpected user; str() says which and what to do."""


def fsync_directory(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(dir_fd: int, name: str, shown: str) -> str:
    """What ``name`` is instead of what was expected, for UnsafePath's message."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return f"{shown} cannot be opened safely"
    if stat.S_ISLNK(st.st_mode):
        return (f"{shown} is a symbolic link (owned by uid {st.st_uid}); it is never followed: "
                "remove it and try again")
    return f"{shown} is not a directory"


def _check_owner(st: os.stat_result, allowed: set[int], shown: str) -> None:
    if st.st_uid not in allowed:
        expected = " or ".join(f"uid {uid}" for uid in sorted(allowed))
        raise UnsafePath(f"{shown} is owned by uid {st.st_uid}, expected {expected}: "
                         "check who created it, then remove it and try again")


@contextlib.contextmanager
def opened_directory(path: str | os.PathLike) -> Iterator[int]:
    """A descriptor of ``path`` (the caller's own choice, so links on the way are followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_subdirectory(parent_fd: int, name: str, *, shown: str, mode: int = 0o700,
                         owner: Owner | None = None, create: bool = True) -> Iterator[int | None]:
    """``name`` inside ``parent_fd`` as a descriptor: a real directory (created with
    ``mode`` when missing and ``create``), owned by ``owner`` or by us, then set to
    ``mode`` and ``owner``. None when it is missing and not ``create``; UnsafePath
    when it is a link, not a directory, or someone else's."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent_fd)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(_describe(parent_fd, name, shown)) from None
        raise
    try:
        _check_owner(os.fstat(fd), {os.geteuid(), *([owner[0]] if owner else [])}, shown)
        if create:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
        yield fd
    finally:
        os.close(fd)


def read_text_at(dir_fd: int, name: str, *, shown: str) -> tuple[str, os.stat_result] | None:
    """The text of the plain file ``name`` and its status; None when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(_describe(dir_fd, name, shown)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{shown} is not a plain file")
    with os.fdopen(fd, encoding="utf-8") as file:
        return file.read(), st


def _new_temp_file(dir_fd: int, name: str, mode: int) -> tuple[int, str]:
    """A fresh temporary file beside ``name``: a name nobody could have planted (O_EXCL)."""
    for _ in range(TEMP_NAME_TRIES):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(tmp, flags, mode, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {name}")


def write_atomically_at(dir_fd: int, name: str, text: str, *, mode: int = 0o600,
                        owner: Owner | None = None) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``text`` (UTF-8), created with
    ``mode`` and, when given, owned by ``owner`` before any byte is written.

    The rename replaces whatever ``name`` is (a planted link included) without
    following it."""
    fd, tmp = _new_temp_file(dir_fd, name, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)       # the umask may have narrowed O_CREAT's mode
            if owner is not None:
                os.fchown(out.fileno(), *owner)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def write_atomically(path: str | os.PathLike, text: str, *, mode: int = 0o600,
                     owner: Owner | None = None) -> Path:
    """write_atomically_at() for ``path`` in a directory the caller trusts."""
    path = Path(path)
    with opened_directory(path.parent) as dir_fd:
        write_atomically_at(dir_fd, path.name, text, mode=mode, owner=owner)
    return path
