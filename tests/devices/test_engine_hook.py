"""Placement and the codec consult the registry: a card of another family is offered only
to that family's asks, with that family's fit rules and reason codes."""

from __future__ import annotations

from typing import Any

from shared.devices.registry import REGISTRY
from shared.hami.codec import PodSpecError, pod_request
from shared.schemas import ContainerAsk, Device, DeviceAsk, NodeInventory
from tests.placement.util import cards_of, cluster, fail, place, placer, pod, req


def xpu_node(name: str) -> NodeInventory:
    return NodeInventory(
        node=name,
        devices=[
            Device(
                uuid=f"{name}-xpu-{i}", index=i, type="P800", vendor="XPU", count=4, devmem=98304
            )
            for i in range(8)
        ],
    )


def mixed() -> Any:
    return cluster(
        NodeInventory(
            node="gpu", devices=[Device(uuid="GPU-0", index=0, type="NVIDIA-A100", devmem=40960)]
        ),
        xpu_node("xpu"),
        NodeInventory(
            node="mt",
            devices=[
                Device(
                    uuid="mt-0",
                    index=0,
                    type="Mthreads",
                    vendor="Mthreads",
                    count=100,
                    devmem=49152,
                    devcore=16,
                ),
                Device(
                    uuid="mt-1",
                    index=1,
                    type="Mthreads",
                    vendor="Mthreads",
                    count=100,
                    devmem=49152,
                    devcore=16,
                ),
            ],
        ),
    )


def test_each_family_lands_on_its_own_cards() -> None:
    p = placer(mixed())
    g = place(p, req(DeviceAsk(nums=1, mem=1000)))
    assert g.node == "gpu"
    x = place(p, req(DeviceAsk(vendor="XPU", nums=1, mem=24576, cores=25)))
    assert x.node == "xpu" and x.containers[0].devices[0].vendor == "XPU"
    m = place(p, req(DeviceAsk(vendor="Mthreads", nums=1, mem=8 * 512, cores=4)))
    assert m.node == "mt"


def test_one_vxpu_size_per_card() -> None:
    p = placer(cluster(xpu_node("xpu")))
    half = DeviceAsk(vendor="XPU", nums=1, mem=49152, cores=50)
    quarter = DeviceAsk(vendor="XPU", nums=1, mem=24576, cores=25)
    first = cards_of(place(p, req(half)))[0][0]
    # the quarter goes elsewhere: the card holding a half takes halves only
    assert cards_of(place(p, req(quarter)))[0][0] != first
    assert cards_of(place(p, req(half)))[0][0] == first  # the second half joins the first


def test_moore_threads_pod_stays_on_one_card_and_reason_is_hamis() -> None:
    p = placer(mixed())
    a = ContainerAsk(name="a", devices=[DeviceAsk(vendor="Mthreads", nums=1, mem=4096, cores=4)])
    b = ContainerAsk(name="b", devices=[DeviceAsk(vendor="Mthreads", nums=1, mem=4096, cores=4)])
    got = place(p, pod(a, b))
    assert len({d.uuid for c in got.containers for d in c.devices}) == 1
    f = fail(p, req(DeviceAsk(vendor="Mthreads", nums=1, mem=4096, cores=17)))
    assert "CardInsufficientCore" in f.message


def test_a_pod_asks_several_families_through_the_codec() -> None:
    k8s: dict[str, Any] = {
        "metadata": {"uid": "u1", "name": "p", "namespace": "ns", "annotations": {}},
        "spec": {
            "containers": [
                {
                    "name": "gpu",
                    "resources": {"limits": {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000}},
                },
                {
                    "name": "xpu",
                    "resources": {
                        "limits": {"kunlunxin.com/vxpu": 1, "kunlunxin.com/vxpu-memory": 20000}
                    },
                },
            ]
        },
    }
    r = pod_request(k8s)
    assert [d.vendor for c in r.containers for d in c.devices] == ["NVIDIA", "XPU"]
    assert r.containers[1].devices[0] == DeviceAsk(vendor="XPU", nums=1, mem=24576, cores=25)
    got = placer(mixed()).decide(r)
    assert not hasattr(got, "node")  # one node has no GPU and XPU together
    k8s["spec"]["containers"][1]["resources"]["limits"]["nvidia.com/gpu"] = 1
    try:
        pod_request(k8s)
    except PodSpecError as exc:
        assert 'container "xpu" asks for NVIDIA and XPU' in str(exc)
    else:
        raise AssertionError("two families in one container must be refused")
    assert REGISTRY.family("XPU").vendor == "kunlunxin"


