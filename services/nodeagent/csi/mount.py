"""Bind mounts for the CSI node plugin, behind a small interface.

:class:`Mounter` is what the plugin needs (is a path a mount point, bind a directory
there, unmount it). :class:`BindMounter` does it with the ``mount(2)``/``umount2(2)``
system calls (needs CAP_SYS_ADMIN: the node agent's container is privileged); mount
points are read from ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Protocol

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2


class Mounter(Protocol):
    def is_mount_point(self, path: str) -> bool: ...

    def bind(self, source: str, target: str, *, readonly: bool = False) -> None: ...

    def unmount(self, target: str) -> None: ...


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str) -> set[str]:
    """The mount points listed in a ``/proc/<pid>/mountinfo`` text (field 5)."""
    out = set()
    for line in mountinfo.splitlines():
        parts = line.split(" ")
        if len(parts) > 4:
            out.add(_unescape(parts[4]))
    return out


class BindMounter:
    """Real bind mounts through libc."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def is_mount_point(self, path: str) -> bool:
        with open("/proc/self/mountinfo") as f:
            return os.path.realpath(path) in mount_points(f.read())

    def _call(self, what: str, rc: int, path: str) -> None:
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what} {path}: {os.strerror(e)}")

    def bind(self, source: str, target: str, *, readonly: bool = False) -> None:
        m = self._libc.mount
        self._call("bind mount", m(source.encode(), target.encode(), None, MS_BIND, None), target)
        if readonly:  # a bind mount takes MS_RDONLY only on a remount
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY
            rc = m(None, target.encode(), None, flags, None)
            if rc != 0:
                self.unmount(target)
            self._call("read-only remount", rc, target)

    def unmount(self, target: str) -> None:
        rc = self._libc.umount2(target.encode(), 0)
        if rc != 0 and ctypes.get_errno() == errno.EBUSY:
            # Still in use (a process inside the volume): detach now, freed when unused.
            rc = self._libc.umount2(target.encode(), MNT_DETACH)
        self._call("unmount", rc, target)


def can_mount() -> bool:
    """Whether this process may mount (has CAP_SYS_ADMIN in its user namespace)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 21))
    except OSError:
        pass
    return False
