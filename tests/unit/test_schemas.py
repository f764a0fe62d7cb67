"""Schema evolution rules and the exported JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from shared import schemas
from shared.bus import BadMessage, decode, decode_event
from shared.jsonschema import export, write_all

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_events_round_trip_through_the_tagged_union() -> None:
    ev = schemas.AllocDecided(uid="u", name="n", node="x", containers=[
        schemas.ContainerGrant(devices=[schemas.CardGrant(uuid="GPU-1", mem=10, cores=5)])])
    back = decode_event(msgspec.json.encode(ev))
    assert back == ev


def test_old_readers_ignore_new_fields_and_new_readers_default_missing_ones() -> None:
    newer = {"kind": "released", "v": 2, "uid": "u", "node": "x", "added_later": {"a": 1}}
    ev = decode_event(json.dumps(newer).encode())
    assert isinstance(ev, schemas.AllocReleased) and ev.v == 2 and ev.reason == ""
    older = {"kind": "requested", "uid": "u", "name": "n"}
    req = decode_event(json.dumps(older).encode())
    assert isinstance(req, schemas.AllocRequested) and req.pending and req.containers == []


def test_schema_version_is_always_written() -> None:
    raw = json.loads(msgspec.json.encode(schemas.AllocBound(uid="u", name="n", node="x")))
    assert raw["v"] == schemas.SCHEMA_VERSION and raw["kind"] == "bound"


def test_bad_messages_raise_one_clear_error() -> None:
    with pytest.raises(BadMessage, match="cannot decode event"):
        decode_event(b'{"kind": "nonsense"}')
    with pytest.raises(BadMessage, match="NodeLedger"):
        decode(b'{"node": 3}', schemas.NodeLedger)


def test_card_usage_takes_init_peak_against_app_sum() -> None:
    g = schemas.CardGrant
    usage = schemas.card_usage([
        schemas.ContainerGrant(init=True, devices=[g(uuid="a", mem=5000, cores=50)]),
        schemas.ContainerGrant(devices=[g(uuid="a", mem=2000, cores=10)]),
        schemas.ContainerGrant(devices=[g(uuid="a", mem=1000, cores=10), g(uuid="b", mem=7, cores=0)]),
    ])
    assert usage == {"a": (5000, 50, 2), "b": (7, 0, 1)}


def test_exported_json_schemas_are_current(tmp_path: Path) -> None:
    write_all(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in DOCS.iterdir()}
    assert fresh == committed, "run: python -m shared.jsonschema docs/schemas"
    events = export()
    assert {"AllocRequested", "AllocDecided", "AllocReleased", "NodeEvent"} <= set(events)
