"""AMD GPUs, cases from HAMi's pkg/device/amd/device_test.go.

Ported: Test_MutateAdmission (count-named cases), Test_GetNodeDevices,
Test_PatchAnnotations, Test_checkType, Test_GenerateResourceRequests, TestDevices_Fit
(whole cards, CU mapping and WGP rounding, reasons), TestCheckAMDType and
TestMemoryPercentage (count-named cases). HAMi's tests configure the memory and core
resources as ``amd.com/gpu-mem`` / ``amd.com/gpu-core-pct`` in some functions and as
``amd.com/gpumem`` / ``amd.com/gpucores`` in others; ours are the latter.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import amd
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from tests.devices.util import res

F = amd.FAMILY
GPU, MEM, PCT, CORES = (
    "amd.com/gpu",
    "amd.com/gpumem",
    "amd.com/gpumem-percentage",
    "amd.com/gpucores",
)
USE, NOUSE = "amd.com/use-gputype", "amd.com/nouse-gputype"


def gpu(id: str = "dev-0", **kw: Any) -> Card:
    base: dict[str, Any] = {"count": 2, "totalmem": 1000, "totalcore": 100, "type": "AMDGPU"}
    base.update(kw)
    return Card(id=id, **base)


@pytest.mark.parametrize(
    ("limits", "found"), [({GPU: 2}, True), ({GPU: 1, MEM: 1024}, True), ({}, False)]
)
def test_mutate_admission(limits: dict[str, Any], found: bool) -> None:
    assert F.asks_for(res(limits)) is found


@pytest.mark.parametrize("cores", [0, 101])
def test_mutate_admission_rejects_core_share_out_of_range(cores: int) -> None:
    with pytest.raises(RequestError, match="between 1 and 100"):
        F.parse(res({GPU: 1, CORES: cores}))


def test_get_node_devices() -> None:
    value = '[{"id":"GPU-0","index":0,"count":1,"devmem":8192,"devcore":100,"type":"amd","numa":0,"health":true}]'
    cards = F.node_cards("node-1", {F.register_annotation: value}, {})
    assert [(c.id, c.type) for c in cards] == [("GPU-0", "amd")]
    with pytest.raises(RequestError, match="annos not found"):
        F.node_cards("node-2", {}, {})


def test_patch_annotations() -> None:
    got = F.pod_annotations(
        PodInfo(), [[Grant(0, "test1", "AMDGPU", 100, 3), Grant(1, "test2", "AMDGPU", 200, 4)]]
    )
    text = "test1,AMDGPU,100,3:test2,AMDGPU,200,4:;"
    assert got[F.to_allocate_annotation] == text and got[F.allocated_annotation] == text


def test_check_type() -> None:
    card = gpu(type="AMD-MI300X")
    ask = Ask("AMDGPU", 1, 100, 0, 10)
    assert F.fit([card], ask, PodInfo()).ok
    assert F.fit([card], ask, PodInfo(annotations={USE: "MI250"})).text == "1/1 CardTypeMismatch"
    assert F.fit([card], Ask("other", 1, 100, 0, 10), PodInfo()).text == "1/1 CardTypeMismatch"


def test_generate_limits_first() -> None:
    r = res({GPU: 2, MEM: 4096, CORES: 33}, {GPU: 99, MEM: 99, CORES: 99})
    assert F.parse(r) == Ask("AMDGPU", 2, 4096, 0, 33)
    assert F.parse(res({MEM: 4096, CORES: 33})) is None  # no count


def test_generate_omitted_core_share_is_the_whole_card() -> None:
    got = F.parse(res({GPU: 1, MEM: 4096}))
    assert got is not None and got.coresreq == 100
    got = F.parse(res({GPU: 1}, {CORES: 42}))  # the share read from requests
    assert got is not None and got.coresreq == 42


@pytest.mark.parametrize("cores", [1, 50, 100])
def test_generate_core_share_in_range(cores: int) -> None:
    got = F.parse(res({GPU: 1, CORES: cores}))
    assert got is not None and got.coresreq == cores


@pytest.mark.parametrize("cores", [0, 101, 150, 200, -1, "50m", "99.1"])
def test_generate_core_share_out_of_range(cores: Any) -> None:
    with pytest.raises(RequestError, match="out of range"):
        F.parse(res({GPU: 1, CORES: cores}))


def test_generate_zero_count_asks_nothing() -> None:
    assert F.parse(res({GPU: 0})) is None


@pytest.mark.parametrize(
    ("name", "value"), [(GPU, 2**31), (MEM, -1), (MEM, 2**31)], ids=["count", "neg mem", "big mem"]
)
def test_generate_rejects_out_of_range_numbers(name: str, value: int) -> None:
    limits: dict[str, Any] = {GPU: 1, name: value}
    with pytest.raises(RequestError):
        F.parse(res(limits))


def test_fit_two_whole_cards() -> None:
    cards = [gpu("dev-0", index=0, count=2), gpu("dev-1", index=1, count=12)]
    got = F.fit(cards, Ask("AMDGPU", 2), PodInfo())  # neither MiB nor a percentage
    assert got.ok and [g.uuid for g in got.grants] == ["dev-1", "dev-0"]
    assert (got.grants[0].usedmem, got.grants[0].usedcores) == (1000, 100)


def test_fit_core_share_maps_per_card() -> None:
    cards = [gpu("dev-0", totalcore=10), gpu("dev-1", index=1, count=12)]
    got = F.fit(cards, Ask("AMDGPU", 1, 500, 0, 50), PodInfo())
    assert got.ok and got.grants[0].uuid == "dev-1"
    assert (got.grants[0].usedmem, got.grants[0].usedcores) == (500, 50)


# "rounds cores up to whole WGPs on RDNA": (CUs, CUs used, share, customInfo, CUs booked)
@pytest.mark.parametrize(
    ("total", "used", "share", "info", "want"),
    [
        (64, 0, 5, {"cuPerWGP": 2.0}, 4),  # rdna odd cores
        (64, 0, 5, {}, 3),  # cdna keeps single CUs
        (2, 0, 50, {"cuPerWGP": 2.0}, 2),  # one-WGP APU
        (4, 0, 75, {"cuPerWGP": float(2**31 - 1)}, 4),  # a huge WGP size does not overflow
        (64, 0, 5, {"cuPerWGP": 2.5}, 3),  # a fractional WGP size is ignored
        (2, 2, 50, {"cuPerWGP": 2.0}, None),  # the APU's WGP is taken
        (64, 0, 1, {}, 1),  # a positive share books at least one CU
    ],
)
def test_fit_cus(total: int, used: int, share: int, info: dict[str, Any], want: int | None) -> None:
    card = gpu(count=10, totalcore=total, usedcores=used, custom=info)
    got = F.fit([card], Ask("AMDGPU", 1, 100, 0, share), PodInfo())
    assert got.ok is (want is not None)
    if want is not None:
        assert got.grants[0].usedcores == want


@pytest.mark.parametrize(
    ("card", "ask", "annos", "reason"),
    [
        (gpu(usedmem=900), Ask("AMDGPU", 1, 500, 0, 10), {}, "CardInsufficientMemory"),
        (gpu(totalcore=10, usedcores=9), Ask("AMDGPU", 1, 100, 0, 100), {}, "CardInsufficientCore"),
        (
            gpu("dev-1"),
            Ask("AMDGPU", 1, 100, 0, 10),
            {"amd.com/use-gpu-uuid": "dev-0"},
            "CardUuidMismatch",
        ),
        (gpu(used=2), Ask("AMDGPU", 1, 100, 0, 10), {}, "CardTimeSlicingExhausted"),
    ],
    ids=["memory", "core", "uuid", "time slicing"],
)
def test_fit_reasons(card: Card, ask: Ask, annos: dict[str, str], reason: str) -> None:
    got = F.fit([card], ask, PodInfo(annotations=annos))
    assert not got.ok and got.text == f"1/1 {reason}"


@pytest.mark.parametrize(
    ("annos", "card_type", "want"),
    [
        ({}, "MI300X", True),
        ({USE: "MI300"}, "MI300X", True),
        ({USE: "MI250"}, "MI300X", False),
        ({NOUSE: "MI300"}, "MI300X", False),
        ({NOUSE: "MI250"}, "MI300X", True),
        ({NOUSE: ""}, "MI300X", True),  # an empty nouse list excludes nothing
        ({USE: ""}, "MI300X", True),
        ({NOUSE: "   "}, "MI300X", True),
        ({USE: "   "}, "MI300X", True),
        ({NOUSE: "MI250,"}, "MI300X", True),  # a blank member matches no card
        ({NOUSE: ",MI250"}, "MI300X", True),
        ({NOUSE: " MI250 , "}, "MI250X", False),
        ({NOUSE: ", "}, "MI300X", True),
        ({USE: "MI300,"}, "MI250X", False),
        ({USE: ", "}, "MI300X", False),  # a use list of only blanks admits nothing
    ],
)
def test_check_amd_type(annos: dict[str, str], card_type: str, want: bool) -> None:
    got = F.fit([gpu(type=card_type)], Ask("AMDGPU", 1, 100, 0, 10), PodInfo(annotations=annos))
    assert got.ok is want


@pytest.mark.parametrize("bad", ["101", "-1", "1500m"])
def test_memory_percentage_out_of_range(bad: str) -> None:
    with pytest.raises(RequestError, match="must be an integer between 0 and 100"):
        F.parse(res({GPU: 1, PCT: bad}))


def test_memory_percentage_carried_and_zero_ignored() -> None:
    assert F.parse(res({GPU: 1, PCT: "40"})) == Ask("AMDGPU", 1, 0, 40, 100)
    assert F.parse(res({GPU: 1, PCT: "0"})) == Ask("AMDGPU", 1, 0, 100, 100)  # 0: none given


def test_fit_percentage_is_memory_per_card() -> None:
    card = gpu(count=4, totalmem=16384)
    got = F.fit([card], Ask("AMDGPU", 1, 0, 25, 50), PodInfo())
    assert got.ok and got.grants[0].usedmem == 4096
    got = F.fit([card], Ask("AMDGPU", 1, 1024, 25, 50), PodInfo())  # MiB win
    assert got.ok and got.grants[0].usedmem == 1024
    got = F.fit([card], Ask("AMDGPU", 1, 0, 100, 50), PodInfo())
    assert got.ok and got.grants[0].usedmem == 16384
    card.usedmem = 14000
    assert (
        F.fit([card], Ask("AMDGPU", 1, 0, 25, 50), PodInfo()).text == "1/1 CardInsufficientMemory"
    )
    tiny = gpu(count=4, totalmem=50)
    got = F.fit([tiny], Ask("AMDGPU", 1, 0, 1, 50), PodInfo())
    assert got.ok and got.grants[0].usedmem == 1  # a tiny share still books memory


def test_fit_unhealthy_card_is_refused() -> None:
    got = F.fit([gpu(health=False)], Ask("AMDGPU", 1, 100, 0, 10), PodInfo())
    assert not got.ok and got.text == "1/1 CardNotHealth"
