"""Logging shared by every service: one line per record, service name first, and a
rate-limited logger for problems that repeat (:class:`RateLimited`)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


def setup(service: str, level: str | None = None) -> logging.Logger:
    lvl = (level or os.environ.get("HAMI_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not any(getattr(h, "_hami", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handler._hami = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(getattr(logging, lvl, logging.INFO))
    logging.getLogger("nats").setLevel(logging.WARNING)
    return logging.getLogger(f"hami.{service}")


class RateLimited:
    """Logs each kind of repeated problem once per ``interval``, then a count.

    A malformed message, a garbage KV entry or a bad heartbeat can arrive thousands of
    times a second; the first of each kind (``key``) is logged at once, the rest of
    the interval only counted, and the next one after the interval logs with
    "N more like this in the last 60 s". ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys  # kinds remembered; the oldest is forgotten past it
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (logged at, suppressed)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log now (True) or count it for the next line of this ``key`` (False)."""
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            msg = f"{msg} ({last[1]} more like this in the last {self.interval:g} s)"
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        if len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def suppressed(self, key: str) -> int:
        """How many of ``key`` were counted, not logged, since its last line."""
        last = self._seen.get(key)
        return last[1] if last else 0
