"""A request/reply responder in its own process, for bench/placement.py's round trip.

    python bench/_echo.py NATS_URL SUBJECT

Answers every request on SUBJECT with ``ok`` until terminated. Measuring the round
trip against a responder in another process crosses the same process boundaries as
the placement path (a requester, the server, a service), where a responder inside the
requesting process would share its already-running event loop.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
from nats.aio.msg import Msg


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url, name="hami-bench-echo")

    async def echo(msg: Msg) -> None:
        await msg.respond(b"ok")

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
