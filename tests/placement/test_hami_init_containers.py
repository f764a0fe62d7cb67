"""Init containers fit as HAMi v2.10's ``scoreNode`` fits them.

HAMi fits each init container on its own copy of the node as it is (``allocateInitContainers``:
a fresh ``DeepCopy`` per init container), so init containers are summed neither with each
other nor with the app containers, which are fitted, one after another, on another copy of
the node as it is. The pod then books, per card, the larger of the init peak and the app
sum (``CollapseInitContainerUsage``). An init container that fits no card fails the node
with that container's reason text. Cases built from those rules on one- and two-card nodes.
"""

from __future__ import annotations

import pytest

from services.placement.engine import Placement
from shared.config import Config
from shared.hami.codec import pod_request
from shared.schemas import CardGrant, ContainerAsk, ContainerGrant, DeviceAsk, card_usage

from .util import cards_of, cluster, fail, node, place, placer, pod


def whole(name: str, init: bool) -> ContainerAsk:
    return ContainerAsk(name=name, init=init, devices=[DeviceAsk(mem=10000, cores=100)])


def test_init_and_app_asks_are_not_summed() -> None:
    # two init containers and one app container, each the whole card: one card holds them
    p = placer(cluster(node("a", 1)))
    got = place(p, pod(whole("i1", True), whole("i2", True), whole("c", False)))
    assert [d.uuid for c in got.containers for d in c.devices] == ["GPU-a-0"] * 3
    card = p.cluster.status().nodes[0].cards[0]
    assert (card.used_mem, card.used_cores, card.used_slots) == (10000, 100, 1)


def test_app_containers_are_summed_with_each_other_not_with_init() -> None:
    p = placer(cluster(node("a", 1)))
    half = [DeviceAsk(mem=6000, cores=10)]
    r = pod(
        ContainerAsk(name="i", init=True, devices=half),
        ContainerAsk(name="c1", devices=half),
        ContainerAsk(name="c2", devices=half),
    )
    f = fail(p, r)  # 12000 MiB of app containers on one 10000 MiB card
    assert f.reasons == {"CardInsufficientMemory": 1}


def test_an_init_container_that_fits_no_card_fails_the_node_with_its_reason() -> None:
    p = placer(cluster(node("a", 2)))
    r = pod(
        ContainerAsk(name="i", init=True, devices=[DeviceAsk(mem=20000, cores=10)]),
        ContainerAsk(name="c", devices=[DeviceAsk(mem=1000, cores=10)]),
    )
    f = fail(p, r)
    assert f.reasons == {"CardInsufficientMemory": 1}
    assert f.message == "0/1 nodes are available: 1 CardInsufficientMemory"


def test_the_app_container_picks_as_if_no_init_container_ran() -> None:
    # binpack on two cards, one fuller: the init container and the app container each
    # see the node as it is, so both take the fuller card (the init one does not push
    # the app container away, nor its booking make the card look fuller)
    def fresh() -> Placement:
        p = placer(cluster(node("a", 2)), gpu_policy="binpack")
        place(
            p,
            pod(
                ContainerAsk(name="x", devices=[DeviceAsk(mem=2000, cores=10)]),
                node_name="a",
                use_uuids=["GPU-a-0"],
            ),
        )
        return place(
            p,
            pod(
                ContainerAsk(name="i", init=True, devices=[DeviceAsk(mem=8000, cores=10)]),
                ContainerAsk(name="c", devices=[DeviceAsk(mem=8000, cores=10)]),
            ),
        )

    got = fresh()
    assert cards_of(got) == [("GPU-a-0", 8000, 10), ("GPU-a-0", 8000, 10)]


# -------------------------------------------------- the booking: CollapseInitContainerUsage


def g(mem: int, cores: int, uuid: str = "GPU-0") -> list[CardGrant]:
    return [CardGrant(uuid=uuid, mem=mem, cores=cores)]


@pytest.mark.parametrize(
    ("containers", "want"),
    [
        # init peak against the app sum, each dimension on its own; a slot per app container
        ([ContainerGrant(init=True, devices=g(8000, 80)), ContainerGrant(devices=g(3000, 30)),
          ContainerGrant(devices=g(4000, 30))], (8000, 80, 2)),
        # init containers only: their peak and one slot
        ([ContainerGrant(init=True, devices=g(1000, 10)), ContainerGrant(init=True, devices=g(2000, 5))],
         (2000, 10, 1)),
        # a sidecar keeps running: under the later init container and beside the app one
        ([ContainerGrant(init=True, sidecar=True, devices=g(2000, 10)),
          ContainerGrant(init=True, devices=g(7000, 50)), ContainerGrant(devices=g(3000, 20))],
         (9000, 60, 2)),
        ([ContainerGrant(init=True, sidecar=True, devices=g(2000, 10)), ContainerGrant(devices=g(3000, 20))],
         (5000, 30, 2)),
        # an init container before the sidecar does not see it
        ([ContainerGrant(init=True, devices=g(7000, 50)),
          ContainerGrant(init=True, sidecar=True, devices=g(2000, 10)), ContainerGrant(devices=g(3000, 20))],
         (7000, 50, 2)),
    ],
)
def test_card_usage_as_collapse_init_container_usage(
    containers: list[ContainerGrant], want: tuple[int, int, int]
) -> None:
    assert card_usage(containers) == {"GPU-0": want}


def test_a_restart_always_init_container_is_a_sidecar() -> None:
    cfg = Config()
    lim = {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}}
    spec = {
        "initContainers": [
            {"name": "side", "restartPolicy": "Always", "resources": lim},
            {"name": "setup", "resources": lim},
        ],
        "containers": [{"name": "main", "resources": lim}],
    }
    got = pod_request({"metadata": {"name": "p", "uid": "u"}, "spec": spec}, cfg.node, cfg.resources, now=0.0)
    assert [(c.name, c.init, c.sidecar) for c in got.containers] == [
        ("side", True, True),
        ("setup", True, False),
        ("main", False, False),
    ]
    # and the grant carries it, so the ledger books it beside the app container
    p = placer(cluster(node("a", 1)))
    pl = place(p, got)
    assert [(c.name, c.sidecar) for c in pl.containers] == [("side", True), ("setup", False), ("main", False)]
    card = p.cluster.status().nodes[0].cards[0]
    assert (card.used_mem, card.used_slots) == (2000, 2)
