"""The engine as a child process that outlives a change of ximd's program image.

ximd re-executes itself in place for an upgrade (ximd.reexec): same PID, so the
engine is still its child and the kernel still reports its exit to it. For the
new image to take the engine over from two numbers (its PID and the descriptor of
its output pipe), nothing of the old image may hold it: no asyncio subprocess
transport, no `subprocess.Popen`. So the engine is spawned with ``posix_spawn``
into a session of its own, its stdout and stderr into a pipe whose read end ximd
owns, and it is reaped with ``waitpid(pid, WNOHANG)``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass

# The status of a child that is not ours to reap (already reaped, or never ours).
UNKNOWN_EXIT = 255


@dataclass
class EngineChild:
    pid: int
    output_fd: int                   # read end of the engine's stdout+stderr pipe; ours to close
    returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the engine has exited (and is reaped), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = UNKNOWN_EXIT
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def resolve(program: str, path: str | None) -> str | None:
    """``program`` as an absolute path: searched in ``path`` (the engine's PATH) when it has no slash."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    return shutil.which(program, path=path)


def spawn(argv: list[str], env: dict[str, str]) -> EngineChild:
    """Start ``argv`` in a new session, stdin from /dev/null, stdout and stderr into a pipe.

    Raises OSError (FileNotFoundError when argv[0] cannot be found).
    """
    program = resolve(argv[0], env.get("PATH"))
    if program is None:
        raise FileNotFoundError(2, "no such executable file", argv[0])
    read_end, write_end = os.pipe()          # both close-on-exec; dup2 makes 1 and 2 inheritable
    try:
        pid = os.posix_spawn(program, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_DUP2, write_end, 2),
        ])
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return EngineChild(pid, read_end)


async def open_output(fd: int, limit: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A line reader on the engine's output pipe; closing the transport closes ``fd``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                                os.fdopen(fd, "rb", buffering=0))
    return reader, transport
