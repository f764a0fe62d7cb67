"""Enflame DRS slices, cases from HAMi's pkg/device/enflame/device_test.go (the DRS version).

Ported, every case of that file: TestGetNodeDevices_DRSAnnotation, Test_checkType (2),
TestGenerateResourceRequests, TestGenerateResourceRequests_ByMemoryCore,
TestFit_SelectProfileByRequest, TestFit_SelectProfileByMemoryCoreRequest,
TestMutateAdmission_ByMemoryCoreAPI, TestFit_ProfileNotFound, TestFit_MutexRejectsUsedDevice,
TestFit_UnhealthyDeviceRejected, TestPatchAnnotations_DRSFields, TestClampToInt32,
TestAddResourceUsage_ClampsOnOverflow, TestParseDRSCapacity_RejectsNaNAndInf,
TestReadCustomInfoInt_RejectsNaNAndInf, TestAddResourceUsage_ClampsOversizedSliceString,
TestFit_OversizedProfileRejected (4) and Test_GenerateResourceRequests_CoresValidation (7).
HAMi's AddResourceUsage (a card's used slots grow by the grant's slices) is :func:`book`
here, since our placer books grants itself. Also from the same package:
device_corebudget_test.go (every advertised slice schedulable), drs_reconstruction_test.go
(a profile needs all its slices free) and config_test.go (a pod naming the legacy
``enflame.com/vgcu`` is not claimed when the DRS name is ``enflame.com/drs-gcu``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from shared.devices import enflame
from shared.devices.base import INT32_MAX, Allocated, Ask, Card, Grant, PodInfo, RequestError
from shared.devices.registry import REGISTRY
from tests.devices.util import res

F = enflame.DRS
DRS_GCU, MEM, CORE = "enflame.com/drs-gcu", "enflame.com/gcu-memory", "enflame.com/gcu-core"
MENU = {"1g.6gb": "0", "3g.20gb": "1", "6g.40gb": "2"}


def drs_card(profiles: dict[str, str] | None = None, **kw: Any) -> Card:
    """HAMi's test card: 6 slices, 40960 MiB, the three-profile menu."""
    base: dict[str, Any] = {"index": 0, "count": 6, "totalmem": 40960, "type": "Enflame"}
    base.update(kw)
    custom = {"minor": "0", "index": "0", "profiles": dict(MENU if profiles is None else profiles)}
    return Card(id="node-a-enflame-drs-0", custom=custom, **base)


def book(card: Card, g: Grant) -> None:
    """HAMi's AddResourceUsage: the grant's slices, memory and cores (saturating)."""
    card.used = enflame.clamp_int32(card.used + enflame.slice_count(g))
    card.usedmem += g.usedmem
    card.usedcores += g.usedcores


def test_names_and_legacy_resources() -> None:
    assert (F.name, F.allocated_annotation) == ("Enflame", "hami.io/enflame-vgpu-devices-allocated")
    assert F.resources.all() == (DRS_GCU, MEM, CORE)
    assert F.register_annotation == "enflame.com/gcu-drs-capacity"
    # config_test.go: a pod written the legacy way is skipped when the name is drs-gcu
    assert REGISTRY.for_resource("enflame.com/vgcu") is None
    assert REGISTRY.for_resource("enflame.com/vgcu-percentage") is None
    assert F.parse(res({"enflame.com/vgcu": 2})) is None


def test_get_node_devices_drs_annotation() -> None:
    value = json.dumps({"devices": [{"index": "0", "minor": "0", "capacity": 6}], "profiles": MENU})
    cards = F.node_cards("node-a", {enflame.DRS_CAPACITY: value}, {})
    assert len(cards) == 1
    c = cards[0]
    assert (c.id, c.type, c.totalmem, c.count, c.totalcore) == (
        "node-a-enflame-drs-0",
        "Enflame",
        40960,
        6,
        100,
    )
    assert c.custom == {"minor": "0", "index": "0", "profiles": MENU, "maxSlice": 6}


