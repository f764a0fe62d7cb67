"""Iluvatar CoreX, cases from HAMi's pkg/device/iluvatar/device_test.go.

Ported: TestGetNodeDevices, TestPatchAnnotations, Test_MutateAdmission, Test_checkType,
Test_GenerateResourceRequests, TestFit_MutexRejectsUsedDevice and Test_Fit. HAMi's
tests configure the MR-V100 chip (commonWord ``MR-V100``), one of our default chips.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import iluvatar
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from shared.hami.annotations import AnnotationError
from tests.devices.util import res

F = iluvatar.family("MR-V100")
VGPU, MEM, CORE = (
    "iluvatar.ai/MR-V100-vgpu",
    "iluvatar.ai/MR-V100.vMem",
    "iluvatar.ai/MR-V100.vCore",
)
REGISTER = "hami.io/node-MR-V100-register"
MUTEX = {"hami.io/gpu-scheduler-policy": "mutex"}


def ilu(id: str = "dev-0", **kw: Any) -> Card:
    base: dict[str, Any] = {"count": 100, "totalmem": 128, "totalcore": 100, "type": "MR-V100"}
    base.update(kw)
    return Card(id=id, **base)


def test_names_follow_the_common_word() -> None:
    assert F.register_annotation == REGISTER
    assert (F.use_uuid_annotation, F.nouse_uuid_annotation) == (
        "hami.io/use-MR-V100-uuid",
        "hami.io/no-use-MR-V100-uuid",
    )
    assert F.handshake_annotation == "hami.io/node-handshake-MR-V100"


def test_get_node_devices() -> None:
    value = "GPU-bad51c5a-ed4c-591d-91bf-c04a12e19eae,10,8192,100,MR-V100,0,true:"
    cards = F.node_cards("node-01", {REGISTER: value}, {})
    assert [
        (c.id, c.index, c.count, c.totalcore, c.totalmem, c.type, c.numa, c.health) for c in cards
    ] == [("GPU-bad51c5a-ed4c-591d-91bf-c04a12e19eae", 0, 10, 100, 8192, "MR-V100", 0, True)]


@pytest.mark.parametrize(
    "annos",
    [
        {REGISTER: "[]"},  # no device
        {},  # no annotation
        {REGISTER: ""},  # failed to unmarshal
    ],
)
def test_get_node_devices_errors(annos: dict[str, str]) -> None:
    with pytest.raises((RequestError, AnnotationError)):
        F.node_cards("n", annos, {})


def test_patch_annotations() -> None:
    assert F.pod_annotations(PodInfo(), []) == {}
    got = F.pod_annotations(PodInfo(), [[Grant(0, "k8s-gpu-iluvatar-0", "MR-V100", 0, 0)]])
    assert got == {
        "hami.io/MR-V100-devices-to-allocate": "k8s-gpu-iluvatar-0,MR-V100,0,0:;",
        "hami.io/MR-V100-devices-allocated": "k8s-gpu-iluvatar-0,MR-V100,0,0:;",
    }


def test_mutate_admission_sets_cores_for_many_cards() -> None:
    r = res({VGPU: 2, CORE: 1})
    assert F.asks_for(r)
    assert F.admit(r, {}).resources["limits"][CORE] == 200  # count x 100
    assert F.admit(res({VGPU: 1, CORE: 1}), {}).resources["limits"][CORE] == 1


@pytest.mark.parametrize(("req_type", "want"), [("MR-V100", True), ("test123", False)])
def test_check_type(req_type: str, want: bool) -> None:
    got = F.fit([ilu()], Ask(req_type, 1, 64, 0, 50), PodInfo())
    assert got.ok is want
    if not want:
        assert got.text == "1/1 CardTypeMismatch"


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (
            res({VGPU: "1", MEM: "1000", CORE: "100"}, {VGPU: "1", MEM: "1000", CORE: "100"}),
            Ask("MR-V100", 1, 256000, 0, 100),  # vMem is in 256 MiB units
        ),
        (res({}, {}), None),
        (res({VGPU: "1"}, {VGPU: "1"}), Ask("MR-V100", 1, 0, 100, 0)),
    ],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


@pytest.mark.parametrize("mem", ["16Gi", "8388608"])
def test_memory_overflowing_int32_is_rejected(mem: str) -> None:
    # HAMi refuses the request rather than wrapping Memreq to 0 (which would let the pod
    # onto a full card); ours refuses it with the resource named. 8388608 x 256 = 2^31.
    with pytest.raises(RequestError, match="MR-V100.vMem"):
        F.parse(res({VGPU: "1", MEM: mem}))
    assert F.parse(res({VGPU: "1", MEM: "8388607"})) == Ask("MR-V100", 1, 8388607 * 256, 0, 0)


def test_fit_mutex_rejects_used_device() -> None:
    got = F.fit([ilu(used=1)], Ask("MR-V100", 1, 64, 0, 50), PodInfo(annotations=MUTEX))
    assert not got.ok and got.text == "1/1 ExclusiveDeviceAllocateConflict"


FIT_CASES: list[tuple[str, list[Card], Ask, dict[str, str], list[str] | None]] = [
    ("fit success", [ilu("dev-0"), ilu("dev-1")], Ask("MR-V100", 1, 64, 0, 50), {}, ["dev-1"]),
    ("memory not enough", [ilu()], Ask("MR-V100", 1, 512, 0, 50), {}, None),
    ("core not enough", [ilu(usedcores=100)], Ask("MR-V100", 1, 512, 0, 50), {}, None),
    ("type mismatch", [ilu()], Ask("OtherType", 1, 512, 0, 50), {}, None),
    (
        "mutex rejects used device",
        [ilu(used=1, count=2)],
        Ask("MR-V100", 1, 64, 0, 50),
        MUTEX,
        None,
    ),
]


@pytest.mark.parametrize(
    ("cards", "ask", "annos", "want"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES]
)
def test_fit(cards: list[Card], ask: Ask, annos: dict[str, str], want: list[str] | None) -> None:
    got = F.fit(cards, ask, PodInfo(annotations=annos))
    assert got.ok is (want is not None)
    assert [g.uuid for g in got.grants] == (want or [])
