"""The bus's contract for outside subscribers: an AsyncAPI 3.0 document, generated.

Everything in it comes from the code that runs the bus, so it cannot drift from it:
payload schemas from the msgspec structs of :mod:`shared.schemas` (the same ones
:mod:`shared.jsonschema` exports), addresses from :mod:`shared.subjects`, stream and
bucket settings from :mod:`shared.bus` and the configuration's ``bus`` section, and who
sends and who receives on each channel from the permissions :mod:`shared.auth` gives
each role (what the server lets a role do is what the document says it does). The one
thing the permissions cannot say, which subjects a durable work queue is filtered on,
is :data:`WORK_QUEUES`, pinned against the running services by a test.

``python -m shared.asyncapi > docs/asyncapi.yaml`` regenerates the committed copy (a
test fails when it is stale); ``--config FILE`` documents a deployment's own retention.
This module does no I/O of its own.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml

from shared import auth, outcomes, schemas, subjects
from shared.bus import DLQ_MAX_BYTES, DLQ_MAX_MSGS, DUPLICATE_WINDOW_S
from shared.config import BusSettings, QueueSettings

ASYNCAPI_VERSION = "3.0.0"
SCHEMA_REF = "#/components/schemas/{name}"

# The durable work queues of the event stream and their filter subjects (the services
# own these; shared cannot import a service, so they are repeated here and a test
# compares them with the consumers the running services create).
WORK_QUEUES: dict[str, tuple[str, ...]] = {
    subjects.PLACEMENT_CONSUMER: (
        subjects.alloc("requested"),
        subjects.alloc("released"),
        subjects.alloc_any("released"),
    ),
    auth.BINDER_CONSUMER: (subjects.alloc_any("decided"), subjects.alloc("failed")),
}
# Which role runs each work queue.
_QUEUE_ROLE = {subjects.PLACEMENT_CONSUMER: auth.PLACEMENT, auth.BINDER_CONSUMER: auth.BINDER}

# The roles whose operations are documented, with the concrete role and parameter
# values the permissions are checked with (admin may do anything and is left out).
_NODE = "node-1"
DOCUMENTED_ROLES: tuple[tuple[str, str], ...] = (
    ("placement", auth.PLACEMENT),
    ("binder", auth.BINDER),
    ("inventory", auth.INVENTORY),
    ("metrics", auth.METRICS),
    ("nodeagent", f"{auth.NODEAGENT}:{_NODE}"),
    ("cli", auth.CLI),
    ("reader", auth.READER),
)
_EXAMPLES = {"node": _NODE, "namespace": "team-a", "uid": "3f1c2a9e-uid", "verb": "registered",
             "queue": "research"}

# A token that subjects.* keeps as it is, replaced by the {parameter} afterwards: the
# addresses are made by the same functions the services publish with.
_SLOT = "PARAMSLOT"

# Which allocation verbs carry the node as their last token (released: both forms).
_ALLOC_NODE_FORMS: dict[str, tuple[bool, ...]] = {
    "requested": (False,),
    "decided": (True,),
    "failed": (False,),
    "bound": (True,),
    "bind_failed": (True,),
    "prepared": (True,),
    "released": (False, True),
    "preempted": (True,),
}

_NODE_PARAM = (
    "The node's name as one subject token (shared.subjects.token): letters, digits and "
    "-=:@+~, kept; every other byte, '_' included, written _XX; names longer than 256 "
    "characters end in _Z and a hash."
)
_KEY_PARAMS = {
    "node": "The node's name as a KV key (shared.subjects.kv_key): like a subject token, "
    "but dots are kept (a Kubernetes node name's key is its name).",
    "namespace": "The Kubernetes namespace, as a KV key (shared.subjects.kv_key).",
    "uid": "The allocation id (a pod UID, or the id a direct client chose), as a KV key.",
    "queue": "The queue's name (a Kubernetes Queue's metadata.name), as a KV key.",
}


@dataclass(frozen=True)
class Channel:
    """One subject (or KV key space) of the bus, as the document describes it."""

    id: str
    address: str | None  # with {parameters}; None: a reply inbox, known only at run time
    messages: tuple[str, ...]  # component message names
    description: str
    params: dict[str, str] = field(default_factory=dict)  # name -> description
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kind: str = "event"  # event | core | request | reply | kv | dlq
    reply: str = ""  # request channels: the id of their reply channel
    extensions: dict[str, Any] = field(default_factory=dict)

    def examples(self) -> list[str]:
        """The address filled with the example of each parameter, or each of its values."""
        out = [self.address or ""]
        for p in self.params:
            values = self.enums.get(p) or (_EXAMPLES.get(p, p),)
            out = [a.replace("{" + p + "}", v) for a in out for v in values]
        return out

    def example(self, **overrides: str) -> str:
        """The address with every parameter filled (what the permissions are checked on)."""
        assert self.address is not None
        out = self.address
        for p in self.params:
            out = out.replace("{" + p + "}", overrides.get(p, _EXAMPLES.get(p, p)))
        return out


def _addr(subject: str, param: str) -> str:
    return subject.replace(_SLOT, "{" + param + "}")


def _camel(*parts: str) -> str:
    words = [w for p in parts for w in p.replace("-", "_").split("_") if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def channels(settings: BusSettings | None = None) -> list[Channel]:
    """Every channel of the bus: events, core subjects, request/reply, KV, dead letters."""
    settings = settings or BusSettings()
    out: list[Channel] = []
    missing = set(subjects.ALLOC_VERBS) - set(_ALLOC_NODE_FORMS)
    if missing:  # a new verb must be placed here before the document can be made
        raise ValueError(f"allocation verbs without a channel: {sorted(missing)}")
    stream = {"x-jetstream": {"stream": subjects.EVENTS_STREAM}}
    for verb in subjects.ALLOC_VERBS:
        msg = _ALLOC_MESSAGES[verb]
        for on_node in _ALLOC_NODE_FORMS[verb]:
            if on_node:
                out.append(
                    Channel(
                        id=_camel("alloc", verb, "on_node")
                        if verb == "released"
                        else _camel("alloc", verb),
                        address=_addr(subjects.alloc(verb, _SLOT), "node"),
                        messages=(msg,),
                        description=_ALLOC_TEXT[verb]
                        + (" This form names the node it was on." if verb == "released" else ""),
                        params={"node": _NODE_PARAM},
                        extensions=stream,
                    )
                )
            else:
                out.append(
                    Channel(
                        id=_camel("alloc", verb),
                        address=subjects.alloc(verb),
                        messages=(msg,),
                        description=_ALLOC_TEXT[verb]
                        + (
                            " This form is for a request that was never "
                            "placed (withdrawn while pending)."
                            if verb == "released"
                            else ""
                        ),
                        extensions=stream,
                    )
                )
    node_addr = subjects.node_event(subjects.NODE_VERBS[0], _SLOT).replace(
        f".{subjects.NODE_VERBS[0]}.", ".{verb}."
    )
    out.append(
        Channel(
            id="nodeEvent",
            address=_addr(node_addr, "node"),
            messages=("NodeEvent",),
            description="A node's life as inventory sees it: registered (first inventory), updated, "
            "unhealthy (no heartbeat for unhealthyAfter seconds), recovered, removed.",
            params={"verb": "What happened to the node.", "node": _NODE_PARAM},
            enums={"verb": subjects.NODE_VERBS},
            extensions=stream,
        )
    )
    core = {"x-nats": {"delivery": "core NATS, at most once, not stored"}}
    out.append(
        Channel(
            id="heartbeat",
            address=_addr(subjects.heartbeat(_SLOT), "node"),
            messages=("Heartbeat",),
            description="A node agent is alive (every heartbeatInterval seconds); inventory "
            "judges health from these.",
            params={"node": _NODE_PARAM},
            kind="core",
            extensions=core,
        )
    )
    out.append(
        Channel(
            id="telemetry",
            address=_addr(subjects.telemetry(_SLOT), "node"),
            messages=("Telemetry",),
            description="A node's measured use per card and per container (the node-side metrics).",
            params={"node": _NODE_PARAM},
            kind="core",
            extensions=core,
        )
    )
    for subject, request, replies, text in _API:
        cid = _camel("api", subject.rsplit(".", 1)[-1])
        out.append(
            Channel(
                id=cid,
                address=subject,
                messages=(request,),
                description=text,
                kind="request",
                reply=f"{cid}Reply",
                extensions={
                    "x-nats": {
                        "service": "nats.micro (also answers $SRV.PING, $SRV.INFO, $SRV.STATS)",
                        "concurrency": "bus.apiConcurrency requests at once per "
                        "endpoint and replica, then an immediate ErrorReply busy",
                    }
                },
            )
        )
        out.append(
            Channel(
                id=f"{cid}Reply",
                address=None,
                messages=replies,
                kind="reply",
                description=f"The answer to {subject}, on the requester's own inbox "
                "(_INBOX.<identity>.> with auth on).",
            )
        )
    out.append(
        Channel(
            id="agentRun",
            address=_addr(subjects.agent_run(_SLOT), "node"),
            messages=("RunRequest",),
            description="hami run asks a standalone node agent for its slice's environment and "
            "hands it the processes holding the slice; when none is alive the agent withdraws it.",
            params={"node": _NODE_PARAM},
            kind="request",
            reply="agentRunReply",
        )
    )
    out.append(
        Channel(
            id="agentRunReply",
            address=None,
            messages=("RunReply",),
            kind="reply",
            description="The node agent's answer to hami.agent.<node>.run, on the requester's inbox.",
        )
    )
    for subject, text in (
        (
            subjects.EXTENDER_FILTER,
            "Extender mode, between binder replicas: a standby hands "
            "kube-scheduler's filter call (its ExtenderArgs, as sent) to the Lease holder.",
        ),
        (
            subjects.EXTENDER_BIND,
            "Extender mode, between binder replicas: a standby hands "
            "kube-scheduler's bind call (its ExtenderBindingArgs, as sent) to the Lease holder.",
        ),
    ):
        cid = _camel("extender", subject.rsplit(".", 1)[-1])
        out.append(
            Channel(
                id=cid,
                address=subject,
                messages=("ExtenderCall",),
                description=text,
                kind="request",
                reply=f"{cid}Reply",
            )
        )
        out.append(
            Channel(
                id=f"{cid}Reply",
                address=None,
                messages=("ExtenderAnswer",),
                kind="reply",
                description=f"The Lease holder's answer to {subject}.",
            )
        )
    dlq_services = tuple(r for r in auth.SERVICE_ROLES if auth.may_publish(r, subjects.dlq(r)))
    out.append(
        Channel(
            id="deadLetter",
            address=_addr(subjects.dlq(_SLOT), "service"),
            messages=("DeadLetter",),
            description=f"A message whose handler failed bus.maxDeliveries ({settings.max_deliveries}) "
            "times, stored as it came with headers naming the error; its client is told. Outside "
            f"hami.evt.> so followers of {subjects.EVENTS_STREAM} never see it "
            f"(nats stream view {subjects.DLQ_STREAM}).",
            params={"service": "The service whose handler gave up."},
            enums={"service": dlq_services},
            kind="dlq",
            extensions={"x-jetstream": {"stream": subjects.DLQ_STREAM}},
        )
    )
    for bucket, param, msg, text in _KV:
        out.append(
            Channel(
                id=_camel("kv", bucket.removeprefix("hami-")),
                address=f"$KV.{bucket}.{{{param}}}",
                messages=(msg,),
                description=text.format(
                    max_wait=settings.max_wait, ttl=outcomes.ttl(settings.max_wait)
                ),
                params={param: _KEY_PARAMS[param]},
                kind="kv",
                extensions={
                    "x-kv": {
                        "bucket": bucket,
                        "stream": auth.kv_stream(bucket),
                        "history": 1,
                        "read": f"nats kv get {bucket} <key> / nats kv watch {bucket}",
                    }
                },
            )
        )
    return out


_ALLOC_MESSAGES = {
    "requested": "AllocRequested",
    "decided": "AllocDecided",
    "failed": "AllocFailed",
    "bound": "AllocBound",
    "bind_failed": "AllocBindFailed",
    "prepared": "AllocPrepared",
    "released": "AllocReleased",
    "preempted": "AllocPreempted",
}
_ALLOC_TEXT = {
    "requested": "A slice was asked for (a pod, or a direct client's submit); placement takes it.",
    "decided": "Placement put a request on a node and its cards; the ledger already holds it.",
    "failed": "Placement could not place a request; the reasons are HAMi's, with node counts. "
    "A pending request stays queued and may be decided later.",
    "bound": "The binder bound the allocation to its node (Kubernetes: the pod's Binding).",
    "bind_failed": "The binder could not bind a decided allocation; it is released.",
    "prepared": "The node agent made the slice ready on its node (device plugin Allocate, or the "
    "standalone slice directory).",
    "released": "The slice was given back; its reservation is gone from the ledger.",
    "preempted": "Placement released the slice (its ``released`` says reason preempted) to make "
    "room for a request of higher priority, which it names.",
}
_API: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        subjects.API_SUBMIT,
        "SubmitRequest",
        ("SubmitReply", "ErrorReply"),
        "A direct client asks for a slice (hami submit) and waits for the decision.",
    ),
    (
        subjects.API_RELEASE,
        "ReleaseRequest",
        ("ReleaseReply", "ErrorReply"),
        "A direct client gives a slice back (hami release).",
    ),
    (
        subjects.API_WITHDRAW,
        "WithdrawRequest",
        ("WithdrawReply", "ErrorReply"),
        "A direct client gave up on a submit: it is never placed, or released if it was.",
    ),
    (
        subjects.PLACEMENT_PREEMPT,
        "PreemptRequest",
        ("PreemptReply", "ErrorReply"),
        "The Kubernetes binder (the extender's preempt verb) asks placement which pods to evict "
        "on each offered node so that a pod's slice fits there.",
    ),
    (
        subjects.API_STATUS,
        "StatusRequest",
        ("ClusterStatus", "ErrorReply"),
        "Cards, allocations and pending requests (hami status / list).",
    ),
    (
        subjects.PLACEMENT_QUEUES,
        "QueuesRequest",
        ("QueuesReply", "ErrorReply"),
        "Each queue's guarantee, use, borrowed share and pending requests (hami queues, "
        "and the metrics service's page and series).",
    ),
    (
        subjects.PLACEMENT_MOVE,
        "MoveRequest",
        ("MoveReply", "ErrorReply"),
        "Consolidation (hami defrag --apply) re-places one movable allocation on the cards named.",
    ),
    (
        subjects.DEFRAG_APPLY,
        "DefragApplyRequest",
        ("DefragApplyReply", "ErrorReply"),
        "Consolidation in Kubernetes (hami defrag --apply): the binder holding the Lease evicts "
        "the planned movable pods in order and waits for each replacement to be placed.",
    ),
)
_KV: tuple[tuple[str, str, str, str], ...] = (
    (
        subjects.NODES_BUCKET,
        "node",
        "NodeInventory",
        "What a node offers, written by its own node agent.",
    ),
    (
        subjects.LEDGER_BUCKET,
        "node",
        "NodeLedger",
        "The reservations on a node: who holds what. Written only by placement, by compare-and-set "
        "(header Nats-Expected-Last-Subject-Sequence), so two decisions never book the same "
        "capacity. Watch it for the current holdings; the events tell how they came about.",
    ),
    (subjects.HEALTH_BUCKET, "node", "NodeHealth", "Inventory's verdict on each node."),
    (
        subjects.QUOTA_BUCKET,
        "namespace",
        "Quota",
        "A namespace's HAMi quota, from its ResourceQuotas (written by the Kubernetes binder).",
    ),
    (
        subjects.QUEUES_BUCKET,
        "queue",
        "QueueSettings",
        "A queue of the Kubernetes Queue resources (hami.io/v1alpha1), for placement's fair "
        "share (written by the Kubernetes binder).",
    ),
    (
        subjects.OUTCOMES_BUCKET,
        "uid",
        "RequestOutcome",
        "What became of a direct client's request (answered, withdrawn or released), first writer wins; "
        "entries expire after {ttl:g} s (bus.maxWait {max_wait:g} s plus a margin).",
    ),
)

# Message name -> (payload struct or None for a free-form payload, headers schema name).
_MESSAGES: dict[str, tuple[type[msgspec.Struct] | None, str]] = {
    **{name: (getattr(schemas, name), "EventHeaders") for name in _ALLOC_MESSAGES.values()},
    "NodeEvent": (schemas.NodeEvent, "EventHeaders"),
    "Heartbeat": (schemas.Heartbeat, "CoreHeaders"),
    "Telemetry": (schemas.Telemetry, "CoreHeaders"),
    "SubmitRequest": (schemas.SubmitRequest, "CoreHeaders"),
    "SubmitReply": (schemas.SubmitReply, ""),
    "ReleaseRequest": (schemas.ReleaseRequest, "CoreHeaders"),
    "ReleaseReply": (schemas.ReleaseReply, ""),
    "WithdrawRequest": (schemas.WithdrawRequest, "CoreHeaders"),
    "WithdrawReply": (schemas.WithdrawReply, ""),
    "PreemptRequest": (schemas.PreemptRequest, "CoreHeaders"),
    "PreemptReply": (schemas.PreemptReply, ""),
    "MoveRequest": (schemas.MoveRequest, "CoreHeaders"),
    "MoveReply": (schemas.MoveReply, ""),
    "DefragApplyRequest": (schemas.DefragApplyRequest, "CoreHeaders"),
    "DefragApplyReply": (schemas.DefragApplyReply, ""),
    "StatusRequest": (schemas.StatusRequest, "CoreHeaders"),
    "ClusterStatus": (schemas.ClusterStatus, ""),
    "ErrorReply": (schemas.ErrorReply, ""),
    "RunRequest": (schemas.RunRequest, "CoreHeaders"),
    "RunReply": (schemas.RunReply, ""),
    "NodeInventory": (schemas.NodeInventory, "KvHeaders"),
    "NodeLedger": (schemas.NodeLedger, "KvHeaders"),
    "NodeHealth": (schemas.NodeHealth, "KvHeaders"),
    "Quota": (schemas.Quota, "KvHeaders"),
    "RequestOutcome": (schemas.RequestOutcome, "KvHeaders"),
    "QueueSettings": (QueueSettings, "KvHeaders"),
    "QueuesRequest": (schemas.QueuesRequest, "CoreHeaders"),
    "QueuesReply": (schemas.QueuesReply, ""),
    "DeadLetter": (None, "DeadLetterHeaders"),
    "ExtenderCall": (None, "CoreHeaders"),
    "ExtenderAnswer": (None, "ExtenderAnswerHeaders"),
}
_FREE_FORM = {
    "DeadLetter": "The original message's bytes, exactly as they came.",
    "ExtenderCall": "kube-scheduler's extender call body (Kubernetes JSON), forwarded as it came.",
    "ExtenderAnswer": "The extender's answer (ExtenderFilterResult or ExtenderBindingResult JSON).",
}

_TRACEPARENT = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    "description": "W3C trace context of the span that sent it (absent when tracing is off).",
}
_TRACESTATE = {"type": "string", "description": "W3C tracestate, when the trace has one."}


def _headers() -> dict[str, dict[str, Any]]:
    trace = {"traceparent": _TRACEPARENT, "tracestate": _TRACESTATE}
    return {
        "EventHeaders": {
            "type": "object",
            "description": "Headers of every stored event.",
            "properties": {
                "Nats-Msg-Id": {
                    "type": "string",
                    "description": "The event's id (e.g. requested:<uid>): the stream stores one "
                    f"message per id within {DUPLICATE_WINDOW_S:g} s, so a retried publish is "
                    "not stored twice. Also a subscriber's key for deduplication.",
                },
                **trace,
            },
            "required": ["Nats-Msg-Id"],
        },
        "CoreHeaders": {"type": "object", "properties": dict(trace)},
        "KvHeaders": {
            "type": "object",
            "description": "What a KV watcher sees besides the value.",
            "properties": {
                "KV-Operation": {
                    "type": "string",
                    "enum": ["DEL", "PURGE"],
                    "description": "Set on a delete or purge (the value is empty).",
                },
                "Nats-Expected-Last-Subject-Sequence": {
                    "type": "string",
                    "description": "A compare-and-set write: stored only if the key is still "
                    "at this revision.",
                },
            },
        },
        "DeadLetterHeaders": {
            "type": "object",
            "properties": {
                subjects.DLQ_ERROR: {"type": "string", "description": "Why the handler failed."},
                subjects.DLQ_SUBJECT: {"type": "string", "description": "The subject it came on."},
                subjects.DLQ_DELIVERIES: {
                    "type": "string",
                    "description": "How often it was delivered.",
                },
                subjects.DLQ_STREAM_SEQ: {
                    "type": "string",
                    "description": "Its sequence in the stream it came from.",
                },
                "Nats-Msg-Id": {
                    "type": "string",
                    "description": "dlq:<service>:<stream>:<seq>: stored once per message.",
                },
                **trace,
            },
            "required": [subjects.DLQ_ERROR, subjects.DLQ_SUBJECT],
        },
        "ExtenderAnswerHeaders": {
            "type": "object",
            "properties": {
                "Hami-Http-Status": {
                    "type": "string",
                    "description": "The HTTP status to answer with.",
                }
            },
        },
    }


# ------------------------------------------------------------------ who does what


@dataclass(frozen=True)
class Operation:
    role: str  # the documented name (nodeagent, not nodeagent:<node>)
    action: str  # send | receive
    channel: Channel
    how: str
    queue: str = ""


def operations(chans: list[Channel]) -> list[Operation]:
    """Who sends and who receives on each channel, as the server's permissions allow."""
    out: list[Operation] = []
    for name, role in DOCUMENTED_ROLES:
        for ch in chans:
            if ch.kind == "reply":
                continue
            if ch.kind == "kv":
                bucket = ch.extensions["x-kv"]["bucket"]
                (param,) = ch.params
                key = subjects.kv_key(_EXAMPLES[param])
                if auth.may_publish(role, f"$KV.{bucket}.{key}"):
                    out.append(Operation(name, "send", ch, "KV put"))
                if auth.may_publish(
                    role, f"$JS.API.DIRECT.GET.{auth.kv_stream(bucket)}.$KV.{bucket}.{key}"
                ):
                    out.append(Operation(name, "receive", ch, "KV get and watch"))
                continue
            if ch.kind == "dlq":
                if role in ch.enums["service"] and auth.may_publish(role, ch.example(service=role)):
                    out.append(Operation(name, "send", ch, "JetStream publish"))
                continue
            subject = ch.example()
            if auth.may_publish(role, subject):
                how = {
                    "event": "JetStream publish (acknowledged, Nats-Msg-Id)",
                    "core": "core publish",
                    "request": "request",
                }[ch.kind]
                out.append(Operation(name, "send", ch, how))
            queues = [
                q
                for q, filters in WORK_QUEUES.items()
                if _QUEUE_ROLE[q] == role
                and any(auth.subject_matches(f, subject) for f in filters)
                and auth.may_publish(role, f"$JS.ACK.{subjects.EVENTS_STREAM}.{q}.1.1.1.1.1")
            ]
            if queues:
                out.append(
                    Operation(
                        name,
                        "receive",
                        ch,
                        f"durable consumer {queues[0]} (work "
                        "queue: each message to one replica, explicit ack)",
                        queue=queues[0],
                    )
                )
            elif auth.may_subscribe(role, subject):
                how = {
                    "event": "subscription or JetStream consumer",
                    "core": "subscription",
                    "request": "serves it",
                }[ch.kind]
                out.append(Operation(name, "receive", ch, how))
    return out


