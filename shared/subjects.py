"""Every NATS subject, stream, consumer and KV bucket name, in one place.

Subjects go broad to narrow with the node or id last, so a subscriber filters with
wildcards: ``hami.evt.alloc.*.node-1`` is everything that happens on node-1.
"""

from __future__ import annotations

PREFIX = "hami"

# Durable stream of the allocation lifecycle and node events.
EVENTS_STREAM = "HAMI_EVENTS"
EVENTS_SUBJECTS = [f"{PREFIX}.evt.>"]

ALLOC_VERBS = ("requested", "decided", "failed", "bound", "bind_failed", "prepared", "released")
NODE_VERBS = ("registered", "updated", "unhealthy", "recovered", "removed")

# KV buckets.
NODES_BUCKET = "hami-nodes"  # key: node -> NodeInventory
LEDGER_BUCKET = "hami-ledger"  # key: node -> NodeLedger (compare-and-set only)
HEALTH_BUCKET = "hami-health"  # key: node -> NodeHealth
# key: namespace -> Quota, from its ResourceQuotas (written by the Kubernetes binder)
QUOTA_BUCKET = "hami-quotas"

# Durable consumer names (shared by replicas of one service: work-queue style).
PLACEMENT_CONSUMER = "placement"

# Request/reply endpoints (nats.micro services).
API_SERVICE = "hami-api"
API_SUBMIT = f"{PREFIX}.api.submit"
API_RELEASE = f"{PREFIX}.api.release"
API_STATUS = f"{PREFIX}.api.status"


def alloc(verb: str, node: str | None = None) -> str:
    """Subject of an allocation event; node-scoped verbs carry the node last."""
    if verb not in ALLOC_VERBS:
        raise ValueError(f"unknown allocation verb {verb!r}")
    base = f"{PREFIX}.evt.alloc.{verb}"
    return f"{base}.{token(node)}" if node else base


def alloc_any(verb: str) -> str:
    """Wildcard over one verb, with or without a node token."""
    return f"{PREFIX}.evt.alloc.{verb}.>"


def node_event(verb: str, node: str) -> str:
    if verb not in NODE_VERBS:
        raise ValueError(f"unknown node verb {verb!r}")
    return f"{PREFIX}.evt.node.{verb}.{token(node)}"


def heartbeat(node: str) -> str:
    return f"{PREFIX}.hb.{token(node)}"


HEARTBEAT_ALL = f"{PREFIX}.hb.*"


def telemetry(node: str) -> str:
    return f"{PREFIX}.tel.{token(node)}"


TELEMETRY_ALL = f"{PREFIX}.tel.*"


def token(name: str) -> str:
    """A node name as one subject token: dots and wildcards would split or widen it."""
    bad = set(".*> \t\r\n")
    if not name or any(ch in bad for ch in name):
        return "".join("_" if ch in bad else ch for ch in name) or "_"
    return name


def kv_key(name: str) -> str:
    """A KV key for a node name (KV keys allow [-/_=.a-zA-Z0-9])."""
    ok = set("-_=./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return "".join(ch if ch in ok else "_" for ch in name)
