"""Shared fixtures: a real nats-server per test on a free port, and a bus on top."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.config import Config, load
from shared.natsserver import EmbeddedNats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "test")
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def cfg() -> Config:
    c = load(env={})
    c.heartbeat_interval = 0.2
    c.unhealthy_after = 1.0
    return c
