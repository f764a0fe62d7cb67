"""Real discovery of other vendors' cards, against recorded CLI outputs (tests/node/data/vendors)
through an injected command runner, fake bindings, and a fake sysfs/dev tree."""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent.backends.vendors import (
    amd,
    ascend,
    hygon,
    iluvatar,
    kunlun,
    mthreads,
    neuron,
)
from services.nodeagent.backends.vendors.base import CommandError
from services.nodeagent.backends.vendors.real import VendorBackend, import_if_installed, probe

DATA = Path(__file__).parent / "data" / "vendors"


class Recorded:
    """A command runner that answers from recorded files; an unknown command fails as a
    missing binary does."""

    def __init__(self, table: dict[tuple[str, ...], str]) -> None:
        self.table = table
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        key = tuple(argv)
        self.calls.append(key)
        if key not in self.table:
            raise CommandError(f"{argv[0]}: not found")
        return (DATA / self.table[key]).read_text()


NPU: dict[tuple[str, ...], str] = {("npu-smi", "info", "-m"): "npu-smi_info_m.txt"} | {
    ("npu-smi", "info", "-t", "usages", "-i", str(i), "-c", "0"): f"npu-smi_usages_{i}.txt"
    for i in range(5)
}
HYGON: dict[tuple[str, ...], str] = {
    ("hy-smi", "--showproductname", "--json"): "hy-smi_showproductname.json",
    ("hy-smi", "--showmeminfo", "vram", "--json"): "hy-smi_showmeminfo_vram.json",
    ("hy-smi", "--showserial", "--json"): "hy-smi_showserial.json",
}
AMD_STATIC = ("amd-smi", "static", "--asic", "--bus", "--vram", "--numa", "--json")
AMD = {
    AMD_STATIC: "amd-smi_static_rocm6.3.json",
    ("amd-smi", "list", "--json"): "amd-smi_list.json",
}


def test_npu_smi_lists_the_compute_chips_with_the_template_tables_memory() -> None:
    cards = ascend.discover(Recorded(NPU))
    assert [c.index for c in cards] == [0, 1, 2, 3, 4]  # contiguous from 0, Mcu rows skipped
    assert {c.vendor for c in cards} == {"Ascend910B3"} and {c.cores for c in cards} == {20}
    assert {c.memory_mib for c in cards} == {65536}
    assert [dict(c.custom_info)["NetworkID"] for c in cards] == [0, 0, 0, 0, 1]


def test_npu_smi_new_mapping_layout_and_bad_output() -> None:
    rows = ascend.parse_mapping((DATA / "npu-smi_info_m_950.txt").read_text())
    assert rows == [(0, 0, "Ascend 910B3"), (0, 1, "Ascend 910B3")]
    with pytest.raises(CommandError, match="NPU ID"):
        ascend.parse_mapping("no table here\n")
    broken = Recorded(
        NPU | {("npu-smi", "info", "-t", "usages", "-i", "2", "-c", "0"): "npu-smi_info_m.txt"}
    )
    with pytest.raises(CommandError, match="HBM Capacity"):
        ascend.discover(broken)


def test_hy_smi_json_gives_dcu_ids_and_memory() -> None:
    cards = hygon.discover(Recorded(HYGON))
    assert [c.uuid for c in cards] == ["DCU-PKA1E2B3C401", "DCU-PKA1E2B3C402"]
    assert {c.memory_mib for c in cards} == {68702699520 >> 20}
    assert {c.type for c in cards} == {"DCU-K100_AI"} and {c.vendor for c in cards} == {"DCU"}


def test_hy_smi_without_memory_is_an_error() -> None:
    table = HYGON | {("hy-smi", "--showmeminfo", "vram", "--json"): "hy-smi_showserial.json"}
    with pytest.raises(CommandError, match="VRAM Total Memory"):
        hygon.discover(Recorded(table))


@pytest.mark.parametrize("static", ["amd-smi_static_rocm6.3.json", "amd-smi_static_gpu_data.json"])
def test_amd_smi_both_json_shapes(static: str) -> None:
    cards = amd.discover(Recorded(AMD | {AMD_STATIC: static}))
    assert cards, static
    c = cards[0]
    assert (c.model, c.type, c.cores, c.memory_mib) == (
        "MI300X",
        "AMD Instinct MI300X",
        304,
        196592,
    )
    assert c.uuid.endswith("-80f0-5d3a1c2b0000") and dict(c.custom_info)["pciBDF"] == "0000:0c:00.0"


def test_amd_smi_numa_and_na_memory() -> None:
    cards = amd.discover(Recorded(AMD))
    assert [c.numa for c in cards] == [0, 0, 1, 1]
    with pytest.raises(CommandError, match="no vram size"):
        amd.discover(Recorded(AMD | {AMD_STATIC: "amd-smi_static_na.json"}))


def test_neuron_ls_devices_and_ring() -> None:
    run = Recorded({("neuron-ls", "--json-output"): "neuron-ls_inf2.json"})
    cards = neuron.discover(run, instance_type="inf2.24xlarge")
    assert [(c.index, c.cores, c.memory_mib, c.type) for c in cards] == [
        (i, 2, 32768, "Inferentia2") for i in range(4)
    ]
    import json

    assert neuron.connected(json.loads((DATA / "neuron-ls_inf2.json").read_text()))[0] == [3, 1]


