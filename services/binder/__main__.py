"""``python -m services.binder``: run the binder service alone against a NATS server."""

from __future__ import annotations

import sys

from services.binder.service import BinderService
from shared import runner
from shared.bus import Bus
from shared.config import Config


async def make(bus: Bus, cfg: Config) -> BinderService:
    return BinderService(bus, cfg)


def main(argv: list[str] | None = None) -> int:
    args = runner.common_args("python -m services.binder").parse_args(argv)
    return runner.run("binder", args, make)


if __name__ == "__main__":
    sys.exit(main())
