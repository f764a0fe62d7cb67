"""``python -m services.metrics``: run the metrics service alone against a NATS server."""

from __future__ import annotations

import sys

from services.metrics.service import MetricsService
from shared import runner
from shared.bus import Bus
from shared.config import Config


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args("python -m services.metrics")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=None, help="default: metricsPort of the config")
    p.add_argument("--legacy-metrics", action="store_true", default=None,
                   help="also export HAMi's pre-v2.9 metric names (default: $HAMI_LEGACY_METRICS=1)")
    args = p.parse_args(argv)

    async def make(bus: Bus, cfg: Config) -> MetricsService:
        return MetricsService(bus, cfg, port=args.port, host=args.host, legacy_metrics=args.legacy_metrics)

    return runner.run("metrics", args, make)


if __name__ == "__main__":
    sys.exit(main())