@pytest.mark.parametrize(
    ("value", "err"),
    [
        (None, "annotation not found enflame.com/gcu-drs-capacity"),
        ("{", "failed to parse enflame.com/gcu-drs-capacity"),
        ('{"devices":[{"index":0,"capacity":6}],"profiles":{"1g.6gb":"0"}}', "failed to parse"),
        ('{"devices":[{"index":"0","capacity":6}],"profiles":{"1g.6gb":0}}', "failed to parse"),
        ('{"devices":[{"index":"0","capacity":6}],"profiles":{"big":"0"}}', "no valid drs prof"),
        ('{"devices":[{"index":"0","capacity":0}],"profiles":{"1g.6gb":"0"}}', "invalid drs cap"),
        ('{"devices":[],"profiles":{"1g.6gb":"0"}}', "no drs devices found on node n"),
    ],
    ids=["missing", "not json", "int index", "int id", "no profile", "capacity 0", "no devices"],
)
def test_get_node_devices_refuses(value: str | None, err: str) -> None:
    annos = {} if value is None else {enflame.DRS_CAPACITY: value}
    with pytest.raises(RequestError, match=err):
        F.node_cards("n", annos, {})


def test_get_node_devices_defaults() -> None:
    # no minor: the index; a bad index: the position; no memory in any profile: the slices
    value = '{"devices":[{"index":"x","capacity":"4"}],"profiles":{"2g.x":"0","4g.y":"1"}}'
    (c,) = F.node_cards("n", {enflame.DRS_CAPACITY: value}, {})
    assert (c.index, c.custom["minor"], c.count, c.totalmem) == (0, "0", 4, 4 * 1024)


@pytest.mark.parametrize(("family", "ok"), [("Enflame", True), ("test123", False)])
def test_check_type(family: str, ok: bool) -> None:
    assert F.type_ok(Card(id="x"), Ask(family, 1), PodInfo()) is ok


def test_generate_resource_requests_direct() -> None:
    assert F.parse(res({DRS_GCU: "3"})) == Ask("Enflame", 1, 3, enflame.MODE_DIRECT, 0)
    assert F.parse(res(None, {DRS_GCU: "3"})) == Ask("Enflame", 1, 3, enflame.MODE_DIRECT, 0)
    assert F.generate(res({DRS_GCU: INT32_MAX + 1})) is None  # too large: no request


def test_generate_resource_requests_by_memory_core() -> None:
    got = F.parse(res({MEM: "20480", CORE: "40"}))
    assert got == Ask("Enflame", 1, 20480, enflame.MODE_BY_SPEC, 40)
    assert F.parse(res({CORE: "40"})) == Ask("Enflame", 1, 0, enflame.MODE_BY_SPEC, 40)
    assert F.generate(res({})) is None


@pytest.mark.parametrize(
    ("cores", "wanted"),
    [(0, True), (50, True), (100, True), (101, False), (150, False), (200, False), (-1, False)],
)
def test_generate_resource_requests_cores_validation(cores: int, wanted: bool) -> None:
    got = F.generate(res({MEM: "20480", CORE: cores}))
    if wanted:
        assert got is not None and (got.nums, got.coresreq) == (1, cores)
    else:
        assert got is None


def test_mutate_admission_by_memory_core() -> None:
    r = res({MEM: "20480", CORE: "50"})
    assert F.asks_for(r)
    adm = F.admit(r, {})
    assert adm.resources["requests"] == {MEM: "20480", CORE: "50"}  # copied to requests
    assert F.admit(res({DRS_GCU: 2}), {}).resources["requests"] == {DRS_GCU: 2}


@pytest.mark.parametrize(
    ("limits", "err"),
    [
        ({DRS_GCU: 0}, "enflame.com/drs-gcu must be greater than 0"),
        ({MEM: 0}, "enflame.com/gcu-memory must be greater than 0"),
        ({MEM: 1024, CORE: 0}, r"enflame.com/gcu-core must be in range \(0,100\]"),
        ({CORE: 101}, r"must be in range \(0,100\]"),
    ],
)
def test_mutate_admission_refuses(limits: dict[str, Any], err: str) -> None:
    with pytest.raises(RequestError, match=err):
        F.parse(res(limits))


def test_fit_select_profile_by_request() -> None:
    got = F.fit([drs_card()], Ask("Enflame", 1, 3), PodInfo())
    assert got.ok and got.text == "" and len(got.grants) == 1
    g = got.grants[0]
    assert (g.usedmem, g.usedcores) == (20480, 50)
    assert g.custom is not None
    assert (g.custom["profileName"], g.custom["profileID"], g.custom["drsSlice"]) == (
        "3g.20gb",
        "1",
        3,
    )


