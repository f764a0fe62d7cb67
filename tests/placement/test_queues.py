"""Queues with fair share (services/placement/engine/queues.py).

Ordering (a queue under its guarantee first, the lower share first, over-quota by
weight, then priority, then age, level by level), limits (total, per card model, an
ancestor's), the tree's validation, and lending and reclaim with the real preemption
engine: a queue under its guarantee takes back what others borrowed, never what is
within another queue's guarantee (property test on random small clusters).
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.placement.engine import Placement, Placer
from services.placement.engine import queues as q
from shared.config import QueueAmount, QueueSettings
from shared.schemas import AllocRequested, CardGrant, ContainerGrant, DeviceAsk, LedgerAlloc

from .util import cluster, node, placer, req


def qs(
    name: str,
    parent: str = "",
    gmem: int = 0,
    gcores: int = 0,
    weight: float = 1.0,
    lmem: int | None = None,
    lcores: int | None = None,
    **kw: object,
) -> QueueSettings:
    return QueueSettings(
        name=name,
        parent=parent,
        guarantee=QueueAmount(memory=gmem, cores=gcores),
        limit=QueueAmount(memory=lmem, cores=lcores),
        over_quota_weight=weight,
        **kw,  # type: ignore[arg-type]
    )


def tree(*defs: QueueSettings) -> q.QueueTree:
    t = q.tree_of(defs)
    assert t is not None
    return t


def held(
    uid: str,
    queue: str,
    mem: int,
    cores: int = 0,
    prio: int = 0,
    at: float = 0.0,
    typ: str = "NVIDIA-A100",
    uuid: str = "",
) -> LedgerAlloc:
    grant = CardGrant(uuid=uuid or f"GPU-{uid}", type=typ, mem=mem, cores=cores)
    return LedgerAlloc(
        uid=uid,
        name=uid,
        queue=queue,
        pod_priority=prio,
        decided_at=at,
        containers=[ContainerGrant(name="main", devices=[grant])],
    )


def ask(uid: str, queue: str, prio: int = 0, at: float = 0.0, ns: str = "") -> AllocRequested:
    return AllocRequested(
        uid=uid, name=uid, queue=queue, pod_priority=prio, requested_at=at, namespace=ns
    )


CAP = q.Res(100_000, 1000)


# ---------------------------------------------------------------------- ordering


def test_a_queue_under_its_guarantee_is_served_first_then_the_lower_share() -> None:
    t = tree(qs("a", gmem=40_000), qs("b", gmem=40_000), qs("c"))
    use = q.usage(t, [held("x", "a", 30_000), held("y", "b", 10_000), held("z", "c", 1_000)])
    got = q.order(t, use, CAP, [ask("ra", "a", at=1), ask("rb", "b", at=2), ask("rc", "c", at=0)])
    # b: 25 % of its guarantee; a: 75 %; c has no guarantee (over quota) though oldest
    assert [r.uid for r in got] == ["rb", "ra", "rc"]


def test_over_quota_queues_share_the_rest_by_weight() -> None:
    t = tree(qs("a", weight=3.0), qs("b", weight=1.0))
    # a holds twice what b does but has three times the weight: a's turn
    use = q.usage(t, [held("x", "a", 20_000), held("y", "b", 10_000)])
    assert [r.uid for r in q.order(t, use, CAP, [ask("rb", "b"), ask("ra", "a")])] == ["ra", "rb"]
    use = q.usage(t, [held("x", "a", 40_000), held("y", "b", 10_000)])
    assert [r.uid for r in q.order(t, use, CAP, [ask("ra", "a"), ask("rb", "b")])] == ["rb", "ra"]


def test_within_a_queue_priority_then_age() -> None:
    t = tree(qs("a", gmem=10_000))
    reqs = [
        ask("old-low", "a", 0, at=1),
        ask("new-high", "a", 5, at=3),
        ask("old-high", "a", 5, at=2),
    ]
    assert [r.uid for r in q.order(t, q.Usage(t), CAP, reqs)] == ["old-high", "new-high", "old-low"]


def test_rounds_recompute_the_keys_as_requests_are_placed() -> None:
    t = tree(qs("a", gmem=20_000), qs("b", gmem=20_000))
    rounds = q.Rounds(
        t, q.Usage(t), CAP, [ask("a1", "a", at=1), ask("a2", "a", at=2), ask("b1", "b", at=3)]
    )
    first = rounds.next()
    assert first is not None and first.uid == "a1"  # equal shares: the older
    rounds.placed(first, held("a1", "a", 15_000).containers)
    nxt = rounds.next()
    assert nxt is not None and nxt.uid == "b1"  # a is at 75 % now, b at 0
    assert [r.uid for r in iter(rounds.next, None)] == ["a2"]


def test_the_tree_is_compared_from_the_top_down() -> None:
    # org1 (guarantee 60k) has team1/team2; org2 (guarantee 20k) has team3.
    t = tree(
        qs("org1", gmem=60_000),
        qs("team1", "org1", gmem=30_000),
        qs("team2", "org1", gmem=30_000),
        qs("org2", gmem=20_000),
        qs("team3", "org2", gmem=20_000),
    )
    # team1 is idle (0 %) but org1 as a whole is at 83 %; org2 at 50 %: org2 first
    use = q.usage(t, [held("x", "team2", 50_000), held("y", "team3", 10_000)])
    got = q.order(t, use, CAP, [ask("r1", "team1"), ask("r3", "team3")])
    assert [r.uid for r in got] == ["r3", "r1"]
    assert use.of("org1") == q.Res(50_000, 0) and use.of("team1") == q.Res()


def test_namespace_default_and_the_default_queue() -> None:
    t = tree(qs("research", gmem=1000, namespaces=["ml"]))
    assert t.leaf_of("", "ml") == "research"
    assert t.leaf_of("", "web") == q.DEFAULT_QUEUE
    with pytest.raises(q.QueueError, match="'nope' is not defined"):
        t.leaf_of("nope", "ml")


@pytest.mark.parametrize(
    ("defs", "match"),
    [
        ([qs("a", parent="zz")], "parent 'zz' is not defined"),
        ([qs("a", parent="b"), qs("b", parent="a")], "cycle"),
        ([qs("a"), qs("a")], "defined twice"),
        ([qs("A")], "lower-case"),
        ([qs("a", weight=0)], "overQuotaWeight"),
        ([qs("a", gmem=10, lmem=5)], "limit is below its guarantee"),
        ([qs("p", gmem=10), qs("c1", "p", gmem=6), qs("c2", "p", gmem=6)], "children's guarantees"),
        ([qs("a", namespaces=["x"]), qs("b", namespaces=["x"])], "two default queues"),
    ],
)
def test_bad_definitions_are_refused_with_the_reason(defs: list[QueueSettings], match: str) -> None:
    with pytest.raises(q.QueueError, match=match):
        q.tree_of(defs)


def test_a_request_joins_a_leaf_only() -> None:
    t = tree(qs("p", gmem=10), qs("c", "p", gmem=5))
    assert "has child queues" in (q.limit_problem(t, q.Usage(t), ask("r", "p"), []) or "")


# ------------------------------------------------------------------------ limits


def test_limits_total_per_model_and_of_an_ancestor() -> None:
    t = tree(
        qs("org", lmem=30_000),
        qs("team", "org", lcores=150, model_limits={"A100": QueueAmount(memory=15_000)}),
    )
    use = q.usage(
        t,
        [held("x", "team", 10_000, 50, typ="NVIDIA-A100"), held("y", "team", 10_000, 50, typ="T4")],
    )
    r = ask("r", "team")
    assert q.limit_problem(t, use, r, held("n", "team", 4_000, 40, typ="T4").containers) is None
    # on an A100 the team's A100 limit (15 000 MiB) is passed
    why = q.limit_problem(t, use, r, held("n", "team", 6_000, 10, typ="NVIDIA-A100").containers)
    assert why == "queue 'team' limit on A100: GPU memory 16000/15000 MiB"
    why = q.limit_problem(t, use, r, held("n", "team", 1_000, 60, typ="T4").containers)
    assert why == "queue 'team' limit: GPU cores 160/150 %"
    why = q.limit_problem(t, use, r, held("n", "team", 11_000, 10, typ="T4").containers)
    assert why == "queue 'org' limit: GPU memory 31000/30000 MiB"


# ------------------------------------------------------------- lending, reclaim


def test_over_quota_marks_what_is_beyond_the_guarantee_youngest_lowest_first() -> None:
    t = tree(qs("a", gmem=20_000))
    allocs = [
        held("old", "a", 10_000, at=1),
        held("mid", "a", 10_000, at=2),
        held("young", "a", 10_000, at=3),
        held("vip", "a", 10_000, prio=9, at=4),
    ]
    assert q.over_quota(t, allocs) == {"mid", "young"}


def full_cluster() -> Placer:
    # two nodes of two 10 000 MiB cards, each card held by "b" in two halves
    p = placer(cluster(node("n1", 2), node("n2", 2)))
    i = 0
    for n in ("n1", "n2"):
        for c in range(2):
            for _ in range(2):
                i += 1
                p.cluster.reserve(n, held(f"b{i}", "b", 5_000, 0, at=float(i), uuid=f"GPU-{n}-{c}"))
    return p


def test_a_queue_under_its_guarantee_reclaims_what_was_lent() -> None:
    p = full_cluster()
    t = tree(qs("a", gmem=20_000), qs("b", gmem=20_000))
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=10_000)), queue="a")
    got = q.choose_victims(p, t, r, lambda a: a.pod_priority)
    assert got is not None
    # two of b's youngest (over its 20 000 guarantee), on one card
    assert sorted(got.uids) == ["b7", "b8"]
    assert q.over_quota(t, q.allocations(p.cluster)) >= set(got.uids)


def test_never_preempt_within_a_guarantee() -> None:
    p = full_cluster()
    # b's guarantee covers all it holds: nothing is lent, nothing is taken back
    t = tree(qs("a", gmem=20_000), qs("b", gmem=40_000))
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=10_000)), queue="a", pod_priority=100)
    assert q.choose_victims(p, t, r, lambda a: a.pod_priority) is None


def test_a_queue_over_its_guarantee_takes_only_lower_priority() -> None:
    p = full_cluster()
    t = tree(qs("a"), qs("b", gmem=20_000))  # a has no guarantee: it cannot reclaim
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=10_000)), queue="a")
    assert q.choose_victims(p, t, r, lambda a: a.pod_priority) is None
    high = msgspec.structs.replace(r, pod_priority=5)  # over quota of b, lower priority
    got = q.choose_victims(p, t, high, lambda a: a.pod_priority)
    assert got is not None and sorted(got.uids) == ["b7", "b8"]


def test_on_one_node_the_same_rules_apply() -> None:
    # the extender's preempt verb asks node by node: n1 holds b's first four halves
    # (within b's guarantee of 20 000), n2 its four youngest (beyond it)
    p = full_cluster()
    t = tree(qs("a", gmem=20_000), qs("b", gmem=20_000))
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=10_000)), queue="a", pod_priority=100)
    before = sorted(q.allocations(p.cluster), key=lambda a: a.uid)
    # within another queue's guarantee: never, whatever the preemptor's priority
    assert q.victims_on_node(p, t, r, "n1", lambda a: a.pod_priority) is None
    got = q.victims_on_node(p, t, r, "n2", lambda a: a.pod_priority)
    assert got is not None and got.node == "n2" and sorted(got.uids) == ["b7", "b8"]
    # a question: nothing is released
    assert sorted(q.allocations(p.cluster), key=lambda a: a.uid) == before
    # a queue with no guarantee reclaims nothing: lower priority only, beyond b's guarantee
    t2 = tree(qs("a"), qs("b", gmem=20_000))
    low = msgspec.structs.replace(r, pod_priority=0)
    assert q.victims_on_node(p, t2, low, "n2", lambda a: a.pod_priority) is None
    assert q.victims_on_node(p, t2, r, "n1", lambda a: a.pod_priority) is None
    got = q.victims_on_node(p, t2, r, "n2", lambda a: a.pod_priority)
    assert got is not None and sorted(got.uids) == ["b7", "b8"]


@settings(max_examples=60, deadline=None)
@given(
    holds=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from([2_500, 5_000, 10_000]),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=12,
    ),
    guar=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
    want=st.sampled_from([2_500, 5_000, 10_000]),
    queue=st.sampled_from(["a", "b", "c"]),
    prio=st.integers(0, 4),
)
def test_reclaim_never_takes_from_a_guarantee_and_always_makes_room(
    holds: list[tuple[str, int, int]], guar: tuple[int, int, int], want: int, queue: str, prio: int
) -> None:
    p = placer(cluster(node("n1", 2), node("n2", 2)))
    for i, (qn, mem, pr) in enumerate(holds):
        r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=mem)), queue=qn, pod_priority=pr)
        placed = p.decide(r)
        if isinstance(placed, Placement):
            a = msgspec.structs.replace(placed.to_alloc(r, float(i)), pod_priority=pr)
            p.cluster.reserve(placed.node, a)
    t = tree(*(qs(n, gmem=g * 10_000) for n, g in zip("abc", guar, strict=True)))
    allocs = q.allocations(p.cluster)
    over = q.over_quota(t, allocs)
    # what stays in guarantee fits each queue's guarantee
    kept = q.usage(t, [a for a in allocs if a.uid not in over])
    for n in "abc":
        assert kept.of(n).within(t.specs[n].guarantee)
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=want)), queue=queue, pod_priority=prio)
    got = q.choose_victims(p, t, r, lambda a: a.pod_priority)
    if got is None:
        return
    by_uid = {a.uid: a for a in allocs}
    for uid in got.uids:
        a = by_uid[uid]
        if a.queue == queue:
            assert a.pod_priority < prio  # own queue: lower priority only
        else:
            assert uid in over  # another queue: only what it borrowed
    # the victims' release makes the request fit on that node
    for uid in got.uids:
        p.cluster.unreserve(got.node, uid)
    only = msgspec.structs.replace(
        r, constraints=msgspec.structs.replace(r.constraints, nodes=[got.node])
    )
    assert isinstance(p.decide(only), Placement)


def test_a_sibling_under_its_guarantee_reclaims_inside_the_parent() -> None:
    # org (guarantee 40 000) = train (20 000) + infer (20 000); top-level other (0)
    p = full_cluster()  # eight halves of 5 000 MiB, renamed below
    t = tree(
        qs("org", gmem=40_000),
        qs("train", "org", gmem=20_000),
        qs("infer", "org", gmem=20_000),
        qs("other"),
    )
    for n in ("n1", "n2"):
        for a in list(p.cluster.ledger(n).allocs.values()):
            p.cluster.unreserve(n, a.uid)
            p.cluster.reserve(n, msgspec.structs.replace(a, queue="train"))
    # train holds all 40 000: 20 000 of it beyond its own guarantee, none beyond org's
    levels = q.over_levels(t, q.allocations(p.cluster))
    assert sorted(levels) == ["b5", "b6", "b7", "b8"] and set(levels.values()) == {1}
    r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=10_000)), queue="infer")
    got = q.choose_victims(p, t, r, lambda a: a.pod_priority)
    assert got is not None and sorted(got.uids) == ["b7", "b8"]
    # 'other' has no guarantee: org's side is within org's guarantee, nothing is lent
    o = msgspec.structs.replace(r, queue="other", uid="o1")
    assert q.choose_victims(p, t, o, lambda a: a.pod_priority) is None


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["place", "release", "remove", "add"]),
            st.integers(0, 3),
            st.sampled_from(["a", "b", ""]),
            st.sampled_from([2_500, 5_000]),
        ),
        max_size=30,
    )
)
def test_the_use_cache_follows_every_change(steps: list[tuple[str, int, str, int]]) -> None:
    # node by node it must equal counting every allocation afresh
    p = placer(cluster(node("n0", 2), node("n1", 2), node("n2", 1)))
    t = tree(qs("a", gmem=10_000), qs("b", namespaces=["ns-b"]))
    cache = q.UseCache(t)
    for i, (op, k, queue, mem) in enumerate(steps):
        cl = p.cluster
        names = sorted(cl.nodes)
        if op == "place":
            r = msgspec.structs.replace(req(DeviceAsk(nums=1, mem=mem), ns="ns-b"), queue=queue)
            got = p.decide(r)
            if isinstance(got, Placement):
                cl.reserve(got.node, got.to_alloc(r, float(i)))
        elif op == "release" and names:
            n = names[k % len(names)]
            held_here = sorted(cl.ledger(n).allocs)
            if held_here:
                cl.unreserve(n, held_here[0])
        elif op == "remove" and names:
            cl.remove_node(names[k % len(names)])
        elif op == "add":
            cl.upsert_node(node(f"m{k}", 2))
        got_use = cache.get(cl)
        want = q.usage(t, q.allocations(cl))
        for name in t.specs:
            assert got_use.of(name) == want.of(name), (op, name)
