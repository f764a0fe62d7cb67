"""The AsyncAPI document of the bus: current, valid AsyncAPI 3.0, and true to the code.

Validity is checked against the official AsyncAPI 3.0.0 JSON Schema, vendored from the
npm package ``@asyncapi/specs`` (Apache-2.0; licence and notice beside it in tests/data),
so the test needs no network: references resolve only inside that file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator, ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT7, DRAFT202012

from shared import asyncapi, auth, schemas, subjects
from shared.config import BusSettings
from shared.jsonschema import export

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
SPEC = ROOT / "tests" / "data" / "asyncapi-3.0.0.schema.json"
REGENERATE = "python -m shared.asyncapi > docs/asyncapi.yaml"


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    spec = json.loads(SPEC.read_text())
    # The bundle holds every definition under its own $id; crawling registers them, and
    # a reference outside the bundle fails (nothing is retrieved).
    registry: Registry[Any] = (
        Registry().with_resource(spec["$id"], DRAFT7.create_resource(spec)).crawl()
    )
    return Draft7Validator(spec, registry=registry)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    out: dict[str, Any] = yaml.safe_load(asyncapi.render())
    return out


def errors(validator: Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in validator.iter_errors(document)
    ]


def test_committed_document_is_current() -> None:
    assert COMMITTED.read_text() == asyncapi.render(), (
        f"docs/asyncapi.yaml is stale; run: {REGENERATE}"
    )


def test_document_is_valid_asyncapi_3(validator: Draft7Validator, doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert errors(validator, doc) == []
    assert errors(validator, yaml.safe_load(COMMITTED.read_text())) == []


@pytest.mark.parametrize(
    "breakage",
    [
        "no info.version",
        "AsyncAPI 2 action",
        "unknown channel field",
        "bad payload schema",
        "parameter with a schema",
        "unknown security type",
    ],
)
def test_the_validator_rejects_broken_documents(
    validator: Draft7Validator, doc: dict[str, Any], breakage: str
) -> None:
    bad = copy.deepcopy(doc)
    if breakage == "no info.version":
        del bad["info"]["version"]
    elif breakage == "AsyncAPI 2 action":
        bad["operations"]["placement_send_allocDecided"]["action"] = "publish"
    elif breakage == "unknown channel field":
        bad["channels"]["allocDecided"]["subject"] = "hami.evt.alloc.decided.{node}"
    elif breakage == "bad payload schema":
        bad["components"]["schemas"]["AllocDecided"]["type"] = 5
    elif breakage == "parameter with a schema":  # 2.x had one; 3.0 parameters have none
        bad["channels"]["allocDecided"]["parameters"]["node"]["schema"] = {"type": "string"}
    elif breakage == "unknown security type":
        bad["components"]["securitySchemes"]["nkey"]["type"] = "nkey"
    assert errors(validator, bad), breakage


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves_and_operations_use_their_channels_messages(
    doc: dict[str, Any],
) -> None:
    """What the JSON Schema cannot check and an AsyncAPI parser refuses."""
    for ref in _refs(doc):
        _resolve(doc, ref)
    for op_id, op in doc["operations"].items():
        chan = op["channel"]["$ref"]
        assert all(m["$ref"].startswith(chan + "/messages/") for m in op["messages"]), op_id
        if "reply" in op:
            rchan = op["reply"]["channel"]["$ref"]
            assert all(
                m["$ref"].startswith(rchan + "/messages/") for m in op["reply"]["messages"]
            ), op_id
    for cid, ch in doc["channels"].items():
        address = ch["address"] or ""
        params = {p.strip("{}") for p in address.split(".") if p.startswith("{")}
        assert params == set(ch.get("parameters", {})), cid


def test_every_subject_and_bucket_a_role_may_use_is_documented() -> None:
    assert asyncapi.undocumented() == [], "add a channel to shared/asyncapi.py for these"


def test_every_event_verb_and_bucket_has_a_channel(doc: dict[str, Any]) -> None:
    addresses = [c["address"] for c in doc["channels"].values() if c["address"]]
    for verb in subjects.ALLOC_VERBS:
        assert any(a.startswith(f"hami.evt.alloc.{verb}") for a in addresses), verb
    nodes = doc["channels"]["nodeEvent"]
    assert nodes["parameters"]["verb"]["enum"] == list(subjects.NODE_VERBS)
    for bucket in (*auth._BUCKETS,):  # noqa: SLF001 - every bucket any role may create
        assert f"$KV.{bucket}." + "{" in " ".join(addresses), bucket


def _ops(doc: dict[str, Any], channel: str, action: str) -> set[str]:
    return {
        o["tags"][0]["name"]
        for o in doc["operations"].values()
        if o["channel"]["$ref"] == f"#/channels/{channel}" and o["action"] == action
    }


def test_operations_are_the_permissions(doc: dict[str, Any]) -> None:
    assert _ops(doc, "allocDecided", "send") == {"placement"}
    assert _ops(doc, "allocRequested", "send") == {"binder"}
    assert _ops(doc, "allocPrepared", "send") == {"nodeagent"}
    assert _ops(doc, "kvLedger", "send") == {"placement"}
    assert "reader" in _ops(doc, "allocReleased", "receive")
    # The reader sends nothing; it receives every stored event and nothing else.
    reader = [o for o in doc["operations"].values() if o["tags"][0]["name"] == "reader"]
    assert {o["action"] for o in reader} == {"receive"}
    event_channels = {
        cid
        for cid, c in doc["channels"].items()
        if c.get("x-jetstream", {}).get("stream") == subjects.EVENTS_STREAM
    }
    assert {o["channel"]["$ref"].rsplit("/", 1)[1] for o in reader} == event_channels
    # Work queues are named with their queue group; request/reply names its answer.
    take = doc["operations"]["placement_receive_allocRequested"]
    assert take["bindings"]["nats"]["queue"] == subjects.PLACEMENT_CONSUMER
    submit = doc["operations"]["binder_receive_apiSubmit"]
    assert submit["reply"]["channel"]["$ref"] == "#/channels/apiSubmitReply"
    assert doc["channels"]["apiSubmitReply"]["address"] is None
    assert "cli_send_apiSubmit" in doc["operations"]


def test_payload_schemas_are_the_exported_json_schemas(doc: dict[str, Any]) -> None:
    """The same msgspec schemas as docs/schemas, with references into components."""
    comps = doc["components"]["schemas"]
    for name, schema in export().items():
        top = {k: v for k, v in schema.items() if k != "$defs"}
        if "$ref" in top:  # msgspec puts a struct itself under $defs
            top = schema["$defs"][name]
        text = json.dumps(top).replace("#/$defs/", "#/components/schemas/")
        assert json.loads(text) == comps[name], name


def test_encoded_messages_validate_against_their_payload_schemas(doc: dict[str, Any]) -> None:
    registry: Registry[Any] = Registry().with_resource(
        "urn:hami-bus", DRAFT202012.create_resource(doc)
    )

    def check(name: str, msg: msgspec.Struct) -> None:
        v = Draft202012Validator(
            {"$ref": f"urn:hami-bus#/components/schemas/{name}"}, registry=registry
        )
        v.validate(json.loads(msgspec.json.encode(msg)))

    grant = schemas.ContainerGrant(devices=[schemas.CardGrant(uuid="GPU-1", mem=1024, cores=30)])
    check(
        "AllocDecided", schemas.AllocDecided(uid="u", name="n", node="node-1", containers=[grant])
    )
    check("AllocReleased", schemas.AllocReleased(uid="u", node="node-1", reason="released"))
    check(
        "NodeLedger",
        schemas.NodeLedger(
            node="node-1", allocs={"u": schemas.LedgerAlloc(uid="u", name="n", containers=[grant])}
        ),
    )
    bad = json.loads(msgspec.json.encode(schemas.AllocBound(uid="u", name="n", node="x")))
    del bad["node"]
    with pytest.raises(ValidationError, match="'node' is a required property"):
        Draft202012Validator(
            {"$ref": "urn:hami-bus#/components/schemas/AllocBound"}, registry=registry
        ).validate(bad)


def test_retention_is_the_configured_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = asyncapi.document(BusSettings(stream_max_age=3600.0, stream_max_bytes=64 << 20))
    events = d["x-jetstream-streams"][subjects.EVENTS_STREAM]
    assert (events["maxAgeSeconds"], events["maxBytes"]) == (3600.0, 64 << 20)
    assert "kept 3600 s" in d["info"]["description"]
    cfg = tmp_path / "hami.yaml"
    cfg.write_text("bus: {streamMaxAge: 86400, streamMaxBytes: 268435456}\n")
    assert asyncapi.main(["--config", str(cfg)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    events = printed["x-jetstream-streams"][subjects.EVENTS_STREAM]
    assert (events["maxAgeSeconds"], events["maxBytes"]) == (86400.0, 268435456)
    default = yaml.safe_load(COMMITTED.read_text())["x-jetstream-streams"][subjects.EVENTS_STREAM]
    assert default["maxAgeSeconds"] == BusSettings().stream_max_age