def _k8s_pod(limits: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "annotations": dict(annotations or {})},
        "spec": {"containers": [{"name": "main", "resources": {"limits": limits}}]},
    }


def test_webhook_runs_the_familys_admission() -> None:
    from services.binder.webhook import Refused, WebhookSettings, mutate_pod

    s = WebhookSettings()
    out = mutate_pod(_k8s_pod({"mthreads.com/vgpu": 1}), s)
    assert out is not None and out["spec"]["schedulerName"] == "hami-scheduler"
    lim = out["spec"]["containers"][0]["resources"]["limits"]
    assert lim == {
        "mthreads.com/vgpu": 1,
        "mthreads.com/sgpu-core": "16",
        "mthreads.com/sgpu-memory": "96",
    }
    assert "volumes" not in out["spec"]  # no HAMi-core slice for another vendor's card
    out = mutate_pod(_k8s_pod({"metax-tech.com/sgpu": 1}), s)
    assert out is not None and out["metadata"]["annotations"] == {
        "metax-tech.com/sgpu-qos-policy": "best-effort"
    }
    try:
        mutate_pod(_k8s_pod({"mthreads.com/vgpu": 1, "mthreads.com/sgpu-memory": 3}), s)
    except Refused as exc:
        assert 'container "main": mthreads.com/sgpu-memory must be one of 2, 4, 8' in str(exc)
    else:
        raise AssertionError("an illegal Moore Threads size must be refused")
    assert mutate_pod(_k8s_pod({"cpu": 1}), s) is None


def test_a_family_books_cores_in_its_cards_unit() -> None:
    amd = NodeInventory(
        node="amd",
        devices=[
            Device(
                uuid="amd-0",
                index=0,
                type="AMD Instinct MI300X VF",
                vendor="AMDGPU",
                count=10,
                devmem=196288,
                devcore=304,
            )
        ],
    )
    p = placer(cluster(amd))
    half = DeviceAsk(vendor="AMDGPU", nums=1, mem=4096, cores=50)
    assert cards_of(place(p, req(half))) == [("amd-0", 4096, 152)]  # 50 % of 304 compute units
    assert cards_of(place(p, req(half))) == [("amd-0", 4096, 152)]
    assert (
        "CardInsufficientCore"
        in fail(p, req(DeviceAsk(vendor="AMDGPU", nums=1, mem=4096, cores=1))).message
    )


def test_the_familys_annotations_reach_the_admission_patch() -> None:
    """What a family's admission sets on the pod (MetaX's default QoS policy) is in the
    patch the API server applies, not only in our copy of the pod."""
    import base64
    import json

    from services.binder.webhook import WebhookSettings, review
    from tests.fakekube.patch import apply_patch

    def patched(pod: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": pod}}
        resp = review(body, WebhookSettings())["response"]
        assert resp["allowed"], resp
        ops = json.loads(base64.b64decode(resp["patch"]))
        out: dict[str, Any] = apply_patch("application/json-patch+json", pod, ops)
        return out

    with_map = patched(_k8s_pod({"metax-tech.com/sgpu": 1}, {"team": "a"}))
    assert with_map["metadata"]["annotations"] == {"team": "a", "metax-tech.com/sgpu-qos-policy": "best-effort"}
    without = _k8s_pod({"metax-tech.com/sgpu": 1})
    del without["metadata"]["annotations"]
    assert patched(without)["metadata"]["annotations"] == {"metax-tech.com/sgpu-qos-policy": "best-effort"}
    # A policy the pod names is kept, and no op touches it.
    kept = patched(_k8s_pod({"metax-tech.com/sgpu": 1}, {"metax-tech.com/sgpu-qos-policy": "fixed-share"}))
    assert kept["metadata"]["annotations"] == {"metax-tech.com/sgpu-qos-policy": "fixed-share"}
