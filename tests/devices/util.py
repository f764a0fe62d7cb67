"""Helpers for the device-family tables: container resources and cards in HAMi's shapes."""

from __future__ import annotations

from typing import Any

from shared.devices.base import Card


def res(
    limits: dict[str, Any] | None = None, requests: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A container's ``resources`` as the API returns it."""
    out: dict[str, Any] = {}
    if limits is not None:
        out["limits"] = limits
    if requests is not None:
        out["requests"] = requests
    return out


def card(id: str, type: str, **kw: Any) -> Card:
    return Card(id=id, type=type, **kw)
