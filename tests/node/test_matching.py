"""The matcher: which pending containers an Allocate of n devices may be for (pure)."""

from __future__ import annotations

import random

import pytest

from services.nodeagent.kube.matching import Config, Matcher
from shared.schemas import LedgerAlloc
from tests.node.util import grant, pod


def shaped(uid: str, sizes: list[int], with_init: bool = False) -> LedgerAlloc:
    cs = [grant(f"c{j}", [f"GPU-{uid}-{j}-{k}" for k in range(n)]) for j, n in enumerate(sizes)]
    if with_init:
        cs.insert(0, grant("no-gpu-init", [], init=True))
    return pod(uid, *cs)


def test_pods_one_at_a_time_are_always_exact() -> None:
    m = Matcher()
    allocs: dict[str, LedgerAlloc] = {}
    for i in range(20):
        allocs[f"p{i}"] = shaped(f"p{i}", [1])
        m.update(allocs)
        cands = m.allocate(1)
        # Earlier pods of the same shape are known allocated: never candidates again.
        assert [c.uid for c in cands] == [f"p{i}"]
    assert m.pending() == set()
    assert len(m.configs) == 1


def test_same_shape_burst_is_ambiguous_then_fully_resolved() -> None:
    m = Matcher()
    m.update({f"p{i}": shaped(f"p{i}", [1]) for i in range(8)})
    for _ in range(8):
        assert len(m.allocate(1)) == 8  # any of them, as far as anyone can know
    assert m.pending() == set()  # ... but after 8 calls all 8 are known allocated
    m.update({**m.allocs, "late": shaped("late", [1])})
    assert [c.uid for c in m.allocate(1)] == ["late"]


def test_distinct_shapes_in_a_burst_are_exact() -> None:
    m = Matcher()
    m.update({"a": shaped("a", [1]), "b": shaped("b", [2]), "c": shaped("c", [3, 1], True)})
    assert [c.uid for c in m.allocate(3)] == ["c"]
    c1 = m.allocate(1)  # c's second container, or a (if c's admission was abandoned)
    assert {c.uid for c in c1} == {"a", "c"}
    assert [c.uid for c in m.allocate(2)] == ["b"]
    # Once b started, c cannot continue: the last 1-card call is a's.
    assert [c.uid for c in m.allocate(1)] == ["a"]
    assert m.pending() == set()


def test_candidate_points_at_the_right_container() -> None:
    m = Matcher()
    m.update({"x": shaped("x", [2, 1], with_init=True)})
    first = m.allocate(2)
    assert [(c.uid, c.position, c.index, c.container) for c in first] == [("x", 0, 1, "c0")]
    second = m.allocate(1)
    assert [(c.uid, c.position, c.index, c.container) for c in second] == [("x", 1, 2, "c1")]


def test_unknown_size_gives_no_candidate_and_changes_nothing() -> None:
    m = Matcher()
    m.update({"a": shaped("a", [1])})
    assert m.allocate(4) == []
    assert [c.uid for c in m.allocate(1)] == ["a"]


def test_release_of_a_pending_pod_keeps_the_others_pending() -> None:
    m = Matcher()
    allocs = {f"p{i}": shaped(f"p{i}", [1]) for i in range(3)}
    m.update(allocs)
    m.allocate(1)
    del allocs["p0"]  # released: maybe the allocated one, maybe not
    m.update(allocs)
    assert {c.uid for c in m.candidates(1)} == {"p1", "p2"}
    m.allocate(1)
    # 2 calls, and after the release at least one of p1/p2 is still pending or both
    # are done; a third call could only be the other one -- never a phantom.
    assert m.pending() <= {"p1", "p2"}


def test_state_survives_a_restart() -> None:
    m = Matcher()
    allocs = {"a": shaped("a", [1]), "b": shaped("b", [1]), "c": shaped("c", [2])}
    m.update(allocs)
    m.allocate(2)
    m.allocate(1)
    allocs["d"] = shaped("d", [2])
    restored = Matcher.loads(m.dumps(), allocs)
    assert [c.uid for c in restored.allocate(2)] == ["d"]  # c is known allocated
    assert {c.uid for c in restored.candidates(1)} == {"a", "b"}


def test_restart_without_state_is_safe() -> None:
    m = Matcher.loads("not json", {"a": shaped("a", [1])})
    assert [c.uid for c in m.allocate(1)] == ["a"]


