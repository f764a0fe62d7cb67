"""Fragmentation-aware node policies (placeholder; filled in below)."""

from __future__ import annotations

from typing import Any

FRAG_POLICIES = ("fgd", "frag")


class ShapeModel:
    def observe(self, req: Any, settings: Any) -> None:
        return None


class FragScorer:
    def __init__(self, policy: str) -> None:
        self.policy = policy

    def choose(self, *args: Any) -> None:
        return None
