"""``python -m services.metrics``: run the metrics service alone against a NATS server."""

from __future__ import annotations

import sys

from services.metrics.service import MetricsService
from shared import runner
from shared.bus import Bus
from shared.config import Config


async def make(bus: Bus, cfg: Config) -> MetricsService:
    return MetricsService(bus, cfg)


def main(argv: list[str] | None = None) -> int:
    args = runner.common_args("python -m services.metrics").parse_args(argv)
    return runner.run("metrics", args, make)


if __name__ == "__main__":
    sys.exit(main())