@pytest.mark.parametrize("abandon", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_random_admissions_truth_is_always_a_candidate(seed: int, abandon: bool) -> None:
    """Random pods arriving and leaving, admitted pod by pod in random order, the agent
    restarting now and then: the container really being allocated is always among the
    candidates, and once every pod has left the matcher holds nothing."""
    rng = random.Random(seed)
    m = Matcher(abandon=abandon)
    allocs: dict[str, LedgerAlloc] = {}
    queue: list[str] = []

    def admit(uid: str) -> None:
        for pos, g in enumerate(c for c in allocs[uid].containers if c.devices):
            cands = m.allocate(len(g.devices))
            assert (uid, pos) in {(c.uid, c.position) for c in cands}

    for step in range(60):
        if rng.random() < 0.5 or not queue:
            uid = f"p{step}"
            sizes = [rng.choice([1, 1, 2, 3]) for _ in range(rng.choice([1, 1, 2]))]
            allocs[uid] = shaped(uid, sizes, with_init=rng.random() < 0.2)
            queue.append(uid)
            m.update(allocs)
        else:
            admit(queue.pop(rng.randrange(len(queue))))
        if rng.random() < 0.15 and len(allocs) > len(queue):  # a running pod ends
            del allocs[rng.choice([u for u in allocs if u not in queue])]
            m.update(allocs)
        if rng.random() < 0.1:
            m = Matcher.loads(m.dumps(), allocs)
            m.abandon = abandon
        assert m.pending() <= set(allocs)
    for uid in queue:
        admit(uid)
    m.update({})
    assert (m.groups, m.allocs, m.done, m.configs) == ({}, {}, set(), {Config()})


def test_abandoned_admission_is_safe() -> None:
    """The kubelet gave up on a pod after its first container; the next pod's call of
    the same size must still expose that pod's cards."""
    m = Matcher()
    m.update({"x": shaped("x", [1, 1]), "y": shaped("y", [1])})
    m.allocate(1)  # x's first container (or y's)
    assert "y" in {c.uid for c in m.allocate(1)}  # y, after x was abandoned


@pytest.mark.parametrize("seed", range(5))
def test_mixed_burst_resolves_fully(seed: int) -> None:
    """Pods of four words arriving while earlier ones are being admitted (a node in a
    burst): every call's truth is a candidate, and once the kubelet is through, every
    pod is known allocated (nothing left to confuse the next pod with). Groups kept
    per arrival made the parses multiply past MAX_CONFIGS here, and the collapse left
    pods pending for good."""
    rng = random.Random(seed)
    words = [[1]] * 6 + [[2], [1, 1], [2, 1]]
    m = Matcher()
    allocs: dict[str, LedgerAlloc] = {}
    queue: list[str] = []

    def admit(uid: str) -> None:
        for pos, g in enumerate(c for c in allocs[uid].containers if c.devices):
            assert (uid, pos) in {(c.uid, c.position) for c in m.allocate(len(g.devices))}

    for i in range(40):
        allocs[f"p{i}"] = shaped(f"p{i}", rng.choice(words))
        queue.append(f"p{i}")
        m.update(allocs)
        while queue and rng.random() < 0.6:
            admit(queue.pop(0))
    for uid in queue:
        admit(uid)
    assert m.pending() == set()


@pytest.mark.parametrize("seed", range(6))
def test_dropping_dominated_parses_changes_no_answer(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``minimal`` is an optimisation, not an approximation: a matcher that keeps every
    parse gives the same candidates and knows the same pods done, call after call,
    through arrivals, admissions and pods leaving."""
    from services.nodeagent.kube import matching

    rng = random.Random(seed)
    fast, full = Matcher(), Matcher()
    allocs: dict[str, LedgerAlloc] = {}
    queue: list[str] = []

    def both(op: str, *args: object) -> tuple[object, object]:
        with monkeypatch.context() as mp:
            mp.setattr(matching, "THIN_ABOVE", 0)  # thinned at every step
            a = getattr(fast, op)(*args)
        with monkeypatch.context() as mp:
            mp.setattr(matching, "minimal", lambda c: c)
            mp.setattr(matching, "MAX_CONFIGS", 10**9)  # every parse, never collapsed
            b = getattr(full, op)(*args)
        return a, b

    for step in range(80):
        r = rng.random()
        if r < 0.45 or not queue:
            uid = f"p{step}"
            allocs[uid] = shaped(uid, rng.choice([[1], [1], [2], [1, 1], [2, 1], [1, 2]]))
            queue.append(uid)
            both("update", dict(allocs))
        elif r < 0.9:
            uid = queue.pop(rng.randrange(len(queue)))
            for g in (c for c in allocs[uid].containers if c.devices):
                a, b = both("allocate", len(g.devices))
                assert {(c.uid, c.position) for c in a} == {(c.uid, c.position) for c in b}  # type: ignore[attr-defined]
        elif len(allocs) > len(queue):
            del allocs[rng.choice([u for u in allocs if u not in queue])]
            both("update", dict(allocs))
        assert fast.pending() == full.pending()
        assert len(fast.configs) <= len(full.configs)
