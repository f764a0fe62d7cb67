"""The gang rules of services/placement/engine/gang.py, on ledgers built by hand."""

from __future__ import annotations

from services.placement.engine import gang
from shared.schemas import AllocRequested, LedgerAlloc, NodeLedger


def res(uid: str, key: str, size: int, expires: float) -> LedgerAlloc:
    return LedgerAlloc(uid=uid, name=uid, gang=key, gang_size=size, gang_expires=expires)


def ledger(node: str, *allocs: LedgerAlloc) -> NodeLedger:
    return NodeLedger(node=node, allocs={a.uid: a for a in allocs})


def test_a_gang_is_complete_only_with_all_its_members_across_nodes() -> None:
    leds = [ledger("n0", res("a0", "/a", 3, 10.0)), ledger("n1", res("a1", "/a", 3, 10.0))]
    assert not gang.gangs_in(leds)["/a"].complete
    leds.append(ledger("n2", res("a2", "/a", 3, 0.0), LedgerAlloc(uid="x", name="x")))
    views = gang.gangs_in(leds)
    assert set(views) == {"/a"} and views["/a"].complete
    assert views["/a"].expires == 10.0  # the committed member has no deadline


def test_sweep_commits_a_complete_gang_even_past_its_deadline_and_rolls_back_a_partial_one() -> None:
    leds = [
        ledger("n0", res("a0", "/a", 2, 5.0), res("b0", "/b", 2, 5.0)),
        ledger("n1", res("a1", "/a", 2, 0.0), res("c0", "/c", 2, 50.0)),  # /a: commit half done
    ]
    acts = gang.sweep(gang.gangs_in(leds).values(), now=6.0)
    assert acts == [gang.Action("commit", "/a"), gang.Action("rollback", "/b")]  # /c: not yet due
    assert gang.sweep(gang.gangs_in(leds).values(), now=4.0) == [gang.Action("commit", "/a")]


def test_commit_and_rollback_touch_only_their_gang_and_are_idempotent() -> None:
    led = ledger("n0", res("a0", "/a", 2, 5.0), res("b0", "/b", 2, 5.0), LedgerAlloc(uid="x", name="x"))
    got = gang.committed_ledger(led, "/a")
    assert got is not None
    assert got.allocs["a0"].gang_expires == 0 and got.allocs["b0"].gang_expires == 5.0
    assert gang.committed_ledger(got, "/a") is None
    back = gang.rolled_back_ledger(got, "/b")
    assert back is not None
    after, gone = back
    assert set(after.allocs) == {"a0", "x"} and [a.uid for a in gone] == ["b0"]
    assert gang.rolled_back_ledger(after, "/b") is None
    assert gang.rolled_back_ledger(after, "/a") is None  # committed: never rolled back


def test_members_share_their_gangs_deadline() -> None:
    views = gang.gangs_in([ledger("n0", res("a0", "/a", 3, 42.0))])
    assert gang.expiry_for(views["/a"], now=40.0, timeout=60.0) == 42.0
    assert gang.expiry_for(None, now=40.0, timeout=5.0) == 45.0
    assert gang.expiry_for(None, now=40.0, timeout=0.0) == 40.0 + gang.GANG_TIMEOUT_S


def test_only_younger_partial_gangs_may_be_wounded() -> None:
    leds = [
        ledger("n0", res("a0", "/a", 2, 10.0), res("b0", "/b", 2, 20.0), res("d0", "/d", 1, 0.0)),
        ledger("n1", res("c0", "/c", 2, 30.0), res("c1", "/c", 2, 30.0)),  # complete: committing
    ]
    views = gang.gangs_in(leds)
    mine = gang.rank_for(views.get("/b"), "/b", 99.0)
    prio = gang.wound_priority(views, mine)
    allocs = {u: a for led in leds for u, a in led.allocs.items()}
    assert prio(allocs["a0"]) is None  # older
    assert prio(allocs["b0"]) is None  # my own
    assert prio(allocs["c0"]) is None  # complete
    assert prio(allocs["d0"]) is None  # committed
    assert gang.wound_priority(views, gang.rank_for(None, "/e", 99.0))(allocs["b0"]) is None
    assert gang.wound_priority(views, views["/a"].rank)(allocs["b0"]) == 0


def test_bad_gang_fields_are_named() -> None:
    base = AllocRequested(uid="u", name="n")
    assert gang.problems(base) == []
    assert gang.problems(AllocRequested(uid="u", name="n", gang_size=2))
    assert any("gang_size" in p for p in gang.problems(AllocRequested(uid="u", name="n", gang="g")))
    assert gang.problems(AllocRequested(uid="u", name="n", gang="a/b", gang_size=1))
    assert gang.problems(AllocRequested(uid="u", name="n", gang="g", gang_size=2)) == []


def test_standalone_preemption_never_takes_a_partial_gangs_reservation() -> None:
    from services.placement.service import _standalone_priority

    assert _standalone_priority(res("a0", "/a", 2, 10.0)) is None  # reserved: the gang would be left short
    assert _standalone_priority(res("a0", "/a", 2, 0.0)) == 0  # committed: an allocation like any other
