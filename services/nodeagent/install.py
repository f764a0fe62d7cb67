"""Puts the limiter onto the host: ``libvgpu.so`` and the ``ld.so.preload`` that loads it.

The device plugin mounts ``/usr/local/vgpu/libvgpu.so`` and
``/usr/local/vgpu/ld.so.preload`` (as the container's ``/etc/ld.so.preload``) into every
GPU container (REFERENCE §6). Both are host files, so the node agent installs them at
start, under its host root, from the library its image carries. Each is written to a
temp file in the same directory and renamed over the old one: a container starting
meanwhile maps the old library or the new one, never half of one, and a process that
already mapped the old one keeps its inode.

:func:`installed` says which of the two files exist on the host; the device plugin
mounts only those (a mount of a missing host file would fail the container's start).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shared.files import replace_file

log = logging.getLogger("hami.nodeagent.install")

VGPU_DIR = "usr/local/vgpu"  # relative to the host root
LIB_NAME = "libvgpu.so"
PRELOAD_NAME = "ld.so.preload"
# Host path of the library as the container sees it: the device plugin mounts the host's
# /usr/local/vgpu/libvgpu.so at the same path.
LIB_IN_CONTAINER = f"/{VGPU_DIR}/{LIB_NAME}"
PRELOAD_TEXT = f"{LIB_IN_CONTAINER}\n"


@dataclass(frozen=True)
class Installed:
    lib: bool
    preload: bool


def install(host_root: str | os.PathLike[str], source: str | os.PathLike[str] | None) -> Installed:
    """Install the library from ``source`` (skipped when None, missing, or already the
    host file itself) and the preload file, atomically; returns what is now on the host."""
    d = Path(host_root) / VGPU_DIR
    d.mkdir(parents=True, exist_ok=True)
    lib = d / LIB_NAME
    if source is not None:
        src = Path(source)
        if not src.is_file():
            log.warning("limiter %s not found; %s left as it is", src, lib)
        elif lib.exists() and os.path.samefile(src, lib):
            pass  # the image's library is the host's (host root "/" in a plain container)
        else:
            replace_file(lib, src.read_bytes(), 0o644)  # readable by any container user
    replace_file(d / PRELOAD_NAME, PRELOAD_TEXT.encode(), 0o644)
    return installed(host_root)


def installed(host_root: str | os.PathLike[str]) -> Installed:
    d = Path(host_root) / VGPU_DIR
    lib = (d / LIB_NAME).is_file()
    # A preload file naming a missing library makes every program in the container
    # print a loader error: it only counts with the library beside it.
    return Installed(lib=lib, preload=lib and (d / PRELOAD_NAME).is_file())
