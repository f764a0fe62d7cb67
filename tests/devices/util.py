"""Helpers for the device-family tables: container resources and cards in HAMi's shapes."""

from __future__ import annotations

from typing import Any

from shared.devices.base import Ask, Card, Family, PodInfo


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


def assert_fit(
    fam: Family,
    cards: list[Card],
    ask: Ask,
    annos: dict[str, str],
    want: list[str] | None,
    reason: str,
) -> None:
    """One row of a HAMi Fit table: the cards picked (``want``: their ids, None: no fit)
    and HAMi's reason text."""
    got = fam.fit(cards, ask, PodInfo(annotations=annos))
    assert got.ok is (want is not None)
    if want is not None:
        assert [g.uuid for g in got.grants] == want
    assert got.text == reason
