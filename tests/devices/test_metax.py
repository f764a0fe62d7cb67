"""MetaX sGPU, cases from HAMi's pkg/device/metax/sdevice_test.go."""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import metax
from shared.devices.base import Ask, Grant, PodInfo, RequestError
from shared.devices.registry import REGISTRY
from tests.devices.util import card, res

F = metax.FAMILY
SGPU, VCORE, VMEM = "metax-tech.com/sgpu", "metax-tech.com/vcore", "metax-tech.com/vmemory"
QOS, APP = metax.QOS_POLICY, metax.APP_CLASS
ERR_QOS = f"{QOS} must be set one of [best-effort, fixed-share, burst-share]"


# TestMutateAdmission: (limits, pod annotations, found, error, annotations the webhook adds)
@pytest.mark.parametrize(
    ("limits", "annos", "found", "error", "added"),
    [
        ({}, {QOS: "best-effort"}, False, "", {}),
        ({SGPU: "1"}, {QOS: "best-effortx"}, True, ERR_QOS, {}),
        ({SGPU: "1"}, {}, True, "", {QOS: "best-effort"}),
        ({SGPU: "1"}, {}, True, "", {QOS: "best-effort"}),  # annotations nil
        ({SGPU: "1"}, {QOS: "burst-share"}, True, "", {}),
        ({SGPU: "2"}, {APP: "online"}, True, "app-class pod must request single device", {}),
        ({SGPU: "1"}, {APP: "oNLine"}, True, f"{APP} must be set one of [online, offline]", {}),
        ({SGPU: "1"}, {APP: "offline", QOS: "best-effortx"}, True, ERR_QOS, {}),
        ({SGPU: "1"}, {APP: "online", QOS: "best-effortx"}, True, "", {}),
    ],
)
def test_admission(
    limits: dict[str, Any], annos: dict[str, str], found: bool, error: str, added: dict[str, str]
) -> None:
    r = res(limits)
    assert F.asks_for(r) is found
    if not found:
        return
    if error:
        with pytest.raises(RequestError) as exc:
            F.admit(r, annos)
        assert str(exc.value) == error
    else:
        assert F.admit(r, annos).annotations == added


@pytest.mark.parametrize(
    ("limits", "want"),
    [
        ({SGPU: "1"}, Ask("Metax-SGPU", 1, 0, 100, 100)),
        ({SGPU: "2"}, Ask("Metax-SGPU", 2, 0, 100, 100)),
        ({SGPU: "1", VCORE: "30"}, Ask("Metax-SGPU", 1, 0, 100, 30)),
        ({SGPU: "1", VMEM: "16"}, Ask("Metax-SGPU", 1, 16 * 1024, 0, 100)),
        ({SGPU: "1", VCORE: "60", VMEM: "16"}, Ask("Metax-SGPU", 1, 16 * 1024, 0, 60)),
        ({SGPU: "1", VCORE: "60", VMEM: "1024Mi"}, Ask("Metax-SGPU", 1, 1024, 0, 60)),
        ({SGPU: "1", VCORE: "60", VMEM: "16Gi"}, Ask("Metax-SGPU", 1, 16 * 1024, 0, 60)),
    ],
)
def test_generate(limits: dict[str, Any], want: Ask) -> None:
    assert F.generate(res(limits)) == want


def test_register_decoding() -> None:
    value = (
        '[{"uuid": "GPU-123", "model": "sgpu", "totalDevCount": 16, "totalCompute": 100, '
        '"bdf": "0000:44:00.0", "totalVRam" : 32768, "numa": 1, "healthy": true, "qosPolicy": "fixed-share"}]'
    )
    (c,) = F.node_cards("normal", {F.register_annotation: value}, {})
    assert (c.id, c.count, c.totalcore, c.totalmem, c.numa, c.health) == (
        "GPU-123",
        16,
        100,
        32768,
        1,
        True,
    )
    assert c.custom["QosPolicy"] == "fixed-share"
    for bad in ({}, {F.register_annotation: ""}, {F.register_annotation: "[]"}):
        with pytest.raises(RequestError):
            F.node_cards("normal", bad, {})


@pytest.mark.parametrize(
    ("used", "dev_qos", "cores", "want"),
    [
        (0, "burst-share", 50, True),
        (2, "burst-share", 100, True),
        (2, "burst-share", 50, False),
        (2, "best-effort", 50, True),
    ],
)
def test_check_device_qos(used: int, dev_qos: str, cores: int, want: bool) -> None:
    c = card("GPU-123", "Metax-SGPU", used=used, custom={"QosPolicy": dev_qos})
    assert metax.qos_ok("best-effort", c, Ask("Metax-SGPU", 1, 0, 0, cores)) is want


def test_fit_qos_mismatch_is_a_reason() -> None:
    busy = card(
        "GPU-1",
        "Metax-SGPU",
        count=16,
        used=1,
        totalmem=32768,
        usedmem=1024,
        usedcores=10,
        custom={"QosPolicy": "burst-share"},
    )
    pod = PodInfo(annotations={QOS: "best-effort"})
    got = F.fit([busy], Ask("Metax-SGPU", 1, 1024, 0, 10), pod)
    assert not got.ok and got.text == "1/1 CardQosPolicyMismatch"
    idle = card(
        "GPU-2", "Metax-SGPU", count=16, totalmem=32768, custom={"QosPolicy": "burst-share"}
    )
    got = F.fit([idle, busy], Ask("Metax-SGPU", 1, 1024, 0, 10), pod)
    assert got.ok and got.grants[0].uuid == "GPU-2"
    ann = F.pod_annotations(pod, [[got.grants[0]]])
    assert ann[metax.ALLOCATED_SDEVICES] == '[[{"uuid":"GPU-2","compute":10,"vRam":1024}]]'


def test_registry_parses_with_the_pods_annotations() -> None:
    pod = {
        "metadata": {"annotations": {QOS: "nope"}},
        "spec": {"containers": [{"name": "a", "resources": {"limits": {SGPU: 1}}}]},
    }
    with pytest.raises(ValueError, match='container "a": ' + QOS):
        REGISTRY.pod_asks(pod)
    assert Grant  # (imported for the typed helper above)
