"""``python -m services.inventory``: run the inventory service alone against a NATS server.

Kubernetes mode (``--kube``): the service also keeps the inventory entries of the Nodes
whose cards are run by HAMi's vendor device plugins rather than by our node agent (see
:mod:`services.inventory.kube_nodes`), listing the Nodes every ``--kube-interval``
seconds. The API server is found as the binder finds it: ``--kube-host URL`` (no auth;
tests), ``--in-cluster`` (service account), ``--kubeconfig PATH`` (or ``$KUBECONFIG``,
or ``~/.kube/config``), else in-cluster. It lists Nodes and, unless
``--no-kube-handshake``, patches the handshake annotations of the Nodes it serves.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from services.inventory.service import InventoryService
from shared import runner
from shared.bus import Bus
from shared.config import Config

if TYPE_CHECKING:  # imported when started: standalone, the Kubernetes client stays unloaded
    from services.inventory.kube_nodes import NodeRegisterWatcher
    from shared.kube import Kube


class KubeInventory:
    """The inventory service and the vendor-node watcher, started and stopped as one."""

    def __init__(self, bus: Bus, cfg: Config, args: argparse.Namespace) -> None:
        self.bus, self.cfg, self.args = bus, cfg, args
        self.service = InventoryService(bus, cfg)
        self.kube: Kube | None = None
        self.watcher: NodeRegisterWatcher | None = None

    async def start(self) -> None:
        from services.inventory.kube_nodes import NodeRegisterWatcher
        from shared.kube import connect_from

        a = self.args
        # The service first: it watches the nodes bucket the watcher writes to.
        await self.service.start()
        try:
            kube = await connect_from(a)
        except Exception as exc:  # no token mounted, a bad kubeconfig: say which
            await self.service.stop()
            raise SystemExit(f"inventory: --kube: cannot reach the API server: {exc}") from None
        self.kube = kube
        watcher = NodeRegisterWatcher(
            self.bus,
            kube,
            interval=a.kube_interval,
            heartbeat_interval=self.cfg.heartbeat_interval,
            request_handshakes=a.kube_handshake,
        )
        watcher.start()
        self.watcher = watcher

    async def stop(self) -> None:
        # The watcher first, so it writes nothing after the service stopped listening.
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        if self.kube is not None:
            await self.kube.close()
            self.kube = None
        await self.service.stop()


def parser() -> argparse.ArgumentParser:
    p = runner.common_args("python -m services.inventory")
    k = p.add_argument_group("Kubernetes mode (the Nodes of HAMi's vendor device plugins)")
    k.add_argument(
        "--kube",
        action="store_true",
        help="also turn Nodes whose vendor plugin registered cards into inventory",
    )
    runner.kube_flags(k)
    k.add_argument(
        "--kube-handshake",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask vendor plugins to report (Requesting_<time>, as HAMi's scheduler): "
        "patches Nodes; --no-kube-handshake only reads (default on)",
    )
    k.add_argument(
        "--kube-interval",
        type=positive,
        default=5.0,
        help="seconds between two lists of the Nodes (default 5)",
    )
    return p


def positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    async def make(bus: Bus, cfg: Config) -> InventoryService | KubeInventory:
        return KubeInventory(bus, cfg, args) if args.kube else InventoryService(bus, cfg)

    return runner.run("inventory", args, make)


if __name__ == "__main__":
    sys.exit(main())
