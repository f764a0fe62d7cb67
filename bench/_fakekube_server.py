"""Helper process of bench/kube_burst.py: the fake API server on its own, until SIGTERM.
Prints its URL on the first line."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakekube import FakeKube  # noqa: E402


async def main(nodes: list[str]) -> None:
    fake = FakeKube(bookmark_interval=5.0, history_size=200_000)
    await fake.start()
    for node in nodes:
        fake.add_node(node, labels={"kubernetes.io/hostname": node},
                      capacity={"cpu": "128", "memory": "1Ti", "pods": "250"})
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(fake.url, flush=True)
    await stop.wait()
    await fake.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
