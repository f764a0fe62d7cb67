"""Who may do what on the bus: per-role NATS permissions and the server's configuration.

Every client authenticates with an nkey (an Ed25519 key pair: the server keeps only the
public key, the client signs the server's nonce with its seed) and gets the publish and
subscribe permissions of its *role*, computed here from the names in
:mod:`shared.subjects`. The server, not our code, refuses what a role may not do.

Roles: ``admin`` (everything), ``placement``, ``binder``, ``inventory``, ``metrics``,
``nodeagent:<node>`` (its own node's heartbeat, telemetry and inventory key only),
``cli`` (the request/reply API) and ``reader`` (a read-only follower of the event stream).

What the permissions are built from, checked against nats-py's own subjects:

- a JetStream publish is a core publish to the stream's subject, acknowledged by the
  server on the client's inbox; a KV put is a publish to ``$KV.<bucket>.<key>``;
- a KV get of a bucket with direct gets is ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``;
- a KV watch is an ordered push consumer: ``$JS.API.CONSUMER.CREATE.KV_<bucket>`` (nats-py
  names no consumer, so the filter is not in the subject), ``CONSUMER.INFO``, and flow
  control answers to ``$JS.FC.<stream>.>``;
- a durable push consumer bound to a queue group: ``CONSUMER.DURABLE.CREATE`` /
  ``CONSUMER.INFO`` for its exact name, acknowledgements to ``$JS.ACK.<stream>.<name>.>``;
- ``nats.micro`` services subscribe ``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` and
  ``$SRV.<VERB>.<name>.<id>`` and answer on the requester's inbox (``allow_responses``);
- every client's inboxes live under its own prefix ``_INBOX.<identity>`` (nats-py's
  ``inbox_prefix``), so no one reads another identity's replies.

Streams and buckets: a role may create (and look up) the exact ones it uses, which is
how services bring them back when they disappear; creating cannot change one that exists.
Updating a configuration belongs to the one owner of each; deleting or purging a stream
or bucket, and deleting a consumer, only to ``admin``.

This module is pure (no I/O): the nkey helpers return strings; the certificates come
from :mod:`shared.pki`; :mod:`hami.creds` writes both to files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared import subjects

ADMIN = "admin"
PLACEMENT = "placement"
BINDER = "binder"
INVENTORY = "inventory"
METRICS = "metrics"
CLI = "cli"
READER = "reader"
NODEAGENT = "nodeagent"
SERVICE_ROLES = (PLACEMENT, BINDER, INVENTORY, METRICS)
FIXED_ROLES = (ADMIN, *SERVICE_ROLES, CLI, READER)

EVENTS = subjects.EVENTS_STREAM
API = "$JS.API"
# What no one but admin may do, denied explicitly (a deny wins over any allow).
ADMIN_ONLY = (
    f"{API}.STREAM.DELETE.>",
    f"{API}.STREAM.PURGE.>",
    f"{API}.STREAM.MSG.DELETE.>",
    f"{API}.CONSUMER.DELETE.>",
    f"{API}.ACCOUNT.PURGE.>",
    f"{API}.SERVER.>",
    f"{API}.META.>",
)


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


@dataclass(frozen=True)
class Permissions:
    """One identity's NATS permissions, in nats-server's terms."""

    pub_allow: tuple[str, ...]
    sub_allow: tuple[str, ...]
    pub_deny: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    # What the bus layer may set up at start (and recreate): streams by name, and which
    # of those it may also update (the owner's privilege).
    creates: frozenset[str] = field(default_factory=frozenset)
    updates: frozenset[str] = field(default_factory=frozenset)

    def as_config(self) -> dict[str, object]:
        pub: dict[str, object] = {"allow": list(self.pub_allow)}
        if self.pub_deny:
            pub["deny"] = list(self.pub_deny)
        sub: dict[str, object] = {"allow": list(self.sub_allow)}
        if self.sub_deny:
            sub["deny"] = list(self.sub_deny)
        out: dict[str, object] = {"publish": pub, "subscribe": sub}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


def parse_role(role: str) -> tuple[str, str | None]:
    """``nodeagent:<node>`` -> (nodeagent, node); a fixed role -> (role, None)."""
    kind, sep, node = role.partition(":")
    if kind == NODEAGENT:
        if not sep or not node:
            raise ValueError("a node agent's role names its node: nodeagent:<node>")
        return kind, node
    if sep or kind not in FIXED_ROLES:
        raise ValueError(
            f"unknown role {role!r}: one of {', '.join(FIXED_ROLES)} or nodeagent:<node>"
        )
    return kind, None


def identity(role: str) -> str:
    """The role as one subject token (its inbox prefix's last token)."""
    return subjects.token(role)


def inbox_prefix(role: str) -> str:
    return f"_INBOX.{identity(role)}"


class _Builder:
    def __init__(self, role: str) -> None:
        self.pub: list[str] = []
        self.sub: list[str] = [f"{inbox_prefix(role)}.>"]
        self.creates: set[str] = set()
        self.updates: set[str] = set()
        self.responds = False
        self.deny: list[str] = []  # beyond ADMIN_ONLY

    def stream(self, name: str, *, owner: bool = False) -> None:
        self.creates.add(name)
        self.pub += [f"{API}.STREAM.CREATE.{name}", f"{API}.STREAM.INFO.{name}"]
        if owner:
            self.updates.add(name)
            self.pub.append(f"{API}.STREAM.UPDATE.{name}")

    def bucket(self, bucket: str, *, owner: bool = False) -> None:
        self.stream(kv_stream(bucket), owner=owner)

    def kv_read(self, bucket: str, key: str = ">") -> None:
        """Get and watch ``key`` (one key, or ``>`` for the whole bucket: a key may hold
        dots, as Kubernetes node names do, and then spans several tokens)."""
        s = kv_stream(bucket)
        self.pub += [
            f"{API}.DIRECT.GET.{s}.$KV.{bucket}.{key}",
            # nats-py's watch names no consumer: the filter is in the body, not here.
            f"{API}.CONSUMER.CREATE.{s}",
            f"{API}.CONSUMER.CREATE.{s}.*.$KV.{bucket}.{key}",
            f"{API}.CONSUMER.INFO.{s}.*",
            f"$JS.FC.{s}.>",
        ]

    def kv_write(self, bucket: str, key: str = ">") -> None:
        # A create (compare-and-set from nothing) reads the key first when a tombstone
        # is in the way: writers read what they write.
        self.kv_read(bucket, key)
        self.pub.append(f"$KV.{bucket}.{key}")

    def durable(self, name: str, stream: str = EVENTS) -> None:
        """A durable push consumer of ``stream`` bound to the queue group ``name``."""
        self.pub += [
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
            f"{API}.CONSUMER.CREATE.{stream}.{name}",
            f"{API}.CONSUMER.CREATE.{stream}.{name}.>",
            f"{API}.CONSUMER.INFO.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>",
        ]
        self.sub.append(f"_HAMI.deliver.{name}")

    def service(self, name: str, endpoints: Iterable[str]) -> None:
        """A ``nats.micro`` service: its endpoints, its ``$SRV`` verbs, its answers."""
        self.responds = True
        self.sub += list(endpoints)
        for verb in ("PING", "INFO", "STATS"):
            self.sub += [f"$SRV.{verb}", f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.*"]

    def build(self) -> Permissions:
        return Permissions(
            pub_allow=tuple(dict.fromkeys(self.pub)),
            sub_allow=tuple(dict.fromkeys(self.sub)),
            pub_deny=ADMIN_ONLY + tuple(self.deny),
            allow_responses=self.responds,
            creates=frozenset(self.creates),
            updates=frozenset(self.updates),
        )


def permissions(role: str) -> Permissions:
    """The least privilege each role needs for what its service does on the bus."""
    kind, node = parse_role(role)
    evt = f"{subjects.PREFIX}.evt"
    if kind == ADMIN:
        every = frozenset([EVENTS, subjects.DLQ_STREAM, *(kv_stream(b) for b in _BUCKETS)])
        return Permissions(pub_allow=(">",), sub_allow=(">",), allow_responses=True,
                           creates=every, updates=every)
    b = _Builder(role)
    if kind == PLACEMENT:
        b.stream(EVENTS, owner=True)
        b.bucket(subjects.LEDGER_BUCKET, owner=True)
        for bucket in (subjects.NODES_BUCKET, subjects.HEALTH_BUCKET, subjects.QUOTA_BUCKET,
                       subjects.QUEUES_BUCKET):
            b.bucket(bucket)
            b.kv_read(bucket)
        b.kv_write(subjects.LEDGER_BUCKET)
        # Follows the withdrawals of direct clients' requests (shared.outcomes).
        b.bucket(subjects.OUTCOMES_BUCKET)
        b.kv_read(subjects.OUTCOMES_BUCKET)
        b.pub += [subjects.alloc_any("decided"), subjects.alloc("failed")]
        # Preemption (scheduler.preemption): the victims' release and who took the room.
        b.pub += [subjects.alloc_any("released"), subjects.alloc_any("preempted")]
        b.stream(subjects.DLQ_STREAM, owner=True)
        b.pub.append(subjects.dlq(PLACEMENT))
        b.service("hami-placement", (subjects.PLACEMENT_PREEMPT, subjects.PLACEMENT_QUEUES,
                                      subjects.PLACEMENT_MOVE))
        b.durable(subjects.PLACEMENT_CONSUMER)
    elif kind == BINDER:
        b.stream(EVENTS, owner=True)
        b.bucket(subjects.QUOTA_BUCKET, owner=True)
        b.bucket(subjects.LEDGER_BUCKET)
        b.kv_read(subjects.LEDGER_BUCKET)
        b.kv_write(subjects.QUOTA_BUCKET)
        # the Kubernetes Queue resources, for placement (docs/queues.md)
        b.bucket(subjects.QUEUES_BUCKET, owner=True)
        b.kv_write(subjects.QUEUES_BUCKET)
        b.bucket(subjects.OUTCOMES_BUCKET, owner=True)
        b.kv_write(subjects.OUTCOMES_BUCKET)
        # Every replica answers its own waiting submits from these, whichever replica
        # the shared work queue handed the decision to.
        b.sub += [
            subjects.alloc_any("decided"), subjects.alloc("failed"), subjects.alloc_any("bound"),
            subjects.alloc_any("bind_failed"), subjects.alloc("released"),
        ]
        b.pub += [
            subjects.alloc("requested"),
            subjects.alloc_any("bound"),
            subjects.alloc_any("bind_failed"),
            subjects.alloc("released"),
            subjects.alloc_any("released"),
        ]
        b.stream(subjects.DLQ_STREAM)
        b.pub.append(subjects.dlq(BINDER))
        b.durable(BINDER_CONSUMER)
        # Extender mode: a standby replica hands the scheduler's calls to the Lease holder.
        b.pub += [subjects.EXTENDER_FILTER, subjects.EXTENDER_BIND, subjects.PLACEMENT_PREEMPT]
        b.sub += [subjects.EXTENDER_FILTER, subjects.EXTENDER_BIND]
        # hami defrag --apply in Kubernetes, answered by the Lease holder.
        b.sub.append(subjects.DEFRAG_APPLY)
        b.service("hami-binder", (subjects.API_SUBMIT, subjects.API_RELEASE, subjects.API_WITHDRAW))
    elif kind == INVENTORY:
        b.stream(EVENTS)
        b.bucket(subjects.NODES_BUCKET, owner=True)
        b.bucket(subjects.HEALTH_BUCKET, owner=True)
        b.bucket(subjects.LEDGER_BUCKET)
        b.kv_read(subjects.NODES_BUCKET)
        b.kv_read(subjects.LEDGER_BUCKET)
        b.kv_write(subjects.HEALTH_BUCKET)
        # Kubernetes mode (services.inventory.kube_nodes): the inventory writes the
        # entries of Nodes served by HAMi's vendor device plugins (no node agent there)
        # and beats for them. Which Nodes those are is only known at run time, so the
        # grant is the whole bucket and every node's heartbeat subject (the inventory
        # is the one that judges heartbeats: it gains no say it did not have). Node
        # agents keep their one key each.
        b.kv_write(subjects.NODES_BUCKET)
        b.pub.append(subjects.HEARTBEAT_ALL)
        b.pub.append(f"{evt}.node.*.*")
        b.sub += [
            subjects.HEARTBEAT_ALL,
            subjects.alloc("failed"),
            subjects.alloc("released"),
            subjects.alloc_any("released"),
        ]
        b.service("hami-inventory", (subjects.API_STATUS,))
    elif kind == METRICS:
        for bucket in (subjects.NODES_BUCKET, subjects.LEDGER_BUCKET, subjects.HEALTH_BUCKET):
            b.bucket(bucket)
            b.kv_read(bucket)
        b.sub.append(f"{evt}.alloc.>")
        b.sub.append(f"{evt}.node.>")  # the live feed of the page at /
        b.sub.append(subjects.TELEMETRY_ALL)  # the node-side series (HAMi's vGPU monitor)
        b.pub.append(subjects.PLACEMENT_QUEUES)  # the queues on the page at / and /metrics
    elif kind == NODEAGENT:
        assert node is not None
        key = subjects.kv_key(node)
        b.bucket(subjects.NODES_BUCKET)
        b.bucket(subjects.LEDGER_BUCKET)
        b.pub += [
            f"$KV.{subjects.NODES_BUCKET}.{key}",
            subjects.heartbeat(node),
            subjects.telemetry(node),
            subjects.alloc("prepared", node),
            f"{API}.STREAM.INFO.{EVENTS}",
            # A standalone agent withdraws (by uid) a 'hami run' slice whose processes
            # are gone, and answers 'hami run' on its own node's endpoint.
            subjects.API_WITHDRAW,
        ]
        b.kv_read(subjects.LEDGER_BUCKET, key)
        b.sub.append(subjects.agent_run(node))
        b.responds = True
    elif kind == CLI:
        b.pub += [subjects.API_SUBMIT, subjects.API_RELEASE, subjects.API_WITHDRAW, subjects.API_STATUS,
                  subjects.AGENT_RUN_ALL, subjects.PLACEMENT_QUEUES, subjects.PLACEMENT_MOVE,
                  subjects.DEFRAG_APPLY]
        # 'hami run' stops its command when its slice is preempted.
        b.sub.append(subjects.alloc_any("preempted"))
    elif kind == READER:
        # An ordered consumer of the event stream (nats-py or the nats CLI), and nothing
        # that writes: create and look up ephemeral consumers, answer flow control.
        b.pub += [
            f"{API}.INFO",
            f"{API}.STREAM.NAMES",
            f"{API}.STREAM.INFO.{EVENTS}",
            f"{API}.STREAM.MSG.GET.{EVENTS}",
            f"{API}.CONSUMER.CREATE.{EVENTS}",
            f"{API}.CONSUMER.CREATE.{EVENTS}.*.{evt}.>",
            f"{API}.CONSUMER.INFO.{EVENTS}.*",
            f"{API}.CONSUMER.MSG.NEXT.{EVENTS}.*",
            f"$JS.FC.{EVENTS}.>",
            # A durable pull consumer of its own that resumes where it left off
            # (examples/subscriber.py): pull and acknowledge on any consumer but the
            # services' work queues, whose messages are not the reader's to take.
            f"$JS.ACK.{EVENTS}.*.>",
        ]
        for durable in SERVICE_DURABLES:
            b.deny += [
                f"{API}.CONSUMER.CREATE.{EVENTS}.{durable}",
                f"{API}.CONSUMER.CREATE.{EVENTS}.{durable}.>",
                f"{API}.CONSUMER.MSG.NEXT.{EVENTS}.{durable}",
                f"$JS.ACK.{EVENTS}.{durable}.>",
            ]
        b.sub.append(f"{evt}.>")
    return b.build()


# The binder's durable consumer (services.binder names it the same; shared cannot
# import a service, so the name is repeated here and pinned by a test).
BINDER_CONSUMER = "binder"
SERVICE_DURABLES = (subjects.PLACEMENT_CONSUMER, BINDER_CONSUMER)
_BUCKETS = (
    subjects.NODES_BUCKET,
    subjects.LEDGER_BUCKET,
    subjects.HEALTH_BUCKET,
    subjects.QUOTA_BUCKET,
    subjects.OUTCOMES_BUCKET,
    subjects.QUEUES_BUCKET,
)


# ------------------------------------------------------------------ server config


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a TLS key pair and the CA that signed it."""

    ca: str
    cert: str = ""
    key: str = ""


def server_config(
    users: Mapping[str, str],
    *,
    tls: TlsFiles | None = None,
    host: str = "127.0.0.1",
    port: int = 4222,
    store_dir: str = "",
) -> str:
    """A nats-server configuration: one nkey user per ``role -> public key``, each with
    its role's permissions, and TLS on client connections when ``tls`` is given.

    Revoking an identity is leaving it out and reloading the server (SIGHUP): the server
    closes the connections that no longer authenticate.
    """
    entries = []
    for role, public in sorted(users.items()):
        if not public.startswith("U"):
            raise ValueError(f"{role}: {public[:8]!r}... is not an nkey user public key")
        entries.append({"nkey": public, "permissions": permissions(role).as_config()})
    lines = [f"host: {json.dumps(host)}", f"port: {port}"]
    lines.append(f"jetstream: {{store_dir: {json.dumps(store_dir)}}}" if store_dir else "jetstream: {}")
    if tls is not None:
        lines.append(
            "tls: " + json.dumps({"cert_file": tls.cert, "key_file": tls.key, "ca_file": tls.ca,
                                  "timeout": 5})
        )
    # JSON is valid nats-server configuration; quoted strings keep `$JS...` literal.
    lines.append("authorization: " + json.dumps({"users": entries}, indent=1))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ key material


def new_user_seed() -> str:
    """A fresh nkey user seed (``SU...``); the secret a client signs with."""
    import nkeys

    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key(seed: str) -> str:
    """The public key (``U...``) the server is given for a user seed."""
    import nkeys

    kp = nkeys.from_seed(seed.strip().encode())
    try:
        key: bytes = kp.public_key
        return key.decode()
    finally:
        kp.wipe()


# ------------------------------------------------------------------ client side


@dataclass(frozen=True)
class Credentials:
    """What a client connects with: its role, its nkey seed, and the CA to trust.

    ``seed`` is the seed itself; ``seed_file`` a file holding it (read by nats-py at
    each connect, so a rotated file is picked up on reconnect).
    """

    role: str
    seed: str = ""
    seed_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""  # a client certificate, where the server asks for one
    tls_key: str = ""

    def __post_init__(self) -> None:
        parse_role(self.role)
        if not self.seed and not self.seed_file:
            raise ValueError(f"{self.role}: credentials need an nkey seed or a seed file")

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.role)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(role: str, subject: str) -> bool:
    """Whether ``role``'s permissions let it publish on ``subject``."""
    perms = permissions(role)
    return any(subject_matches(a, subject) for a in perms.pub_allow) and not any(
        subject_matches(d, subject) for d in perms.pub_deny
    )


def may_subscribe(role: str, subject: str) -> bool:
    """Whether ``role``'s permissions let it subscribe to ``subject``."""
    perms = permissions(role)
    return any(subject_matches(a, subject) for a in perms.sub_allow) and not any(
        subject_matches(d, subject) for d in perms.sub_deny
    )
