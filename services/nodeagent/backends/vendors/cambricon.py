"""Cambricon MLUs (MLU370-X4/X8, MLU590): HAMi's cambricon device with Cambricon's plugin.

HAMi device type ``MLU``; resources ``cambricon.com/vmlu``,
``cambricon.com/mlu.smlu.vmemory`` (256 MiB units), ``cambricon.com/mlu.smlu.vcore``.
HAMi synthesises the cards from node capacity (one per 100 vcore units), so no register
annotation. Cambricon's plugin (``--mode=dynamic-smlu``) creates an sMLU instance per pod
and answers with the card's device nodes plus the instance's capability node.
"""

from __future__ import annotations

from services.nodeagent.backends.vendors.base import (
    Family,
    Model,
    hami_names,
)

MEMORY_UNIT = 256
MODELS = {
    "MLU370-X4": Model("MLU370-X4", "MLU370-X4", 24576, 100, aliases=("MLU370",)),
    "MLU370-X8": Model("MLU370-X8", "MLU370-X8", 49152, 100, topology="pairs"),
    "MLU590": Model("MLU590", "MLU590", 81920, 100, topology="mesh"),
}
FAMILY = Family(
    **hami_names("MLU"),
    register="capacity",
    memory_unit_mib=MEMORY_UNIT,
    models=tuple(MODELS.values()),
    dev_globs=("cambricon_dev[0-9]*",),
    pci_vendors=("0xcabc",),
    extra={
        "profile": "CAMBRICON_DSMLU_PROFILE",
        "instance": "CAMBRICON_DSMLU_PROFILE_INSTANCE",
        "lock": "cambricon.com/dsmlu.lock",
    },
)
