"""Logging set-up shared by every service: one line per record, service name first."""

from __future__ import annotations

import logging
import os
import sys


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
