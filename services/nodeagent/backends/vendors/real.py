"""Real discovery of other vendors' cards: probe, then the binding or the CLI.

:func:`probe` says which families a machine has from ``/dev`` nodes and the PCI vendor
IDs under ``/sys/bus/pci/devices`` (both under an injectable root), without loading any
vendor library. :class:`VendorBackend` then discovers each present family: through its
Python binding when one is maintained and installed (AMD ``amdsmi``, Moore Threads
``pymtml`` from mthreads-ml-py: looked up with ``importlib.util.find_spec`` and imported
only then), otherwise through the vendor's CLI via an injectable command runner: every
family of :data:`PROBES` has one (``npu-smi``, ``cnmon``, ``hy-smi``, ``ixsmi``,
``mthreads-gmi``, ``mx-smi``, ``xpu-smi``, ``efsmi``, ``neuron-ls``, ``amd-smi``,
``brsmi``, ``vasmi``). A vendor named without a parser is reported as present but not
discovered.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from services.nodeagent.backends import Discovery, PhysicalCard
from services.nodeagent.backends.vendors import (
    amd,
    ascend,
    biren,
    cambricon,
    enflame,
    hygon,
    iluvatar,
    kunlun,
    metax,
    mthreads,
    neuron,
    vastai,
)
from services.nodeagent.backends.vendors.base import CommandError, Runner, run_command
from services.nodeagent.backends.vendors.sim import vendor_links

log = logging.getLogger("hami.nodeagent.vendors")

# vendor name -> (/dev globs, PCI vendor IDs). Hygon and AMD IDs are from the vendors'
# plugins; the others are the PCI-SIG assignments as listed in pci.ids.
PROBES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ascend": (("davinci[0-9]*",), ("0x19e5",)),
    "cambricon": (("cambricon_dev[0-9]*",), ("0xcabc",)),
    "hygon": (("mkfd",), ("0x1d94",)),
    "iluvatar": (("iluvatar[0-9]*",), ("0x1e3e",)),
    "mthreads": (("mtgpu.[0-9]*",), ("0x1ed5",)),
    "metax": (("mxcd",), ("0x9999",)),
    "kunlun": (("xpuctrl",), ("0x1d22",)),
    "enflame": (("gcu[0-9]*",), ("0x1e36",)),
    "neuron": (("neuron[0-9]*",), ("0x1d0f",)),
    "amd": (("kfd",), ("0x1002",)),
    # Biren and Vastai: the IDs pci.ids lists for them (Biren 0x1ee0, Vastai 0x1ec6), as
    # given to us; not checked against a copy of pci.ids. Biren's /dev node names are
    # not known, so only its PCI ID counts; Vastai's driver creates /dev/vastai<N>_*.
    "biren": ((), ("0x1ee0",)),
    "vastai": (("vastai[0-9]*",), ("0x1ec6",)),
}
# PCI classes of accelerators and GPUs (display 0x03xxxx, processing accelerator 0x12xxxx):
# AMD's and Huawei's vendor IDs also cover CPUs' and NICs' functions.
_ACCEL_CLASSES = ("0x03", "0x12")


def _pci_vendors(root: Path) -> set[str]:
    found: set[str] = set()
    base = root / "sys/bus/pci/devices"
    if not base.is_dir():
        return found
    for d in base.iterdir():
        try:
            cls = (d / "class").read_text().strip().lower()
            vid = (d / "vendor").read_text().strip().lower()
        except OSError:
            continue
        if cls.startswith(_ACCEL_CLASSES):
            found.add(vid)
    return found


def probe(root: Path = Path("/")) -> list[str]:
    """The vendors present, by ``/dev`` nodes or accelerator-class PCI functions.
    Hygon's DCUs expose ``/dev/kfd`` too: AMD counts only with AMD's PCI ID."""
    pci = _pci_vendors(root)
    dev = root / "dev"
    out: list[str] = []
    for name, (globs, vids) in PROBES.items():
        by_pci = any(v in pci for v in vids)
        by_dev = any(next(dev.glob(g), None) is not None for g in globs) if dev.is_dir() else False
        if name == "amd":
            present = by_pci  # /dev/kfd alone may be Hygon's
        elif name == "neuron":
            present = by_dev  # Amazon's PCI ID also covers ENA NICs and NVMe
        else:
            present = by_pci or by_dev
        if present:
            out.append(name)
    return out


Importer = Callable[[str], Any | None]


def import_if_installed(name: str) -> Any | None:
    """The module if it is installed, else None -- never an ImportError at our import."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


class VendorBackend:
    """Discovery of the vendors :func:`probe` finds (or those named)."""

    name = "vendors"

    def __init__(
        self,
        run: Runner = run_command,
        root: Path = Path("/"),
        importer: Importer = import_if_installed,
        vendors: Iterable[str] | None = None,
        instance_type: str = "",
    ) -> None:
        self.run = run
        self.root = root
        self.importer = importer
        self.vendors = list(vendors) if vendors is not None else None
        self.instance_type = instance_type
        self.undiscovered: list[str] = []  # named, but no parser here

    def _one(self, vendor: str) -> list[PhysicalCard]:
        if vendor == "amd":
            mod = self.importer("amdsmi")
            return amd.discover_amdsmi(mod) if mod is not None else amd.discover(self.run)
        if vendor == "mthreads":
            mod = self.importer("pymtml")
            return mthreads.discover_pymtml(mod) if mod is not None else mthreads.discover(self.run)
        parsers: dict[str, Callable[[], list[PhysicalCard]]] = {
            "ascend": lambda: ascend.discover(self.run),
            "biren": lambda: biren.discover(self.run),
            "cambricon": lambda: cambricon.discover(self.run),
            "enflame": lambda: enflame.discover(self.run),
            "hygon": lambda: hygon.discover(self.run),
            "iluvatar": lambda: iluvatar.discover(self.run),
            "kunlun": lambda: kunlun.discover(self.run),
            "metax": lambda: metax.discover(self.run),
            "neuron": lambda: neuron.discover(self.run, self.instance_type),
            "vastai": lambda: vastai.discover(self.run),
        }
        if vendor not in parsers:
            self.undiscovered.append(vendor)
            return []
        return parsers[vendor]()

    def discover(self) -> Discovery:
        vendors = self.vendors if self.vendors is not None else probe(self.root)
        cards: list[PhysicalCard] = []
        self.undiscovered = []
        for v in vendors:
            try:
                found = self._one(v)
            except CommandError as exc:
                log.warning("%s: discovery failed: %s", v, exc)
                continue
            # Indexes stay each vendor's own (they name /dev nodes); the node's positions
            # are the list order.
            cards.extend(found)
        n = len(cards)
        links = vendor_links([[0] * n for _ in range(n)], cards) if n else []
        return Discovery(cards=cards, links=links)
