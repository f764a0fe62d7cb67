"""Replacing a file whole: readers see the old content or the new, never half of one.

Several parts write files that another process reads at any moment (slice files a
container opens at start, the webhook's certificate pair, nats-server's configuration,
credentials): each writes a temp file in the same directory, sets its mode exactly
(whatever the umask), and renames it over. No fsync: every writer can rebuild its file
(the node agent's start-up reconcile, the next certificate check, the next start).
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