def test_mthreads_gmi_json() -> None:
    cards = mthreads.discover(Recorded({("mthreads-gmi", "-q", "--json"): "mthreads-gmi_q.json"}))
    assert [(c.index, c.type, c.memory_mib, c.cores) for c in cards] == [
        (0, "MTT S4000", 49152, 16),
        (1, "MTT S4000", 49152, 16),
    ]
    assert cards[1].uuid.endswith("0001")
    with pytest.raises(CommandError, match="not a size"):
        mthreads.mib("lots")


def test_ixsmi_csv_with_mib_and_gib() -> None:
    run = Recorded({("ixsmi", f"--query-gpu={iluvatar.QUERY}", "--format=csv"): "ixsmi_query.csv"})
    cards = iluvatar.discover(run)
    assert [(c.uuid[-2:], c.type, c.memory_mib) for c in cards] == [
        ("a0", "Iluvatar-BI-V150", 65536)
    ] * 1 + [("a1", "Iluvatar-BI-V150", 65536)]


def test_xpu_smi_table_by_column() -> None:
    cards = kunlun.discover(Recorded({("xpu-smi", "-m"): "xpu-smi_m.txt"}))
    assert [(c.uuid, c.index, c.memory_mib, c.type) for c in cards] == [
        ("XPU-0000:3a:00.0", 0, 98304, "P800 OAM"),
        ("XPU-0000:3b:00.0", 1, 98304, "P800 OAM"),
    ]


# ------------------------------------------------------------------ bindings, lazily


def fake_amdsmi() -> Any:
    m = types.SimpleNamespace(calls=[])
    m.amdsmi_init = lambda: m.calls.append("init")
    m.amdsmi_shut_down = lambda: m.calls.append("shutdown")
    m.amdsmi_get_processor_handles = lambda: ["h0", "h1"]
    m.amdsmi_get_gpu_asic_info = lambda h: {
        "market_name": "AMD Instinct MI300X",
        "num_compute_units": 304,
    }
    m.amdsmi_get_gpu_vram_usage = lambda h: {"vram_total": 196592, "vram_used": 283}
    m.amdsmi_get_gpu_device_bdf = lambda h: {"h0": "0000:0c:00.0", "h1": "0000:22:00.0"}[h]
    m.amdsmi_get_gpu_device_uuid = lambda h: f"uuid-{h}"
    m.amdsmi_topo_get_numa_node_number = lambda h: 1
    return m


def test_amdsmi_binding_preferred_when_installed_and_shut_down() -> None:
    mod = fake_amdsmi()
    run = Recorded({})
    backend = VendorBackend(
        run=run, importer=lambda name: mod if name == "amdsmi" else None, vendors=["amd"]
    )
    found = backend.discover()
    assert [c.uuid for c in found.cards] == ["uuid-h0", "uuid-h1"] and run.calls == []
    assert mod.calls == ["init", "shutdown"] and {c.numa for c in found.cards} == {1}


def test_without_bindings_the_clis_are_used_and_nothing_is_imported() -> None:
    before = set(sys.modules)
    backend = VendorBackend(
        run=Recorded(AMD | {("mthreads-gmi", "-q", "--json"): "mthreads-gmi_q.json"}),
        vendors=["amd", "mthreads"],
    )
    found = backend.discover()
    assert [c.vendor for c in found.cards] == ["AMDGPU"] * 4 + ["Mthreads"] * 2
    assert not {"amdsmi", "pymtml"} & (set(sys.modules) - before)
    assert import_if_installed("amdsmi_surely_not_installed_here") is None


def test_a_failing_cli_skips_its_vendor_only() -> None:
    # npu-smi and cnmon are missing here: Ascend and Cambricon are skipped, Hygon is not
    run = Recorded(HYGON)
    backend = VendorBackend(run=run, vendors=["ascend", "hygon", "cambricon"])
    found = backend.discover()
    assert [c.vendor for c in found.cards] == ["DCU", "DCU"]
    assert ("cnmon", "info", "-m") in run.calls and backend.undiscovered == []


def _sysfs(root: Path, functions: dict[str, tuple[str, str]], dev: Sequence[str] = ()) -> Path:
    for bdf, (vendor, cls) in functions.items():
        d = root / "sys/bus/pci/devices" / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for name in dev:
        (root / "dev" / name).write_text("")
    return root


def test_probe_by_pci_vendor_and_dev_nodes(tmp_path: Path) -> None:
    root = _sysfs(
        tmp_path,
        {
            "0000:3b:00.0": ("0x1d94", "0x038000"),  # Hygon DCU
            "0000:00:14.0": ("0x1002", "0x060000"),  # an AMD host bridge: not an accelerator
            "0000:9a:00.0": ("0x1d0f", "0x020000"),  # Amazon ENA NIC: Neuron only by /dev
        },
        dev=["kfd", "davinci0", "neuron0"],
    )
    assert probe(root) == ["ascend", "hygon", "neuron"]


def test_probe_amd_needs_its_pci_id(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, {"0000:0c:00.0": ("0x1002", "0x120000")}, dev=["kfd"])
    assert probe(root) == ["amd"]
    assert probe(tmp_path / "empty") == []
