"""Every NATS subject, stream, consumer and KV bucket name, in one place.

Subjects go broad to narrow with the node or id last, so a subscriber filters with
wildcards: ``hami.evt.alloc.*.node-1`` is everything that happens on node-1.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "hami"

# Durable stream of the allocation lifecycle and node events.
EVENTS_STREAM = "HAMI_EVENTS"
EVENTS_SUBJECTS = [f"{PREFIX}.evt.>"]

ALLOC_VERBS = (
    "requested", "decided", "failed", "bound", "bind_failed", "prepared", "released", "preempted",
)
NODE_VERBS = ("registered", "updated", "unhealthy", "recovered", "removed")

# KV buckets.
NODES_BUCKET = "hami-nodes"  # key: node -> NodeInventory
LEDGER_BUCKET = "hami-ledger"  # key: node -> NodeLedger (compare-and-set only)
HEALTH_BUCKET = "hami-health"  # key: node -> NodeHealth
# key: namespace -> Quota, from its ResourceQuotas (written by the Kubernetes binder)
QUOTA_BUCKET = "hami-quotas"
# key: queue name -> QueueSettings, from the Kubernetes Queue resources (written by the
# Kubernetes binder, read by placement; docs/queues.md)
QUEUES_BUCKET = "hami-queues"

# Durable consumer names (shared by replicas of one service: work-queue style).
PLACEMENT_CONSUMER = "placement"

# Request/reply endpoints (nats.micro services).
API_SERVICE = "hami-api"
API_SUBMIT = f"{PREFIX}.api.submit"
API_RELEASE = f"{PREFIX}.api.release"
API_STATUS = f"{PREFIX}.api.status"
API_WITHDRAW = f"{PREFIX}.api.withdraw"  # a client gave up on its submit
# Extender mode: a standby binder replica hands kube-scheduler's calls to the Lease holder.
EXTENDER_FILTER = f"{PREFIX}.binder.extender.filter"
EXTENDER_BIND = f"{PREFIX}.binder.extender.bind"
# Extender mode: the binder asks placement which pods to evict for a pod (preempt verb).
PLACEMENT_PREEMPT = f"{PREFIX}.placement.preempt"
# Consolidation (hami defrag --apply): re-place one movable allocation on given cards.
PLACEMENT_MOVE = f"{PREFIX}.placement.move"
# Consolidation in Kubernetes (hami defrag --apply): the binder holding the Lease evicts
# the planned pods and waits for their replacements (services/binder/defrag.py).
DEFRAG_APPLY = f"{PREFIX}.binder.defrag.apply"
# Each queue's guarantee, use, borrowed and pending (hami queues).
PLACEMENT_QUEUES = f"{PREFIX}.placement.queues"
# key: allocation uid -> RequestOutcome of a direct client's request (answered or
# withdrawn), with a TTL; written by the binder, read by placement.
OUTCOMES_BUCKET = "hami-outcomes"


# Dead letters: a message whose handling failed ``bus.maxDeliveries`` times is stored
# here, as it came, with headers naming the error, instead of being redelivered again.
# Outside ``hami.evt.>`` so followers of the event stream never see it; its own small
# stream keeps it for inspection (``nats stream view HAMI_DLQ``).
DLQ_STREAM = "HAMI_DLQ"
DLQ_SUBJECTS = [f"{PREFIX}.dlq.>"]
DLQ_ERROR = "Hami-Error"  # headers of a dead letter
DLQ_SUBJECT = "Hami-Subject"
DLQ_DELIVERIES = "Hami-Deliveries"
DLQ_STREAM_SEQ = "Hami-Stream-Seq"


def dlq(service: str) -> str:
    """The dead-letter subject of one service (``hami.dlq.placement``)."""
    return f"{PREFIX}.dlq.{token(service)}"


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


def agent_run(node: str) -> str:
    """A standalone node agent's endpoint for ``hami run``: a slice's environment, and
    the processes whose exit releases it."""
    return f"{PREFIX}.agent.{token(node)}.run"


AGENT_RUN_ALL = f"{PREFIX}.agent.*.run"


# Escaping: a name becomes a token or key by keeping its safe characters and writing
# every other UTF-8 byte, ``_`` included, as ``_XX`` (upper-case hex). Decoding is
# unambiguous (every ``_`` starts an escape), so different names never share a key, and
# ordinary names (DNS labels, ``sim-node-0``) come out unchanged. A result longer than
# the bound keeps a prefix and ends in ``_Z`` plus a hash of the whole name; ``_Z``
# cannot occur in an escaped name (``_`` is always followed by hex digits).
MAX_TOKEN = 256
MAX_KEY = 256
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_TOKEN_OK = frozenset(_ALNUM + "-=:@+~,")
_KEY_OK = frozenset(_ALNUM + "-=/.")
_HASH_HEX = 32
# The common case, kept as it is without a pass per character (keys are made per write).
_TOKEN_PLAIN = re.compile(rf"[-=:@+~,a-zA-Z0-9]{{1,{MAX_TOKEN}}}")
_KEY_PLAIN = re.compile(rf"(?=.{{1,{MAX_KEY}}}\Z)[-=/a-zA-Z0-9]+(?:\.[-=/a-zA-Z0-9]+)*", re.S)


def _escape(name: str, ok: frozenset[str], dots: bool) -> str:
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch in ok and not (
            # a KV key's dots separate tokens: none first, last, or doubled
            dots and ch == "." and (i == 0 or i == len(name) - 1 or name[i - 1] == ".")
        ):
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _bounded(escaped: str, name: str, limit: int) -> str:
    if len(escaped) <= limit:
        return escaped
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    prefix = escaped[: limit - _HASH_HEX - 2].rstrip(".")
    return f"{prefix}_Z{digest}"


def token(name: str) -> str:
    """A name as one subject token: injective, at most :data:`MAX_TOKEN` characters.

    Dots, wildcards and spaces would split or widen a subject, so they are escaped;
    the empty name is ``_`` (no escaped name is a lone ``_``).
    """
    if _TOKEN_PLAIN.fullmatch(name):
        return name
    if not name:
        return "_"
    return _bounded(_escape(name, _TOKEN_OK, dots=False), name, MAX_TOKEN)


def kv_key(name: str) -> str:
    """A KV key for a name (KV keys allow ``[-/_=.a-zA-Z0-9]``): injective, bounded.

    Dots are kept (a Kubernetes node name's key is its name) except where a key may
    not have them: first, last, or two in a row.
    """
    if _KEY_PLAIN.fullmatch(name):
        return name
    if not name:
        return "_"
    return _bounded(_escape(name, _KEY_OK, dots=True), name, MAX_KEY)


def unescape(text: str) -> str:
    """The name a :func:`token` or :func:`kv_key` was made from (not for hashed ones)."""
    if text == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "_":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in "0123456789ABCDEF" for c in pair):
                raise ValueError(f"{text!r} is not an escaped name (at {i})")
            raw.append(int(pair, 16))
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    return raw.decode("utf-8", "surrogatepass")
