"""The Unix socket file's lifecycle, kept apart from the KMS logic.

- Before listening: a socket file left by a crash or hard reboot is removed, but only after checking that
  nothing answers on it; a live plugin on the same path makes start-up fail instead of stealing its socket.
  A path that exists and is not a socket is never removed.
- While binding: the process umask makes the socket 0600 from its first moment (no window in which other
  users could connect); with a configured group it becomes 0660 and owned by that group.
- On exit: the socket file is removed.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pathlib
import socket
import stat
from collections.abc import Iterator


class SocketError(Exception):
    """The socket path cannot be used; the message says why and what to do."""


def prepare(path: pathlib.Path) -> None:
    """Makes ``path`` free for a new listener, or raises SocketError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; remove it or choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody is listening
        return
    except OSError as exc:
        raise SocketError(
            f"cannot tell whether {path} is in use ({exc.strerror}); remove it if stale"
        ) from None
    finally:
        probe.close()
    raise SocketError(
        f"another process is already serving on {path}; stop it first (two plugins must not share a socket)"
    )


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def secure(path: pathlib.Path, group: str | None) -> None:
    """Sets the socket's final mode: 0600, or 0660 owned by ``group``."""
    if group is None:
        os.chmod(path, 0o600)
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(f"socket group {group!r} does not exist") from None
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)


def identity(path: pathlib.Path) -> tuple[int, int] | None:
    """(device, inode) of the socket file, to recognise the one this process bound."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def remove(path: pathlib.Path, bound: tuple[int, int] | None) -> None:
    """Removes the socket file only if it is still the one this process bound (not a successor's)."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) and bound is not None and (st.st_dev, st.st_ino) == bound:
            path.unlink()
