"""HAMi's FilteringSucceed event for a Kubernetes pod, from HAMi v2.10's scheduler.

HAMi's ``Filter`` sorts the fitting nodes by its node policy (binpack: score ascending,
spread: descending), binds the last one, and ``genSuccessMsg`` writes
``"find fit node(<node>), <offered - fit> nodes not fit, <fit> nodes fit(<list>)"``, the
list being every fitting node as ``name:score`` (``%.2f``, the node score before the
pod: ``ComputeDefaultScore``) in that sorted order, joined by commas. The cases are
HAMi's format on tables, then the placer's list on small clusters, whose scores are
checked against :func:`hami.node_score` over the same cards as HAMi sees them.
"""

from __future__ import annotations

import msgspec
import pytest

from services.binder.events import filtering_succeed_message
from services.placement.engine import Placement
from services.placement.engine import hami as h
from shared.schemas import (
    FIT_NODES_MAX,
    AllocRequested,
    ContainerAsk,
    DeviceAsk,
    FilterSummary,
    FitNode,
)

from .util import cluster, node, place, placer, pod, req


def summary(offered: int, *nodes: tuple[str, float], fits: int | None = None) -> FilterSummary:
    listed = [FitNode(node=n, score=s) for n, s in nodes]
    return FilterSummary(offered=offered, fits=len(listed) if fits is None else fits, nodes=listed)


@pytest.mark.parametrize(
    ("chosen", "filtered", "want"),
    [
        # one node offered, empty: HAMi's score 0 to two decimals
        ("n1", summary(1, ("n1", 0.0)), "find fit node(n1), 0 nodes not fit, 1 nodes fit(n1:0.00)"),
        # three offered, two fit, binpack order (ascending): the chosen one last
        (
            "n1",
            summary(3, ("n2", 3.3333332538604736), ("n1", 13.625)),
            "find fit node(n1), 1 nodes not fit, 2 nodes fit(n2:3.33,n1:13.62)",
        ),
        # spread order (descending): the least used one last; %.2f rounds half to even
        # on an exact tie as Go's does (0.125 -> 0.12), and up past it (2.675000... ->)
        (
            "n3",
            summary(5, ("n1", 2.6750001907348633), ("n2", 0.125), ("n3", 0.0)),
            "find fit node(n3), 2 nodes not fit, 3 nodes fit(n1:2.68,n2:0.12,n3:0.00)",
        ),
        # more fit than are listed: the counts say all of them
        (
            "n9",
            summary(400, ("n8", 1.0), ("n9", 2.5), fits=300),
            "find fit node(n9), 100 nodes not fit, 300 nodes fit(n8:1.00,n9:2.50)",
        ),
        # a decision made outside the ranking (a move, a preemption): the chosen node only
        ("n1", None, "find fit node(n1), 1 nodes fit(n1)"),
    ],
)
def test_message_is_hamis_format(chosen: str, filtered: FilterSummary | None, want: str) -> None:
    assert filtering_succeed_message(chosen, filtered) == want


def hami_score(
    cards: int, used_slots: int, used_mem: int, used_cores: int, count: int, mem: int
) -> float:
    """The node score HAMi computes for a node of ``cards`` equal cards with this use."""
    cs = [h.Card(id=str(i), count=count, totalmem=mem, totalcore=100) for i in range(cards)]
    cs[0].used, cs[0].usedmem, cs[0].usedcores = used_slots, used_mem, used_cores
    return h.node_score(cs)


def kube(r: AllocRequested) -> AllocRequested:
    return msgspec.structs.replace(r, source="kube")


@pytest.mark.parametrize("policy", ["binpack", "spread"])
def test_placer_lists_every_fitting_node_in_hamis_order(policy: str) -> None:
    # a: one slice on it already; b: empty; c: cards too small for the ask
    cl = cluster(node("a", 2), node("b", 2), node("c", 1, 100))
    p = placer(cl, node_policy=policy)
    place(p, req(DeviceAsk(mem=5000, cores=30), node_name="a"))
    count = cl.nodes["a"].inv.devices[0].count
    got = p.decide(kube(req(DeviceAsk(mem=4000, cores=10))))
    assert isinstance(got, Placement), got
    score_a = hami_score(2, 1, 5000, 30, count, 10000)
    ranked = [("b", 0.0), ("a", score_a)]  # binpack: ascending, the busiest last
    want = ranked if policy == "binpack" else ranked[::-1]
    assert got.fits is not None and [n for n, _ in got.fits] == [n for n, _ in want]
    assert [s for _, s in got.fits] == pytest.approx([s for _, s in want]) and got.fit_count == 2
    assert got.node == want[-1][0]


def test_standalone_requests_carry_no_list() -> None:
    p = placer(cluster(node("a", 2), node("b", 2)))
    got = place(p, req(DeviceAsk(mem=4000, cores=10)))
    assert got.fits is None and got.fit_count == 0


def test_a_node_the_exact_stage_refused_is_not_listed() -> None:
    # d: one busy card; each container's ask fits it, both together do not. Binpack
    # tries d first (the highest score), refuses it, and binds a.
    cl = cluster(node("a", 2), node("d", 1))
    p = placer(cl)
    place(p, req(DeviceAsk(mem=1000, cores=1), node_name="d"))
    two = [ContainerAsk(name=f"c{i}", devices=[DeviceAsk(mem=5000, cores=10)]) for i in range(2)]
    got = place(p, kube(pod(*two)))
    assert got.node == "a" and got.fits == [("a", 0.0)] and got.fit_count == 1


def test_the_list_is_bounded_and_keeps_the_best() -> None:
    names = [f"n{i:03d}" for i in range(FIT_NODES_MAX + 4)]
    p = placer(cluster(*(node(n, 1) for n in names)))
    got = place(p, kube(req(DeviceAsk(mem=1000, cores=1))))
    assert got.fits is not None and len(got.fits) == FIT_NODES_MAX
    assert got.fit_count == len(names)
    # all equal: the chosen (smallest name) last, the others in the reverse name order
    assert [n for n, _ in got.fits] == sorted(names)[:FIT_NODES_MAX][::-1]


def test_a_node_another_policy_chose_is_listed_last() -> None:
    # random picks any fitting node; HAMi's message names the bound node last, the
    # others in binpack's order (HAMi's default)
    names = ["a", "b", "c", "d"]
    cl = cluster(*(node(n, 1) for n in names))
    p = placer(cl, node_policy="random", seed=3)
    for i, n in enumerate(names[1:], 1):
        place(p, req(DeviceAsk(mem=1000 * i, cores=1), node_name=n))
    chosen = set()
    for _ in range(6):
        got = p.decide(kube(req(DeviceAsk(mem=1000, cores=1))))
        assert isinstance(got, Placement) and got.fits is not None
        chosen.add(got.node)
        assert got.fits[-1][0] == got.node and got.fit_count == 4
        rest = got.fits[:-1]
        assert sorted(n for n, _ in rest) == sorted(set(names) - {got.node})
        assert [s for _, s in rest] == sorted(s for _, s in rest)
    assert len(chosen) > 1  # not only binpack's own choice
