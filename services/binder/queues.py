"""The Kubernetes Queue resources (``hami.io/v1alpha1``, namespaced) into the bus.

The chart installs the ``queues.hami.io`` CRD. Each Queue object becomes one entry of
the ``hami-queues`` bucket (key: its name, value: :class:`shared.config.QueueSettings`),
which placement follows to build its queue tree (docs/queues.md); a deleted Queue's
entry is deleted. ``spec.default: true`` makes the Queue the default of its own
namespace (a pod without the ``hami.io/queue`` label joins it). A Queue whose spec does
not read as a queue is left out with a warning naming it (its entry removed, so
placement never keeps a stale one); whether the definitions make a tree is placement's
check, which names the queue too.

Queue names are cluster-wide here (a pod's label names a queue, whatever its
namespace): a second Queue of the same name in another namespace is left out.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec

from shared import subjects
from shared.bus import Bus
from shared.config import QueueSettings
from shared.kube import Kube, path

from .kube import ListWatch, list_all

log = logging.getLogger("hami.binder.queues")
GROUP = "hami.io"
VERSION = "v1alpha1"
PLURAL = "queues"
QUEUE_LABEL = "hami.io/queue"  # a pod's queue (shared.hami.codec reads it)

Obj = dict[str, Any]


class QueueSpecError(ValueError):
    """A Queue object whose spec is not a queue; the message names it."""


def queue_from_resource(obj: Obj) -> QueueSettings:
    """A Queue object's settings: its spec, its name, its namespace if it is the default."""
    meta = obj.get("metadata") or {}
    name, ns = str(meta.get("name") or ""), str(meta.get("namespace") or "")
    spec = dict(obj.get("spec") or {})
    default = spec.pop("default", False)
    for key in ("name", "namespaces"):
        if key in spec:
            raise QueueSpecError(f"queue {ns}/{name}: spec.{key} is not a Queue field")
    if not isinstance(default, bool):
        raise QueueSpecError(f"queue {ns}/{name}: spec.default must be true or false")
    try:
        q = msgspec.convert(spec, QueueSettings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`", "").replace("$.", "spec.")
        raise QueueSpecError(f"queue {ns}/{name}: {text}") from None
    return msgspec.structs.replace(q, name=name, namespaces=[ns] if default and ns else [])


class QueueSync:
    """Keeps the ``hami-queues`` bucket equal to the Queue objects."""

    def __init__(self, kube: Kube, bus: Bus, *, timeout_s: int = 300) -> None:
        self.kube = kube
        self.bus = bus
        self.owner: dict[str, str] = {}  # queue name -> "namespace/name" of its object
        self.watch = ListWatch(
            kube,
            path(PLURAL, group=GROUP, version=VERSION),
            self._relist,
            self._on_event,
            timeout_s=timeout_s,
            name="queues",
        )

    async def _relist(self) -> str:
        items, rv = await list_all(self.kube, path(PLURAL, group=GROUP, version=VERSION))
        before = set(self.owner)
        self.owner = {}
        for obj in sorted(items, key=_where):  # the same winner on every binder
            await self._put(obj)
        for name in before - set(self.owner):
            await self._delete(name)
        return rv

    async def _on_event(self, kind: str, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        if kind == "DELETED":
            if self.owner.get(name) == _where(obj):
                del self.owner[name]
                await self._delete(name)
            return
        await self._put(obj)

    async def _put(self, obj: Obj) -> None:
        where = _where(obj)
        name = str((obj.get("metadata") or {}).get("name") or "")
        held = self.owner.get(name)
        if held is not None and held != where:
            log.warning("queue %s left out: a Queue of that name is defined in %s", where, held)
            return
        try:
            q = queue_from_resource(obj)
        except QueueSpecError as exc:
            log.warning("%s; left out", exc)
            if held is not None:
                del self.owner[name]
            await self._delete(name)
            return
        self.owner[name] = where
        await self.bus.kv_put(subjects.QUEUES_BUCKET, name, q)

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(Exception):  # not there: nothing to remove
            await self.bus.kv_delete(subjects.QUEUES_BUCKET, name)


def _where(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"
