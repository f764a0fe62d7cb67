"""HAMi's annotation codecs case by case: input -> what HAMi v2.10 gives (value or error).

Each expectation was worked out by reading HAMi's decoders and encoders
(``pkg/device/devices.go``: EncodePodSingleDevice, DecodeContainerDevices,
DecodePodDevices, DecodeNodeDevices, MarshalNodeDevices / UnMarshalNodeDevices;
``pkg/device/nvidia/device.go``: GetNodeDevices; the device plugin's
EraseNextDeviceTypeFromAnnotation), not by running ours. Where hami-bus is deliberately
stricter the case says so and docs/hami-compat.md lists it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.hami import annotations as ann
from shared.schemas import CardGrant, Device


def cg(uuid: str, mem: int, cores: int, vendor: str = "NVIDIA") -> CardGrant:
    return CardGrant(uuid=uuid, vendor=vendor, mem=mem, cores=cores)


A = cg("GPU-a", 3000, 30)
B = cg("GPU-b", 5000, 0)

# ------------------------------------------------------------------ pod: DecodePodDevices

# (annotation value, HAMi's PodSingleDevice) — strings.Split keeps every entry.
POD_DECODE: list[tuple[str, list[list[CardGrant]]]] = [
    ("", [[]]),  # "" splits into one empty string: one empty container
    (";", [[], []]),
    ("GPU-a,NVIDIA,3000,30:;", [[A], []]),  # the trailing ';' is one more container
    ("GPU-a,NVIDIA,3000,30:", [[A]]),  # an older writer without the final ';'
    (";GPU-a,NVIDIA,3000,30:;GPU-a,NVIDIA,3000,30:GPU-b,NVIDIA,5000,0:;", [[], [A], [A, B], []]),
    ("GPU-a,NVIDIA,3000,30", [[A]]),  # the device's ':' is optional
    ("junk:GPU-a,NVIDIA,3000,30:;", [[A], []]),  # a segment without a comma is skipped
    ("GPU-a,NVIDIA,3000,30,extra:", [[A]]),  # fields after the fourth are ignored
]


@pytest.mark.parametrize(("value", "hami"), POD_DECODE)
def test_decode_pod_devices_like_hami(value: str, hami: list[list[CardGrant]]) -> None:
    assert ann.decode_pod_devices(value) == hami


POD_ERRORS: list[tuple[str, str]] = [
    # HAMi's own error: fewer than four fields in a segment with a comma
    ("GPU-a,NVIDIA,3000:;", ann.POD_FIELDS_MISSING),
    ("GPU-a,NVIDIA:;", ann.POD_FIELDS_MISSING),
    (";;GPU-a,:;", ann.POD_FIELDS_MISSING),
    # stricter than HAMi (which reads these as 0 memory / 0 cores): refused, ours
    ("GPU-a,NVIDIA,x,30:;", "memory 'x' is not an integer"),
    ("GPU-a,NVIDIA,3000, 30:;", "cores ' 30' is not an integer"),
    ("GPU-a,NVIDIA,-1,30:;", "must not be negative"),
    ("GPU-a,NVIDIA,4294967296,30:;", "out of range"),
]


@pytest.mark.parametrize(("value", "error"), POD_ERRORS)
def test_decode_pod_device_errors(value: str, error: str) -> None:
    with pytest.raises(ann.AnnotationError) as exc:
        ann.decode_pod_devices(value)
    assert error in str(exc.value)
    if error == ann.POD_FIELDS_MISSING:
        assert str(exc.value) == error  # HAMi's bytes, nothing added


# (PodSingleDevice, EncodePodSingleDevice's bytes)
POD_ENCODE: list[tuple[list[list[CardGrant]], str]] = [
    ([], ""),
    ([[]], ";"),
    ([[A], []], "GPU-a,NVIDIA,3000,30:;;"),
    ([[], [A, B]], ";GPU-a,NVIDIA,3000,30:GPU-b,NVIDIA,5000,0:;"),
    ([[cg("MLU-1", 256, 10, "MLU")]], "MLU-1,MLU,256,10:;"),  # every vendor is written
]


@pytest.mark.parametrize(("entries", "hami"), POD_ENCODE)
def test_encode_pod_single_device_like_hami(entries: list[list[CardGrant]], hami: str) -> None:
    assert ann.encode_pod_single_device(entries) == hami


# Decode then encode, as every HAMi write-back does: HAMi's bytes, not the input's.
ROUND_TRIPS: list[tuple[str, str]] = [
    ("", ";"),
    ("GPU-a,NVIDIA,3000,30:;", "GPU-a,NVIDIA,3000,30:;;"),
    ("GPU-a,NVIDIA,3000,30", "GPU-a,NVIDIA,3000,30:;"),
    ("junk:GPU-a,NVIDIA,3000,30:", "GPU-a,NVIDIA,3000,30:;"),
]


@pytest.mark.parametrize(("value", "hami"), ROUND_TRIPS)
def test_round_trip_gives_hamis_bytes(value: str, hami: str) -> None:
    assert ann.encode_pod_single_device(ann.decode_pod_devices(value)) == hami


# (to-allocate value, position handed out, what EraseNextDeviceTypeFromAnnotation writes)
CONSUME: list[tuple[str, int, str]] = [
    ("GPU-a,NVIDIA,3000,30:;", 0, ";;"),
    (";GPU-a,NVIDIA,3000,30:;GPU-b,NVIDIA,5000,0:;", 1, ";;GPU-b,NVIDIA,5000,0:;;"),
    (";;GPU-b,NVIDIA,5000,0:;;", 2, ";;;;;"),
    ("GPU-a,NVIDIA,3000,30:", 0, ";"),
]


@pytest.mark.parametrize(("value", "pos", "written"), CONSUME)
def test_consume_writes_back_hamis_bytes(value: str, pos: int, written: str) -> None:
    got_pos, devs, rest = ann.consume_next_container(value)
    assert (got_pos, rest) == (pos, written)
    assert devs == ann.decode_pod_devices(value)[pos]


def test_consume_with_nothing_left() -> None:
    assert ann.consume_next_container(";;;") == (-1, [], ";;;")
    assert ann.consume_next_container("") == (-1, [], "")


# ------------------------------------------------------------ node: the register annotation

def dev(**kw: Any) -> Device:
    base: dict[str, Any] = dict(uuid="GPU-0", index=0, type="NVIDIA-A100", vendor="NVIDIA", count=10,
                                devmem=81920, devcore=100, numa=0, mode="hami-core", health=True)
    base.update(kw)
    return Device(**base)


# (annotation value, HAMi's devices) — JSON, as UnMarshalNodeDevices reads it.
NODE_JSON: list[tuple[str, list[Device]]] = [
    ('[{"id":"GPU-0","count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-A100",'
     '"mode":"hami-core","health":true}]', [dev()]),
    # omitempty: no mode stays "" (HAMi does not default it); no health is false
    ('[{"id":"GPU-0","count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-A100"}]',
     [dev(mode="", health=False)]),
    # unknown keys ignored; null is Go's zero value
    ('[{"id":"GPU-0","index":3,"numa":null,"custominfo":{"x":1},"devicevendor":"NVIDIA",'
     '"count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-A100","mode":"mig","health":true}]',
     [dev(index=3, mode="mig")]),
]


@pytest.mark.parametrize(("value", "hami"), NODE_JSON)
def test_decode_register_json_like_hami(value: str, hami: list[Device]) -> None:
    assert ann.decode_node_devices(value) == hami


NODE_ERRORS: list[tuple[str, str]] = [
    ("[]", "no gpu found on node"),
    ("", "node annotations not decode successfully"),  # empty legacy colon annotation
    ("GPU-0,10,81920,100,NVIDIA-A100,0,true", "node annotations not decode successfully"),  # no ':'
    ("GPU-0,10,81920,100,NVIDIA-A100,0:", "node annotations not decode successfully"),  # 6 fields
    ("GPU-0,10,81920,100,NVIDIA-A100,0,true,1:", "node annotations not decode successfully"),  # 8
    ("junk:", "no gpu found on node"),  # only comma-less segments: no card
    ("GPU-0,10,81920,100,NVIDIA-A100,0,true,-1,hami-core:", "index field must not be negative: -1"),
    ('[{"id":"GPU-0","index":-1}]',
     "json: cannot unmarshal number -1 into Go struct field DeviceInfo.index of type uint"),
    ('[{"id":"GPU-0","count":"10"}]',
     "json: cannot unmarshal string into Go struct field DeviceInfo.count of type int32"),
    ('[{"id":"GPU-0","health":"true"}]',
     "json: cannot unmarshal string into Go struct field DeviceInfo.health of type bool"),
    ('[{"id":"GPU-0","devmem":1.5}]',
     "json: cannot unmarshal number 1.5 into Go struct field DeviceInfo.devmem of type int32"),
    ('[1]', "json: cannot unmarshal number 1 into Go value of type device.DeviceInfo"),
    # stricter than HAMi: a card without id, a malformed number HAMi reads as 0
    ('[{"index":1}]', "a device object with an 'id' is required"),
    ("GPU-0,x,81920,100,NVIDIA-A100,0,true:", "count 'x' is not an integer"),
    ("GPU-0,10,81920,100,NVIDIA-A100,0,maybe:", "health 'maybe' is not a boolean"),
]


@pytest.mark.parametrize(("value", "error"), NODE_ERRORS)
def test_decode_register_errors(value: str, error: str) -> None:
    with pytest.raises(ann.AnnotationError) as exc:
        ann.decode_node_devices(value)
    assert error in str(exc.value)


def test_missing_register_annotation_is_hamis_error() -> None:
    with pytest.raises(ann.AnnotationError) as exc:
        ann.node_devices_from_annotations({"other": "x"})
    assert str(exc.value) == "annos not found hami.io/node-nvidia-register"
    assert ann.node_devices_from_annotations({ann.NODE_REGISTER: '[{"id":"GPU-0"}]'})[0].uuid == "GPU-0"


# (colon value, HAMi's devices) — DecodeNodeDevices.
NODE_COLON: list[tuple[str, list[Device]]] = [
    # seven fields: HAMi has no index (0) and no mode (hami-core)
    ("GPU-0,10,81920,100,NVIDIA-A100,0,true:GPU-1,10,81920,100,NVIDIA-A100,1,false:",
     [dev(), dev(uuid="GPU-1", numa=1, health=False)]),
    # nine fields: index and mode as written, an empty mode kept empty
    ("GPU-0,4,1000,200,T4,0,True,2,:", [dev(count=4, devmem=1000, devcore=200, type="T4", index=2, mode="")]),
    # Go's ParseBool spellings; comma-less segments skipped
    ("x:GPU-0,10,81920,100,NVIDIA-A100,0,1,0,mig", [dev(mode="mig")]),
]


@pytest.mark.parametrize(("value", "hami"), NODE_COLON)
def test_decode_register_colon_like_hami(value: str, hami: list[Device]) -> None:
    assert ann.decode_node_devices(value) == hami


# (devices, MarshalNodeDevices' bytes)
NODE_ENCODE: list[tuple[list[Device], str]] = [
    ([dev()], '[{"id":"GPU-0","count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-A100",'
              '"mode":"hami-core","health":true}]'),
    ([dev(mode="", health=False, count=0)],
     '[{"id":"GPU-0","devmem":81920,"devcore":100,"type":"NVIDIA-A100"}]'),
    # Go escapes HTML characters and keeps other UTF-8 as is
    ([dev(type="A<B>&é")], '[{"id":"GPU-0","count":10,"devmem":81920,"devcore":100,'
                           '"type":"A\\u003cB\\u003e\\u0026é","mode":"hami-core","health":true}]'),
    ([], "[]"),
]


@pytest.mark.parametrize(("devices", "hami"), NODE_ENCODE)
def test_encode_register_like_hami(devices: list[Device], hami: str) -> None:
    assert ann.encode_node_devices(devices) == hami


MIG = ('[{"id":"GPU-0","count":7,"devmem":81920,"devcore":100,"type":"NVIDIA-A100","mode":"mig",'
       '"migProfiles":[{"name":"1g.10gb","memoryMB":9728,"core":14,"sliceCount":1,'
       '"placements":[{"start":0,"size":1},{"start":1,"size":1}]}],"health":true}]')


def test_mig_profiles_survive_a_round_trip() -> None:
    devices = ann.decode_node_devices(MIG)
    assert ann.encode_node_devices(devices) == MIG
    assert json.loads(MIG)[0]["migProfiles"][0]["name"] == devices[0].mig_profiles[0].name