def test_fit_select_profile_by_memory_core_request() -> None:
    ask = Ask("Enflame", 1, 20480, enflame.MODE_BY_SPEC, 40)  # 20480 MiB -> 20 GB, 40 %
    got = F.fit([drs_card()], ask, PodInfo())
    assert got.ok and got.text == ""
    g = got.grants[0]
    assert g.custom is not None
    assert (g.usedmem, g.usedcores, g.custom["profileName"], g.custom["profileID"]) == (
        20480,
        50,
        "3g.20gb",
        "1",
    )
    assert (g.custom["requestMem"], g.custom["requestCore"]) == (20, 40)


@pytest.mark.parametrize(
    ("memreq", "cores", "profile"),
    [(6, 0, "1g.6gb"), (7, 0, "3g.20gb"), (0, 51, "6g.40gb"), (6144, 0, "1g.6gb"), (41, 0, None)],
    ids=["6 GB", "7 GB", "51 %", "6144 MiB", "too big"],
)
def test_by_spec_picks_the_smallest_profile(memreq: int, cores: int, profile: str | None) -> None:
    got = F.fit([drs_card()], Ask("Enflame", 1, memreq, enflame.MODE_BY_SPEC, cores), PodInfo())
    name = got.grants[0].custom["profileName"] if got.ok and got.grants[0].custom else None
    assert name == profile
    if profile is None:
        assert got.text == "1/1 ModeNotFit"


def test_fit_profile_not_found() -> None:
    got = F.fit([drs_card({"1g.6gb": "0"})], Ask("Enflame", 1, 3), PodInfo())
    assert not got.ok and got.text == "1/1 ModeNotFit"
    # no profile on any card: the node cannot take a DRS ask at all
    two = [drs_card({}), drs_card({}, index=1)]
    assert F.fit(two, Ask("Enflame", 1, 1), PodInfo()).text == "1/2 ModeNotFit"


def test_fit_mutex_rejects_used_device() -> None:
    pod = PodInfo(annotations={"hami.io/gpu-scheduler-policy": "mutex"})
    got = F.fit([drs_card(count=2, used=1)], Ask("Enflame", 1, 3), pod)
    assert not got.ok and got.text == "1/1 ExclusiveDeviceAllocateConflict"


def test_fit_unhealthy_device_rejected() -> None:
    got = F.fit([drs_card(health=False)], Ask("Enflame", 1, 3), PodInfo())
    assert not got.ok and got.text == "1/1 CardNotHealth"


def test_fit_walks_last_to_first_with_reasons() -> None:
    a, b = drs_card(), drs_card(index=1)
    b.id = "node-a-enflame-drs-1"
    got = F.fit([a, b], Ask("Enflame", 1, 3), PodInfo())
    assert got.grants[0].uuid == "node-a-enflame-drs-1"
    b.usedmem = 40960 - 20479  # 1 MiB short of the profile's 20 GB
    a.usedcores = 51
    assert F.fit([a, b], Ask("Enflame", 1, 3), PodInfo()).text == (
        "1/2 CardInsufficientCore, 1/2 CardInsufficientMemory"
    )
    pod = PodInfo(annotations={"enflame.com/nouse-gpuuuid": "node-a-enflame-drs-0"})
    assert F.fit([a], Ask("Enflame", 1, 3), pod).text == "1/1 CardUuidMismatch"
    assert F.fit([a], Ask("GCU", 1, 3), PodInfo()).text == "1/1 CardTypeMismatch"


def test_patch_annotations_drs_fields() -> None:
    custom = {"minor": "0", "index": "0", "profileName": "3g.20gb", "profileID": "1", "drsSlice": 3}
    g = Grant(0, "node-a-enflame-drs-0", "Enflame", 20480, 50, custom)
    got = F.pod_annotations(PodInfo(), [[g]])
    assert (
        got["hami.io/enflame-vgpu-devices-allocated"] == "node-a-enflame-drs-0,Enflame,20480,50:;"
    )
    assert got[enflame.ASSIGNED] == "false"
    assert got[enflame.ASSIGNED_INDEX] == got[enflame.ASSIGNED_ID] == "0"
    assert got[enflame.ASSIGNED_MINOR] == "0"
    assert got[enflame.REQUEST_SIZE] == "3"
    assert json.loads(got[enflame.ASSIGNED_CONTAINERS]) == {
        "container-0": {
            "allocated": False,
            "request": 3,
            "profileID": "1",
            "profileName": "3g.20gb",
        }
    }
    assert F.pod_annotations(PodInfo(), [[]]) == {}


