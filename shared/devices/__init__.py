"""Device families: every accelerator vendor HAMi schedules, one module per vendor.

:mod:`.base` holds what families share (the request, the card view, HAMi's common fit
walk and reason codes, ``Allocate`` data types); each vendor module declares its
resource names, annotations, request parsing and validation, fit and ``Allocate``
answer; :mod:`.registry` looks them up. Pure logic, no I/O.
"""

from __future__ import annotations

from shared.devices.base import (
    AllocateContext,
    Allocated,
    AllocateResponse,
    Allocation,
    Ask,
    Card,
    DeviceSpec,
    Family,
    FitResult,
    Grant,
    Mount,
    PodInfo,
    RequestError,
    ResourceNames,
)

__all__ = [
    "AllocateContext",
    "Allocated",
    "Allocation",
    "AllocateResponse",
    "Ask",
    "Card",
    "DeviceSpec",
    "Family",
    "FitResult",
    "Grant",
    "Mount",
    "PodInfo",
    "RequestError",
    "ResourceNames",
]
