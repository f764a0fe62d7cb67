"""HAMi-format node annotations written by the node agent (REFERENCE §5).

``hami.io/node-nvidia-register`` (JSON form, HAMi's encoder in shared/hami/annotations.py)
and ``hami.io/node-nvidia-score`` are merge-patched onto the Kubernetes Node whenever the
agent's inventory changes, so HAMi's dashboards and tooling that read them keep working.
Writes happen in a background task: the latest inventory wins, a failed write (API
server down, Node not created yet) is retried with backoff, and an unchanged value is
never written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from services.nodeagent.backends.vendors.annotations import vendor_annotations
from shared import kube as k
from shared.hami.annotations import (
    NODE_REGISTER,
    NODE_SCORE,
    NVIDIA,
    encode_node_devices,
    encode_node_scores,
)
from shared.lifecycle import Background
from shared.schemas import NodeInventory

log = logging.getLogger("hami.nodeagent.annotations")


def node_annotations(inv: NodeInventory, scores: bool = True) -> dict[str, str]:
    """The annotations a node's inventory is published as: NVIDIA's register and scores
    for its NVIDIA cards, and each other vendor's register/handshake for its cards
    (services/nodeagent/backends/vendors/annotations.py)."""
    nvidia = [d for d in inv.devices if d.vendor == NVIDIA]
    others = vendor_annotations(inv.devices, inv.published_at or None)
    out = {} if others and not nvidia else {NODE_REGISTER: encode_node_devices(nvidia)}
    if scores and inv.links and nvidia:
        if len(nvidia) == len(inv.devices):
            out[NODE_SCORE] = encode_node_scores(inv.devices, inv.links)
        else:
            pos = [i for i, d in enumerate(inv.devices) if d.vendor == NVIDIA]
            out[NODE_SCORE] = encode_node_scores(nvidia, [[inv.links[i][j] for j in pos] for i in pos])
    out.update(others)
    return out


class NodeAnnotator:
    """Keeps the Node's HAMi annotations equal to the agent's latest inventory."""

    def __init__(
        self,
        kube: k.Kube,
        node: str,
        *,
        scores: bool = True,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        handshake_every: float | None = 30.0,
    ) -> None:
        self.kube = kube
        self.node = node
        self.scores = scores
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        # Other vendors' plugins re-report their handshake (``Reported <time>``) this
        # often, which HAMi's scheduler expects after it writes ``Requesting_<time>``.
        self.handshake_every = handshake_every
        self._inv: NodeInventory | None = None
        self.written: dict[str, str] = {}
        self.writes = 0
        self._want: dict[str, str] | None = None
        self._dirty = asyncio.Event()
        self._synced = asyncio.Event()
        self._bg = Background()

    async def on_inventory(self, inv: NodeInventory) -> None:
        """Agent hook: remember the new value; the writer task does the API call."""
        self._inv = inv
        want = node_annotations(inv, self.scores)
        if want != self.written:
            self._want = want
            self._synced.clear()
            self._dirty.set()

    def start(self) -> None:
        self._bg.spawn(self._run(), f"annotate-{self.node}")
        if self.handshake_every:
            self._bg.spawn(self._handshakes(self.handshake_every), f"handshake-{self.node}")

    async def _handshakes(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            inv = self._inv
            if inv is None or not any(d.vendor != NVIDIA for d in inv.devices):
                continue  # NVIDIA's register carries no handshake here
            want = node_annotations(msgspec.structs.replace(inv, published_at=time.time()), self.scores)
            if want != self.written:
                self._want = want
                self._synced.clear()
                self._dirty.set()

    async def stop(self) -> None:
        await self._bg.stop()

    async def wait_synced(self) -> None:
        """Until the latest inventory is on the Node (bound it with asyncio.timeout)."""
        await self._synced.wait()

    async def _run(self) -> None:
        delay = self.retry_initial
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            want = self._want
            if want is None or want == self.written:
                self._synced.set()
                continue
            try:
                await self.kube.patch(
                    k.path("nodes", name=self.node), {"metadata": {"annotations": want}}
                )
            except Exception as exc:  # API errors and connection failures alike
                log.warning(
                    "%s: node annotations not written (%s); retrying in %.1fs",
                    self.node,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                self._dirty.set()
                continue
            delay = self.retry_initial
            self.written = want
            self.writes += 1
            if self._want == want:
                self._synced.set()