def test_patch_annotations_of_a_grant_without_custom_info() -> None:
    # a grant rebuilt from a placement decision carries no customInfo: one slice, and
    # the card's index names it
    got = F.pod_annotations(PodInfo(), [[], [Grant(2, "n-enflame-drs-2", "Enflame", 6144, 16)]])
    assert (got[enflame.ASSIGNED_ID], got[enflame.ASSIGNED_MINOR], got[enflame.REQUEST_SIZE]) == (
        "2",
        "2",
        "1",
    )
    assert got[enflame.ASSIGNED_CONTAINERS] == '{"container-1":{"allocated":false,"request":1}}'


def test_clamp_to_int32() -> None:
    assert enflame.clamp_int32(5) == 5
    assert enflame.clamp_int32((1 << 63) - 1) == INT32_MAX
    assert enflame.clamp_int32(-(1 << 63)) == -(1 << 31)


@pytest.mark.parametrize("slices", [INT32_MAX, "2147483648"], ids=["int", "oversized string"])
def test_add_resource_usage_clamps_on_overflow(slices: Any) -> None:
    card = Card(id="x")
    g = Grant(0, "x", "Enflame", 0, 0, {"drsSlice": slices})
    book(card, g)
    assert card.used == INT32_MAX
    book(card, g)
    assert card.used == INT32_MAX


def test_parse_drs_capacity_rejects_nan_and_inf() -> None:
    for bad in (math.nan, math.inf, 1e300):
        with pytest.raises(ValueError):
            enflame.parse_capacity(bad)
    assert enflame.parse_capacity(42.0) == 42
    assert enflame.parse_capacity("2147483648") == INT32_MAX


def test_read_custom_info_int_rejects_nan_and_inf() -> None:
    for bad in (math.nan, -math.inf, 1e300):
        assert enflame.custom_int({"k": bad}, "k") == 0
    assert enflame.custom_int({"k": 7.0}, "k") == 7
    assert enflame.custom_int({"k": "7"}, "k") == 7


@pytest.mark.parametrize(
    ("custom", "profiles"),
    [
        ({}, {"4294967299g.4294967299gb": "0"}),
        ({}, {"4294967299g.20gb": "0"}),
        ({}, {"2g.4294967299gb": "0"}),
        ({"maxSlice": "1"}, {"2147483647g.20gb": "0"}),  # core share beyond int32
    ],
    ids=["both", "slices", "memory", "core share"],
)
def test_fit_oversized_profile_rejected(custom: dict[str, Any], profiles: dict[str, str]) -> None:
    card = drs_card(profiles)
    card.custom.update(custom)
    got = F.fit([card], Ask("Enflame", 1, 3, 101), PodInfo())
    assert not got.ok and got.grants == [] and got.text == "1/1 ModeNotFit"


def test_every_advertised_slice_is_schedulable() -> None:
    card = drs_card(totalcore=100)
    for i in range(6):
        got = F.fit([card], Ask("Enflame", 1, 1), PodInfo())
        assert got.ok, (i, got.text)
        book(card, got.grants[0])
    assert card.used == 6
    assert not F.fit([card], Ask("Enflame", 1, 1), PodInfo()).ok  # now really full
    mixed = drs_card(totalcore=100)
    for size in (3, 1, 1, 1):
        got = F.fit([mixed], Ask("Enflame", 1, size), PodInfo())
        assert got.ok, (size, got.text)
        book(mixed, got.grants[0])
    assert mixed.used == 6


def test_partial_capacity_rejects_a_larger_profile() -> None:
    card = drs_card(totalmem=400000, totalcore=0, used=4)  # 2 of 6 slices free
    assert F.fit([card], Ask("Enflame", 1, 3), PodInfo()).text == "1/1 CardTimeSlicingExhausted"
    got = F.fit([card], Ask("Enflame", 1, 1), PodInfo())
    assert got.ok and enflame.slice_count(got.grants[0]) == 1


def test_allocate_names_the_card_and_its_drs_instance() -> None:
    assert F.allocate([Allocated("u", 1, instance="abc")]).envs == {
        "ENFLAME_VISIBLE_DEVICES": "1",
        "TOPS_VISIBLE_DEVICES": "DRS-abc",
    }
    assert F.allocate([Allocated("u", 0)]).envs == {"ENFLAME_VISIBLE_DEVICES": "0"}
