"""Which processes hold a ``hami run`` slice, and whether any of them is still alive.

``hami run`` names the processes that hold its slice (itself and the command it runs);
the standalone node agent keeps them with their start times (``/proc/<pid>/stat`` field
22), so a pid the kernel has since given to another process never counts as the holder.
A zombie (exited, not yet reaped by its parent) counts as gone: it can use no device.

The list is kept in the slice's directory (``run.json``), so an agent restarted while
the command runs still watches it; the directory goes when the slice is released.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "run.json"


@dataclass(frozen=True)
class Holder:
    pid: int
    start: int  # clock ticks after boot at which the process started


def parse_stat(text: str) -> tuple[str, int]:
    """(state, start time) from a ``/proc/<pid>/stat`` line. The command name (field 2)
    may hold spaces and parentheses, so the fields are counted from its last ``)``."""
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


def start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time of a running process ``pid``; None if there is none (or a zombie)."""
    if pid <= 0:
        return None
    try:
        state, start = parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X", "x") else start


def holders(pids: list[int], proc: Path = Path("/proc")) -> list[Holder]:
    """The given pids that are running now, with their start times."""
    out: list[Holder] = []
    for pid in dict.fromkeys(pids):
        start = start_time(pid, proc)
        if start is not None:
            out.append(Holder(pid, start))
    return out


def alive(h: Holder, proc: Path = Path("/proc")) -> bool:
    return start_time(h.pid, proc) == h.start


def save(directory: Path, hs: list[Holder]) -> None:
    tmp = directory / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps([[h.pid, h.start] for h in hs]))
    tmp.replace(directory / RUN_FILE)


def load(directory: Path) -> list[Holder] | None:
    """The holders saved in ``directory``; None when it has none (not a ``hami run``)."""
    try:
        raw = json.loads((directory / RUN_FILE).read_text())
        return [Holder(int(p), int(s)) for p, s in raw]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return []  # unreadable: nobody provably holds it
