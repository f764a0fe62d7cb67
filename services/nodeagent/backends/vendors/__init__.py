"""Non-NVIDIA accelerators: one module per vendor, and the registry that ties them together.

Each vendor module (``ascend``, ``cambricon``, ``hygon``, ``iluvatar``, ``mthreads``,
``metax``, ``kunlun``, ``enflame``, ``neuron``, ``amd``, ``biren``, ``vastai``) declares
its :class:`~services.nodeagent.backends.vendors.base.Family` (HAMi device type,
resources, annotation names), its chip models, an Allocate answer and, where a CLI or a
Python binding exists, a discovery parser. This package only looks them up:

- :func:`find_model` -- a ``--sim-gpus`` model name (``Ascend910B3``, ``MLU370``, ``MI300X``)
  to its family and model; NVIDIA names are not in it and stay NVIDIA's;
- :data:`FAMILIES` -- family key (``Device.vendor``) to family.

Importing this package imports no vendor library: bindings (``amdsmi``, ``pymtml``) are
imported by :mod:`.real` only when probing found the vendor and the module is installed.
"""

from __future__ import annotations

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
from services.nodeagent.backends.vendors.base import Family, Model, VendorSpecError

MODULES = (
    ascend,
    cambricon,
    hygon,
    iluvatar,
    mthreads,
    metax,
    kunlun,
    enflame,
    neuron,
    amd,
    biren,
    vastai,
)

FAMILIES: dict[str, Family] = {}
for _mod in MODULES:
    for _fam in getattr(_mod, "FAMILIES", None) or (_mod.FAMILY,):
        FAMILIES[_fam.key] = _fam

# family key -> the module that answers for it
MODULE_OF = {f.key: m for m in MODULES for f in (getattr(m, "FAMILIES", None) or (m.FAMILY,))}

_BY_NAME: dict[str, tuple[Family, Model]] = {}
for _fam in FAMILIES.values():
    for _m in _fam.models:
        for _name in (_m.name, *_m.aliases):
            key = _name.upper()
            if key in _BY_NAME and _BY_NAME[key][1] is not _m:
                raise RuntimeError(f"vendor model name {_name!r} is declared twice")
            _BY_NAME[key] = (_fam, _m)


def find_model(name: str) -> tuple[Family, Model] | None:
    """The family and model a spec name means, or None (an NVIDIA model)."""
    return _BY_NAME.get(name.strip().upper())


def model_names() -> list[str]:
    return sorted({m.name for f in FAMILIES.values() for m in f.models})


def family_of(vendor: str) -> Family | None:
    """The family of a Device.vendor; None for NVIDIA (and unknown keys)."""
    return FAMILIES.get(vendor)


__all__ = [
    "FAMILIES",
    "MODULES",
    "MODULE_OF",
    "Family",
    "Model",
    "VendorSpecError",
    "family_of",
    "find_model",
    "model_names",
]
