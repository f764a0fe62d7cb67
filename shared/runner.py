"""Running one service as its own process: ``python -m services.<name>``.

Parses the common flags, loads the configuration, connects the bus, starts the service
and stops it cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from shared import config, logs, tracing
from shared.bus import Bus


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def common_args(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--nats-url", default=None, help="NATS server (default: $HAMI_NATS_URL)")
    p.add_argument("--config", default=None, help="YAML configuration file")
    return p


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(
    name: str,
    args: argparse.Namespace,
    make: Callable[[Bus, config.Config], Awaitable[Service]],
) -> int:
    cfg = config.load(args.config)
    url = args.nats_url or cfg.nats_url
    if not url:
        raise SystemExit(f"{name}: no NATS server given (--nats-url or HAMI_NATS_URL)")
    logs.setup(name, cfg.log_level)
    tracing.setup(name)

    async def main() -> None:
        bus = await Bus.connect(url, name)
        svc = await make(bus, cfg)
        await svc.start()
        # What start-up built (modules, the cluster's state as first read) lives as long
        # as the process: keep the collector from re-scanning it, whose full passes
        # over a 5,000-node view were the tail of placement's latency.
        gc.freeze()
        try:
            await wait_for_signal()
        finally:
            await svc.stop()
            await bus.close()

    asyncio.run(main())
    return 0
