"""``python -m services.inventory``: run the inventory service alone against a NATS server."""

from __future__ import annotations

import sys

from services.inventory.service import InventoryService
from shared import runner
from shared.bus import Bus
from shared.config import Config


async def make(bus: Bus, cfg: Config) -> InventoryService:
    return InventoryService(bus, cfg)


def main(argv: list[str] | None = None) -> int:
    args = runner.common_args("python -m services.inventory").parse_args(argv)
    return runner.run("inventory", args, make)


if __name__ == "__main__":
    sys.exit(main())
