"""Real discovery of Cambricon, MetaX, Enflame, Biren and Vastai cards through their CLIs,
against recorded outputs (tests/node/data/vendors) and a fake sysfs/dev tree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from services.nodeagent.backends.vendors import biren, cambricon, enflame, metax, vastai
from services.nodeagent.backends.vendors.base import CommandError
from services.nodeagent.backends.vendors.real import PROBES, VendorBackend, probe
from tests.node.test_vendor_discovery import DATA, Recorded, _sysfs

TABLE: dict[tuple[str, ...], str] = {
    cambricon.COMMAND: "cnmon_info_m.txt",
    metax.COMMAND: "mx-smi.txt",
    enflame.COMMAND: "efsmi.txt",
    biren.COMMAND: "brsmi_query.csv",
    vastai.COMMAND: "vasmi_list.txt",
}


def text(out: str) -> Callable[[Sequence[str]], str]:
    """A runner that prints ``out`` whatever it is asked."""
    return lambda argv: out


def recorded(name: str) -> str:
    return (DATA / name).read_text()


# ------------------------------------------------------------------ Cambricon, cnmon


def test_cnmon_cards_with_physical_not_virtual_memory() -> None:
    run = Recorded(TABLE)
    cards = cambricon.discover(run)
    assert run.calls == [("cnmon", "info", "-m")]
    assert [(c.uuid, c.index, c.model, c.type, c.memory_mib) for c in cards] == [
        ("MLU-0", 0, "MLU370-X8", "MLU370-X8", 49152),
        ("MLU-1", 1, "MLU370-X8", "MLU370-X8", 49152),  # not the 1048576 MiB virtual Total
    ]
    assert {c.vendor for c in cards} == {"MLU"} and {c.cores for c in cards} == {100}


def test_cnmon_alias_and_gib_and_bad_output() -> None:
    one = "Card : 3\nProduct Name : mlu370\nPhysical Memory Usage :\n  Total : 24 GiB\n"
    (c,) = cambricon.discover(text(one))
    assert (c.index, c.model, c.memory_mib) == (3, "MLU370-X4", 24576)
    with pytest.raises(CommandError, match="no 'Card' sections"):
        cambricon.discover(text("cnmon: no device found\n"))
    no_physical = "Card : 0\nProduct Name : MLU370-X8\nVirtual Memory Usage :\n  Total : 1 MiB\n"
    with pytest.raises(CommandError, match="card 0 has no 'Physical Memory Usage' Total"):
        cambricon.discover(text(no_physical))
    with pytest.raises(CommandError, match="card 0 has no 'Product Name'"):
        cambricon.discover(text("Card : 0\nPhysical Memory Usage :\n  Total : 1 MiB\n"))
    with pytest.raises(CommandError, match="'lots' is not a size"):
        cambricon.discover(text(one.replace("24 GiB", "lots")))


def test_cnmon_unknown_product_is_rejected() -> None:
    s4 = recorded("cnmon_info_m.txt").replace("MLU370-X8", "MLU370-S4", 1)
    with pytest.raises(CommandError, match="'MLU370-S4' is not in the MLU model table"):
        cambricon.discover(text(s4))


# ------------------------------------------------------------------ MetaX, mx-smi


def test_mx_smi_table_rows_give_model_bus_and_total_memory() -> None:
    cards = metax.discover(Recorded(TABLE))
    assert [(c.uuid, c.index, c.model, c.type, c.memory_mib) for c in cards] == [
        ("MetaX-0000:0e:00.0", 0, "C500", "MXC500", 65536),
        ("MetaX-0000:0f:00.0", 1, "C500", "MXC500", 65536),
    ]
    # what metax.encode_register reads: the card's bdf and QoS policy
    assert dict(cards[1].custom_info) == {"qosPolicy": "best-effort", "bdf": "0000:0f:00.0"}


def test_mx_smi_moffetts_table_missing_memory_and_unknown_model() -> None:
    moffett = (
        "│Index  Name Freq.  Voltage Temp. Pwr  Util  Bus ID    Memory-Usage        SN      │\n"
        "│Card1  S30  700MHz  930mV   53C  110W 99%  0:2d:00.0 111MiB/61440MiB 2023243080104│\n"
    )
    with pytest.raises(CommandError, match="no 'MetaX' GPU rows"):
        metax.discover(text(moffett))
    table = recorded("mx-smi.txt")
    with pytest.raises(CommandError, match="GPU 1 has no '<used>/<total> MiB' cell"):
        metax.discover(text(table.replace("1370/65536 MiB ", "N/A            ")))
    with pytest.raises(CommandError, match="GPU 0 'N260' is not in the MetaX model table"):
        metax.discover(text(table.replace("MetaX C500", "MetaX N260", 1)))


# ------------------------------------------------------------------ Enflame, efsmi


def test_efsmi_cards_carry_bus_memory_and_drs_profiles() -> None:
    cards = enflame.discover(Recorded(TABLE))
    assert [(c.uuid, c.index, c.model, c.memory_mib, c.cores) for c in cards] == [
        ("GCU-00:3b:00.0", 0, "S60", 49152, 6),
        ("GCU-00:3c:00.0", 1, "S60", 49152, 6),
    ]
    assert {c.vendor for c in cards} == {"GCU"}
    assert [t.name for t in cards[0].templates] == ["1g.8gb", "2g.16gb", "3g.24gb", "6g.48gb"]


def test_efsmi_bad_output_and_unknown_product() -> None:
    table = recorded("efsmi.txt")
    with pytest.raises(CommandError, match="no card rows"):
        enflame.discover(text("efsmi: no GCU device found\n"))
    with pytest.raises(CommandError, match=r"card 1 \(00:3c:00.0\) has no memory size"):
        enflame.discover(text(table.replace("49152MiB  Enable", "N/A       Enable")))
    with pytest.raises(CommandError, match="card 0 'T20' is not in the GCU model table"):
        enflame.discover(text(table.replace("S60 ", "T20 ", 1)))
    # the product as some builds print it maps to the same model
    assert enflame.model_named("Enflame GCU-S60") is enflame.MODELS["S60"]


# ------------------------------------------------------------------ Biren, brsmi


def test_brsmi_query_csv() -> None:
    run = Recorded(TABLE)
    cards = biren.discover(run)
    assert run.calls == [("brsmi", f"--query-gpu={biren.QUERY}", "--format=csv")]
    assert [(c.uuid[-4:], c.index, c.model, c.type, c.memory_mib) for c in cards] == [
        ("0000", 0, "BR104", "BR104", 32768),
        ("0001", 1, "BR104", "BR104", 32768),
    ]
    assert {c.vendor for c in cards} == {"Biren"}


def test_brsmi_gib_bad_header_short_row_and_unknown_model() -> None:
    head = "index, uuid, name, memory.total [MiB], pci.bus_id\n"
    (c,) = biren.discover(text(head + "0, GPU-x, Biren BR106, 64 GiB, 00000000:1A:00.0\n"))
    assert (c.model, c.memory_mib) == ("BR106", 65536)
    with pytest.raises(CommandError, match="header lacks uuid"):
        biren.discover(text("index, name, memory.total [MiB], pci.bus_id\n0, BR104, 1, x\n"))
    with pytest.raises(CommandError, match="has 3 fields, the header 5"):
        biren.discover(text(head + "0, GPU-x, BR104\n"))
    with pytest.raises(CommandError, match="'BR100' is not in the Biren model table"):
        biren.discover(text(head + "0, GPU-x, BR100, 65536 MiB, 00000000:1A:00.0\n"))
    with pytest.raises(CommandError, match="no CSV output"):
        biren.discover(text(""))


# ------------------------------------------------------------------ Vastai, vasmi


def test_vasmi_dies_are_devices_naming_their_card() -> None:
    cards = vastai.discover(Recorded(TABLE))
    assert [(c.uuid, c.index, c.model, c.memory_mib) for c in cards] == [
        ("VA-VA1A2300017-die0", 0, "VA1", 16384),
        ("VA-VA1A2300017-die1", 1, "VA1", 16384),
        ("VA-VA1A2300018-die0", 2, "VA1", 16384),
        ("VA-VA1A2300018-die1", 3, "VA1", 16384),
    ]
    assert [dict(c.custom_info)["AIC"] for c in cards] == ["VA-VA1A2300017"] * 2 + [
        "VA-VA1A2300018"
    ] * 2
    assert {dict(c.custom_info)["DeviceStrategy"] for c in cards} == {"die"}


def test_vasmi_columns_by_name_and_bad_output() -> None:
    # another column order, no SN: the card's number names it
    (c,) = vastai.discover(text("Name Die Card Mem\nVA16 0 2 32GiB\n"))
    assert (c.uuid, c.model, c.memory_mib) == ("VA-card2-die0", "VA16", 32768)
    with pytest.raises(CommandError, match="no header with 'Card' and 'Die'"):
        vastai.discover(text("vasmi: no device\n"))
    with pytest.raises(CommandError, match="lacks a 'Name' or 'Memory' column"):
        vastai.discover(text("Card Die SN\n0 0 x\n"))
    with pytest.raises(CommandError, match="has 3 fields, the header 4"):
        vastai.discover(text("Card Die Name Mem\n0 0 VA1\n"))
    with pytest.raises(CommandError, match="'VA10' is not in the Vastai model table"):
        vastai.discover(text("Card Die Name Mem\n0 0 VA10 16384\n"))
    with pytest.raises(CommandError, match="no die rows"):
        vastai.discover(text("Card Die Name Mem\n"))


# ------------------------------------------------------------------ probe + backend


def test_probe_finds_the_five_and_the_backend_discovers_them(tmp_path: Path) -> None:
    root = _sysfs(
        tmp_path,
        {
            "0000:1a:00.0": ("0x1ee0", "0x120000"),  # Biren: by PCI ID only
            "0000:01:00.0": ("0x1ec6", "0x120000"),  # Vastai
        },
        dev=["cambricon_dev0", "mxcd", "gcu0", "vastai0_version"],
    )
    assert probe(root) == ["cambricon", "metax", "enflame", "biren", "vastai"]
    run = Recorded(TABLE)
    backend = VendorBackend(run=run, root=root)
    found = backend.discover()
    assert [c.vendor for c in found.cards] == (
        ["MLU"] * 2 + ["Metax-SGPU"] * 2 + ["GCU"] * 2 + ["Biren"] * 2 + ["Vastai"] * 4
    )
    assert backend.undiscovered == []
    assert sorted(run.calls) == sorted(TABLE)
    # the families' topologies reach the link matrix: MLU370-X8 pairs, C500 mesh
    links = found.links
    assert links[0][1] > 0 and links[2][3] > 0 and links[1][2] == 0


def test_biren_needs_its_pci_id_and_every_probe_has_a_parser(tmp_path: Path) -> None:
    # A Biren ID on a bridge function (class 0x06) is not an accelerator
    root = _sysfs(tmp_path, {"0000:00:01.0": ("0x1ee0", "0x060400")}, dev=[])
    assert probe(root) == []
    backend = VendorBackend(run=Recorded({}), vendors=list(PROBES))
    backend.discover()  # every CLI missing: each vendor fails alone, none is unparsed
    assert backend.undiscovered == []


def test_one_vendors_bad_output_skips_only_that_vendor() -> None:
    table = TABLE | {metax.COMMAND: "efsmi.txt"}  # mx-smi printing something else
    found = VendorBackend(run=Recorded(table), vendors=["metax", "biren"]).discover()
    assert [c.vendor for c in found.cards] == ["Biren", "Biren"]
