"""Export the JSON Schema of every event and stored record, for outside subscribers.

``python -m shared.jsonschema DIR`` writes one file per message; a test keeps the
committed copies in docs/schemas current.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from shared import schemas

EXPORTED: tuple[type[msgspec.Struct], ...] = (
    *schemas.EVENT_TYPES,
    schemas.NodeInventory,
    schemas.NodeLedger,
    schemas.NodeHealth,
    schemas.Heartbeat,
    schemas.Telemetry,
    schemas.SubmitRequest,
    schemas.SubmitReply,
    schemas.WithdrawRequest,
    schemas.WithdrawReply,
    schemas.RequestOutcome,
)


def export() -> dict[str, dict[str, Any]]:
    return {t.__name__: msgspec.json.schema(t) for t in EXPORTED}


def write_all(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in export().items():
        (directory / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas"))
