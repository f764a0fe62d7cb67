"""The permission computation: each role can do its service's work and nothing else."""

from __future__ import annotations

import pytest

from services.binder.service import BINDER_CONSUMER
from shared import auth, subjects

matches = auth.subject_matches
can_pub = auth.may_publish
can_sub = auth.may_subscribe


ROLES = [*auth.FIXED_ROLES, "nodeagent:n1"]
DESTRUCTIVE = [
    f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}",
    f"$JS.API.STREAM.PURGE.KV_{subjects.LEDGER_BUCKET}",
    f"$JS.API.STREAM.MSG.DELETE.{subjects.EVENTS_STREAM}",
    f"$JS.API.CONSUMER.DELETE.{subjects.EVENTS_STREAM}.placement",
]


def test_matcher() -> None:
    assert matches("a.*.c", "a.b.c") and not matches("a.*", "a.b.c")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")


@pytest.mark.parametrize("role", ROLES)
def test_only_admin_destroys(role: str) -> None:
    for subject in DESTRUCTIVE:
        assert can_pub(role, subject) == (role == auth.ADMIN), (role, subject)


def test_who_publishes_which_event() -> None:
    decided = subjects.alloc("decided", "n1")
    publishers = {r for r in ROLES if can_pub(r, decided)}
    assert publishers == {auth.ADMIN, auth.PLACEMENT}
    assert {r for r in ROLES if can_pub(r, subjects.alloc("requested"))} == {auth.ADMIN, auth.BINDER}
    assert {r for r in ROLES if can_pub(r, subjects.alloc("bound", "n1"))} == {auth.ADMIN, auth.BINDER}
    released = {r for r in ROLES if can_pub(r, subjects.alloc("released", "n1"))}
    # placement releases the victims of a preemption (scheduler.preemption)
    assert released == {auth.ADMIN, auth.BINDER, auth.PLACEMENT}
    assert {r for r in ROLES if can_pub(r, subjects.alloc("preempted", "n1"))} == {auth.ADMIN, auth.PLACEMENT}
    assert {r for r in ROLES if can_pub(r, subjects.alloc("prepared", "n1"))} == {auth.ADMIN, "nodeagent:n1"}
    assert not can_pub("nodeagent:n1", subjects.alloc("prepared", "n2"))


def test_ledger_writes_belong_to_placement() -> None:
    key = f"$KV.{subjects.LEDGER_BUCKET}.n1"
    assert {r for r in ROLES if can_pub(r, key)} == {auth.ADMIN, auth.PLACEMENT}


def test_node_agent_is_held_to_its_node() -> None:
    role = "nodeagent:n1"
    assert can_pub(role, f"$KV.{subjects.NODES_BUCKET}.n1")
    assert can_pub(role, subjects.heartbeat("n1")) and can_pub(role, subjects.telemetry("n1"))
    for other in (f"$KV.{subjects.NODES_BUCKET}.n2", subjects.heartbeat("n2"), subjects.telemetry("n2"),
                  f"$KV.{subjects.HEALTH_BUCKET}.n1"):
        assert not can_pub(role, other), other
    own = f"$JS.API.DIRECT.GET.KV_{subjects.LEDGER_BUCKET}.$KV.{subjects.LEDGER_BUCKET}.n1"
    assert can_pub(role, own) and not can_pub(role, own[:-2] + "n2")
    assert not can_sub(role, subjects.HEARTBEAT_ALL)
    # A dotted node name is one token: it cannot widen into another node's subjects.
    dotted = auth.permissions("nodeagent:a.b")
    assert subjects.heartbeat("a.b") in dotted.pub_allow and "hami.hb.a.b" not in dotted.pub_allow


def test_reader_reads_the_stream_and_writes_nothing() -> None:
    r = auth.READER
    assert can_sub(r, "hami.evt.alloc.decided.n1")
    assert can_pub(r, f"$JS.API.CONSUMER.CREATE.{subjects.EVENTS_STREAM}")
    assert can_pub(r, f"$JS.FC.{subjects.EVENTS_STREAM}.x.y")
    for subject in ("hami.evt.alloc.requested", f"$KV.{subjects.NODES_BUCKET}.fake",
                    subjects.API_SUBMIT, f"$JS.API.STREAM.UPDATE.{subjects.EVENTS_STREAM}",
                    f"$JS.API.STREAM.CREATE.{subjects.EVENTS_STREAM}",
                    f"$JS.ACK.{subjects.EVENTS_STREAM}.placement.1.1.1.1.1"):
        assert not can_pub(r, subject), subject
    for subject in (subjects.heartbeat("n1"), f"$KV.{subjects.LEDGER_BUCKET}.n1", "_INBOX.cli.x"):
        assert not can_sub(r, subject), subject
    assert can_sub(r, "_INBOX.reader.x")