def undocumented(chans: list[Channel] | None = None) -> list[str]:
    """Subjects and buckets some role may use that no channel describes (should be none:
    a test fails on any, so a subject added to the permissions is added here too)."""
    chans = chans if chans is not None else channels()
    examples = [ex for ch in chans if ch.address is not None for ex in ch.examples()]
    buckets = {ch.extensions["x-kv"]["bucket"] for ch in chans if ch.kind == "kv"}
    plumbing = ("$JS.", "_INBOX.", "$SRV.", "_HAMI.")
    out: list[str] = []
    for _, role in DOCUMENTED_ROLES:
        perms = auth.permissions(role)
        for pattern in (*perms.pub_allow, *perms.sub_allow):
            for part in pattern.split("."):
                if part.startswith("KV_") and part[3:] not in buckets:
                    out.append(f"{role}: bucket {part[3:]} ({pattern})")
            if pattern.startswith("$KV."):
                if pattern.split(".")[1] not in buckets:
                    out.append(f"{role}: {pattern}")
            elif not pattern.startswith(plumbing) and not any(
                auth.subject_matches(pattern, e) for e in examples
            ):
                out.append(f"{role}: {pattern}")
    return sorted(set(out))


# ------------------------------------------------------------------ the document


def _description(settings: BusSettings) -> str:
    days = settings.stream_max_age / 86400
    sections = {
        "": [
            "The bus of hami-bus: HAMi's GPU sharing as services on NATS. Every channel, payload "
            "and operation here is generated from the code (python -m shared.asyncapi), and the "
            "operations are the permissions the server enforces for each role.",
        ],
        "Versioning": [
            "Every payload is JSON. Each top-level record carries `v`, the schema version it was "
            f"written with (now {schemas.SCHEMA_VERSION}); events also carry a `kind` tag. Schemas "
            "evolve only by appending fields that have defaults: a consumer MUST ignore fields it "
            "does not know and MUST NOT reject a higher `v`, and reads a missing field as its "
            "default. A change that cannot be made that way gets a new subject or a new `kind`, "
            "never a new meaning for an old field.",
        ],
        "Retention and replay": [
            f"Events are stored in the JetStream stream {subjects.EVENTS_STREAM} (subjects "
            f"{', '.join(subjects.EVENTS_SUBJECTS)}): limits retention, file storage, each event "
            f"kept {settings.stream_max_age:g} s ({days:g} days; setting bus.streamMaxAge) and at "
            f"most {settings.stream_max_bytes} bytes in all (bus.streamMaxBytes), the oldest "
            "dropped first. A subscriber can replay from the first event still stored; a durable "
            "consumer that was away longer than that misses what aged out (the stream sequence of "
            "its next message jumps). Heartbeats, telemetry and request/reply are core NATS, not "
            "stored. KV buckets keep the latest value of each key (history 1).",
        ],
        "Delivery": [
            f"Events are published with Nats-Msg-Id (stored once per id within "
            f"{DUPLICATE_WINDOW_S:g} s) and the W3C traceparent of the sending span. A JetStream "
            "consumer with explicit acknowledgement gets each event at least once: deduplicate on "
            "the stream sequence (or Nats-Msg-Id) to act on each once.",
        ],
        "Security": [
            "With auth on (hami up's default, auth.enabled in the chart) every client is an nkey "
            "identity with one role's permissions and talks TLS against the installation's CA; a "
            "client's inboxes are _INBOX.<identity>.>. An outside subscriber uses the read-only "
            "`reader` identity (hami creds reader): it may read the event stream and keep durable "
            "consumers of its own, and write nothing else.",
        ],
    }
    out: list[str] = []
    for title, paras in sections.items():
        if title:
            out.append(f"## {title}")
        out += [textwrap.fill(p, width=88) for p in paras]
    return "\n\n".join(out) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line text, and no YAML aliases (a shared mapping is written
    out each time: AsyncAPI tools do not all read anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def document(settings: BusSettings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the bus, as a mapping."""
    settings = settings or BusSettings()
    chans = channels(settings)
    structs = [t for t, _ in _MESSAGES.values() if t is not None]
    _, components = msgspec.json.schema_components(structs, ref_template=SCHEMA_REF)
    schemas_out: dict[str, Any] = dict(sorted(components.items()))
    schemas_out.update(_headers())

    messages: dict[str, Any] = {}
    for name, (typ, headers) in _MESSAGES.items():
        m: dict[str, Any] = {"name": name, "title": name, "contentType": "application/json"}
        if typ is not None:
            doc = (typ.__doc__ or "").strip()
            if doc:
                m["summary"] = " ".join(doc.split())
            m["payload"] = {"$ref": SCHEMA_REF.format(name=typ.__name__)}
        else:
            m["summary"] = _FREE_FORM[name]
            m["payload"] = {"description": _FREE_FORM[name]}
        if headers:
            m["headers"] = {"$ref": SCHEMA_REF.format(name=headers)}
        messages[name] = m

    chan_out: dict[str, Any] = {}
    for ch in chans:
        c: dict[str, Any] = {"address": ch.address, "description": ch.description}
        c["messages"] = {m: {"$ref": f"#/components/messages/{m}"} for m in ch.messages}
        if ch.params:
            c["parameters"] = {}
            for p, text in ch.params.items():
                par: dict[str, Any] = {"description": text}
                if p in ch.enums:
                    par["enum"] = list(ch.enums[p])
                else:
                    par["examples"] = [_EXAMPLES.get(p, p)]
                c["parameters"][p] = par
        c.update(ch.extensions)
        chan_out[ch.id] = c

    by_id = {ch.id: ch for ch in chans}
    ops: dict[str, Any] = {}
    for op in operations(chans):
        ch = op.channel
        o: dict[str, Any] = {
            "action": op.action,
            "channel": {"$ref": f"#/channels/{ch.id}"},
            "summary": f"{op.role} {'sends' if op.action == 'send' else 'receives'}: {op.how}",
            "tags": [{"name": op.role}],
            "messages": [{"$ref": f"#/channels/{ch.id}/messages/{m}"} for m in ch.messages],
        }
        if ch.reply:  # request/reply: both the asker and the server name the answer
            reply = by_id[ch.reply]
            o["reply"] = {
                "channel": {"$ref": f"#/channels/{reply.id}"},
                "messages": [
                    {"$ref": f"#/channels/{reply.id}/messages/{m}"} for m in reply.messages
                ],
            }
        if op.queue:
            o["bindings"] = {"nats": {"queue": op.queue, "bindingVersion": "0.1.0"}}
        ops[f"{op.role}_{op.action}_{ch.id}"] = o

    streams = {
        subjects.EVENTS_STREAM: {
            "subjects": list(subjects.EVENTS_SUBJECTS),
            "retention": "limits",
            "storage": "file",
            "maxAgeSeconds": settings.stream_max_age,
            "maxAgeSetting": "bus.streamMaxAge",
            "maxBytes": settings.stream_max_bytes,
            "maxBytesSetting": "bus.streamMaxBytes",
            "duplicateWindowSeconds": DUPLICATE_WINDOW_S,
        },
        subjects.DLQ_STREAM: {
            "subjects": list(subjects.DLQ_SUBJECTS),
            "retention": "limits",
            "storage": "file",
            "maxAgeSeconds": settings.stream_max_age,
            "maxAgeSetting": "bus.streamMaxAge",
            "maxBytes": min(DLQ_MAX_BYTES, settings.stream_max_bytes),
            "maxMessages": DLQ_MAX_MSGS,
            "duplicateWindowSeconds": DUPLICATE_WINDOW_S,
        },
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "hami-bus",
            "version": str(schemas.SCHEMA_VERSION),
            "description": _description(settings),
            "license": {"name": "Apache-2.0"},
            "tags": [
                {"name": name, "description": f"role {role}"} for name, role in DOCUMENTED_ROLES
            ],
        },
        "defaultContentType": "application/json",
        "servers": {
            "plain": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "A bus without auth (hami up --no-auth, the chart without "
                "auth.enabled): anyone on the port may do anything.",
            },
            "secured": {
                "host": "{host}:{port}",
                "protocol": "nats",
                "description": "A bus with auth on: TLS against the installation's CA "
                "(ca.crt; the nats:// URL upgrades to TLS as the server requires), an nkey "
                "identity per role, and _INBOX.<identity> as the client's inbox prefix.",
                "variables": {
                    "host": {
                        "default": "127.0.0.1",
                        "description": "hami up: 127.0.0.1; the "
                        "chart: <release>-hami-bus-nats.<namespace>.svc",
                    },
                    "port": {"default": "4222"},
                },
                "security": [{"$ref": "#/components/securitySchemes/nkey"}],
            },
        },
        "channels": chan_out,
        "operations": ops,
        "components": {
            "schemas": schemas_out,
            "messages": messages,
            "securitySchemes": {
                "nkey": {
                    "type": "asymmetricEncryption",
                    "description": "NATS nkey: an Ed25519 key pair; the server holds the public "
                    "key and the client signs its nonce with the seed (hami creds ROLE prints "
                    "one; nats --nkey FILE). Each role's permissions are shared/auth.py's.",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": "A TLS client certificate, where a server asks for one "
                    "(Credentials.tls_cert); hami's own servers need only the nkey.",
                },
            },
        },
        "x-jetstream-streams": streams,
    }


def render(settings: BusSettings | None = None) -> str:
    """The document as YAML (what docs/asyncapi.yaml holds)."""
    head = "# Generated by `python -m shared.asyncapi > docs/asyncapi.yaml`; do not edit.\n"
    return head + yaml.dump(
        document(settings), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m shared.asyncapi", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--config", help="document this configuration's retention (default: the defaults)"
    )
    args = p.parse_args(argv)
    settings = None
    if args.config:
        from shared.config import load

        settings = load(args.config, env={}).bus
    sys.stdout.write(render(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
