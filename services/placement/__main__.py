"""``python -m services.placement``: run the placement service alone against a NATS server."""

from __future__ import annotations

import sys

from services.placement.service import PlacementService
from shared import runner
from shared.bus import Bus
from shared.config import Config


async def make(bus: Bus, cfg: Config) -> PlacementService:
    return PlacementService(bus, cfg)


def main(argv: list[str] | None = None) -> int:
    args = runner.common_args("python -m services.placement").parse_args(argv)
    return runner.run("placement", args, make)


if __name__ == "__main__":
    sys.exit(main())
