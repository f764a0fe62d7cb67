"""Helper process of bench/kube_burst.py: N Kubernetes-mode node agents with their
device plugins (simulated cards), until SIGTERM. Prints "ready" once all registered.

    python bench/_burst_nodes.py NATS_URL HOST_ROOT CARDS NODE=PLUGIN_DIR [...]
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec  # noqa: E402
from services.nodeagent.kube.node import start_node  # noqa: E402
from shared import config  # noqa: E402
from shared.bus import Bus  # noqa: E402


async def main(url: str, host_root: str, cards: str, nodes: list[tuple[str, str]]) -> None:
    cfg = config.load()
    bus = await Bus.connect(url, "burst-nodes")
    knodes = []
    for node, plugin_dir in nodes:
        knodes.append(await start_node(bus, node, cfg, SimBackend(node, [parse_gpu_spec(cards)]),
                                       host_root=host_root, plugin_dir=plugin_dir,
                                       telemetry_interval=None))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    exact = sum(kn.plugin.exact for kn in knodes)
    union = sum(kn.plugin.ambiguous for kn in knodes)
    for kn in knodes:
        await kn.stop()
    await bus.close()
    print(f"allocate {exact} {union}", flush=True)


if __name__ == "__main__":
    url, root, cards, *pairs = sys.argv[1:]
    run = lambda: asyncio.run(main(url, root, cards, [tuple(p.split("=", 1)) for p in pairs]))  # type: ignore[misc]  # noqa: E731
    if os.environ.get("HAMI_BENCH_PROFILE"):
        import cProfile

        cProfile.run("run()", os.environ["HAMI_BENCH_PROFILE"])
    else:
        run()
