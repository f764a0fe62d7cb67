"""What every vendor module declares: its families, models, and how its CLI is run.

A *family* is one of HAMi's device types (``pkg/device/<vendor>/`` of HAMi): the key a
container's ask and a card's ``Device.vendor`` share (``"MLU"``, ``"DCU"``,
``"Ascend910B3"``, ...), its Kubernetes resource names, the node annotations its HAMi
plugin writes, and how cards of it are named and split. A *model* is one chip of a
family with what a simulated card of it has (memory, cores, fixed slice sizes).

The names HAMi's scheduler reads (device type, resource names, register and handshake
annotations) come from the shared device registry (:mod:`shared.devices`), so the node
agent registers exactly what the webhook and placement look up; what only the node side
needs (models, slot rules, /dev nodes, PCI IDs, the annotation's encoding) is here.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.devices.registry import REGISTRY

# Run one command, return its stdout; raise CommandError when it cannot run or fails.
Runner = Callable[[Sequence[str]], str]


class CommandError(RuntimeError):
    """A vendor CLI that is missing, failed, or printed what we cannot read."""


class VendorSpecError(ValueError):
    """A simulated-vendor spec that does not parse or names an unknown model."""


def run_command(argv: Sequence[str], timeout: float = 10.0) -> str:
    """The real runner: the CLI's stdout; a missing binary or non-zero exit is an error."""
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(f"{argv[0]}: {exc}") from exc
    if out.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()[:200]}")
    return out.stdout


@dataclass(frozen=True)
class Template:
    """A fixed slice size: Ascend vNPU template, Enflame DRS profile, Kunlunxin vXPU."""

    name: str
    memory_mib: int
    cores: int = 0


@dataclass(frozen=True)
class Model:
    """One chip: what a simulated card of it has and how HAMi's plugin registers it."""

    name: str  # as written in a --sim-gpus spec (matched case-insensitively)
    type: str  # Device.type as the vendor's HAMi plugin writes it
    memory_mib: int  # registered devmem
    cores: int = 100  # registered devcore (AMD: CU count; Neuron: NeuronCores)
    templates: tuple[Template, ...] = ()
    aliases: tuple[str, ...] = ()
    topology: str = ""  # "" none; "ring", "torus4x4", "mesh", "pairs", "network8"
    dies: int = 1  # Vastai: dies per card (each die registers as a device)


def _trimmed_upper(name: str) -> str:
    return name.strip().upper()


def model_named(
    models: Iterable[Model], name: str, key: Callable[[str], str] = _trimmed_upper
) -> Model | None:
    """The model whose name, type or an alias is ``name`` as a vendor's CLI prints it,
    compared after ``key`` (by default: trimmed, any case); None when none is."""
    want = key(name)
    return next((m for m in models if want in {key(a) for a in (m.name, m.type, *m.aliases)}), None)


@dataclass(frozen=True)
class Family:
    """One HAMi device type."""

    key: str  # Device.vendor / DeviceAsk.vendor: HAMi's device type ("MLU", "Ascend910B3")
    vendor: str  # the company, for labels ("Huawei", "Cambricon")
    resources: tuple[str, ...]  # count, memory, cores resource names ("" = none)
    # How HAMi's scheduler learns the cards: "json" (DeviceInfo list in register_annotation),
    # "colon" (the legacy colon list), "metax" / "enflame" (the vendor's own JSON),
    # "capacity" (node extended resources only: no annotation).
    register: str
    register_annotation: str = ""
    handshake_annotation: str = ""
    handshake_style: str = "space"  # "space": "Reported <t>"; "underscore": "Reported_<t>"
    device_vendor: str = ""  # DeviceInfo.deviceVendor written in the annotation ("" = omitted)
    split: int = 0  # slots per card the vendor's plugin registers; 0 = deviceSplitCount
    uuid_prefix: str = ""
    memory_unit_mib: int = 1  # request memory granularity (REFERENCE §8)
    models: tuple[Model, ...] = ()
    dev_globs: tuple[str, ...] = ()  # /dev nodes whose presence says the vendor is here
    pci_vendors: tuple[str, ...] = ()  # sysfs PCI vendor IDs ("0x1d94")
    extra: dict[str, str] = field(default_factory=dict)  # other annotation names


def hami_names(device_type: str) -> dict[str, Any]:
    """Family fields named by the shared registry's entry for ``device_type``."""
    fam = REGISTRY.family(device_type)
    r = fam.resources
    return {
        "key": fam.name,
        "vendor": fam.vendor,
        "resources": (r.count, r.memory, r.cores),
        "register_annotation": fam.register_annotation,
        "handshake_annotation": fam.handshake_annotation,
    }


def sim_serial(node: str, key: str, index: int, width: int = 16) -> str:
    """A stable hex serial for a simulated card of ``key`` at ``index`` on ``node``."""
    return hashlib.sha1(f"{node}/{key}/{index}".encode()).hexdigest()[:width]