def test_inboxes_are_per_identity() -> None:
    for role in ROLES:
        if role == auth.ADMIN:
            continue
        perms = auth.permissions(role)
        assert [s for s in perms.sub_allow if s.startswith("_INBOX")] == [f"_INBOX.{auth.identity(role)}.>"]


def test_stream_config_is_the_owners() -> None:
    for stream, owners in {
        subjects.EVENTS_STREAM: {auth.PLACEMENT, auth.BINDER},
        f"KV_{subjects.LEDGER_BUCKET}": {auth.PLACEMENT},
        f"KV_{subjects.NODES_BUCKET}": {auth.INVENTORY},
        f"KV_{subjects.QUOTA_BUCKET}": {auth.BINDER},
    }.items():
        updaters = {r for r in ROLES if can_pub(r, f"$JS.API.STREAM.UPDATE.{stream}")}
        assert updaters == owners | {auth.ADMIN}, stream
        assert {r for r in ROLES if r != auth.ADMIN and stream in auth.permissions(r).updates} == owners


def test_durables_and_services() -> None:
    assert auth.BINDER_CONSUMER == BINDER_CONSUMER
    assert can_pub(auth.BINDER, f"$JS.ACK.{subjects.EVENTS_STREAM}.{BINDER_CONSUMER}.1.2.3.4.5")
    assert not can_pub(auth.BINDER, f"$JS.ACK.{subjects.EVENTS_STREAM}.placement.1.2.3.4.5")
    assert can_sub(auth.BINDER, subjects.API_SUBMIT) and not can_sub(auth.CLI, subjects.API_SUBMIT)
    assert auth.permissions(auth.INVENTORY).allow_responses
    assert not auth.permissions(auth.CLI).allow_responses
    # the queues are asked by the CLI (hami queues) and by metrics (its page and series)
    askers = {r for r in ROLES if can_pub(r, subjects.PLACEMENT_QUEUES)}
    assert askers == {auth.ADMIN, auth.CLI, auth.METRICS}


def test_bad_roles_and_keys() -> None:
    for bad in ("nodeagent", "nodeagent:", "root", "cli:x"):
        with pytest.raises(ValueError):
            auth.permissions(bad)
    with pytest.raises(ValueError, match="nkey user"):
        auth.server_config({"cli": "SUABC"})


def test_seed_and_public_key() -> None:
    seed = auth.new_user_seed()
    assert seed.startswith("SU")
    pub = auth.public_key(seed)
    assert pub.startswith("U") and pub == auth.public_key(seed + "\n")
    assert pub != auth.public_key(auth.new_user_seed())
    conf = auth.server_config({"cli": pub})
    assert pub in conf and '"$JS.API.STREAM.DELETE.>"' in conf


def test_dotted_node_names() -> None:
    """Kubernetes node names are DNS names: their KV keys keep the dots (several tokens)."""
    node = "ip-10-0-0-1.ec2.internal"
    key = subjects.kv_key(node)
    assert "." in key
    assert can_pub(auth.PLACEMENT, f"$KV.{subjects.LEDGER_BUCKET}.{key}")
    assert can_pub(auth.INVENTORY, f"$JS.API.DIRECT.GET.KV_{subjects.NODES_BUCKET}.$KV.{subjects.NODES_BUCKET}.{key}")
    role = f"nodeagent:{node}"
    assert can_pub(role, f"$KV.{subjects.NODES_BUCKET}.{key}")
    assert can_pub(role, subjects.heartbeat(node))
    assert not can_pub(role, f"$KV.{subjects.NODES_BUCKET}.{key}.x")
    assert not can_pub(role, f"$KV.{subjects.NODES_BUCKET}.ip-10-0-0-1")
