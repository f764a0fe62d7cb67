"""The state file ``hami up`` leaves for the other commands: where it listens, who it is.

It records the NATS and metrics URLs, ``hami up``'s pid and the embedded nats-server's
(each with its kernel start time, so a reused pid is not taken for the original). A
state file whose ``hami up`` is gone (``kill -9``, a reboot) is *stale*: readers say so
and clear it, ending a nats-server left behind where the kernel could not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

TEMP_PREFIX = "hami-nats-"  # EmbeddedNats's temporary data directories


class StateError(Exception):
    """No usable state file; the message says what to do."""


class Stale(StateError):
    """The state file names a ``hami up`` that is no longer running."""


def path() -> Path:
    return Path(os.environ.get("HAMI_STATE_FILE") or Path.home() / ".hami" / "state.json")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs and, when ``started`` is known, is the process recorded."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust the signal check
    if state in ("Z", "X"):  # a zombie has exited; only its parent has not reaped it
        return False
    return started is None or start_time(pid) in (None, started)


def record(nats_url: str, metrics_url: str, nats_pid: int | None, nats_dir: str | None) -> dict[str, Any]:
    me = os.getpid()
    return {
        "nats_url": nats_url,
        "metrics_url": metrics_url,
        "pid": me,
        "started": start_time(me),
        "nats_pid": nats_pid,
        "nats_started": start_time(nats_pid) if nats_pid else None,
        "nats_data_dir": nats_dir,  # set only when it is a temporary directory
    }


def write(state: dict[str, Any]) -> Path:
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(p)  # readers never see half a file
    return p


def read() -> dict[str, Any]:
    """The live state; raises :class:`StateError` (missing, unreadable) or :class:`Stale`."""
    p = path()
    try:
        state = json.loads(p.read_text())
    except FileNotFoundError:
        raise StateError(
            "no running system found: start one with 'hami up', or give --nats-url"
        ) from None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read state file {p}: {exc}; remove it or run 'hami up'") from None
    if not isinstance(state, dict) or not isinstance(state.get("nats_url"), str):
        raise StateError(f"state file {p} is not hami's; remove it or run 'hami up'")
    pid = state.get("pid")
    if isinstance(pid, int) and not alive(pid, state.get("started")):
        clear_stale(state)
        raise Stale(
            f"stale state file {p}: 'hami up' (pid {pid}) is gone; removed it. "
            "Start one with 'hami up', or give --nats-url"
        )
    return state


def clear_stale(state: dict[str, Any]) -> None:
    """Remove a dead ``hami up``'s state file, nats-server and temporary data."""
    npid = state.get("nats_pid")
    if isinstance(npid, int) and alive(npid, state.get("nats_started")):
        try:
            os.kill(npid, signal.SIGTERM)
        except OSError:
            pass
    ndir = state.get("nats_data_dir")
    if isinstance(ndir, str):
        d = Path(ndir)
        # Only a directory EmbeddedNats made for itself; never a user's data directory.
        if d.name.startswith(TEMP_PREFIX) and d.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(d, ignore_errors=True)
    try:
        path().unlink()
    except OSError:
        pass


def remove_if_mine() -> None:
    """At ``hami up``'s exit: remove the state file unless another ``hami up`` owns it."""
    p = path()
    try:
        if json.loads(p.read_text()).get("pid") == os.getpid():
            p.unlink()
    except (OSError, ValueError, AttributeError):
        pass
