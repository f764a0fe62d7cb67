"""Coscheduling PodGroups (``scheduling.x-k8s.io/v1alpha1``) read from the API server.

What a PodGroup means for placement (labels, ``minMember``, ``scheduleTimeoutSeconds``)
is :mod:`shared.hami.podgroup`; this module keeps the objects. A pod's
``AllocRequested`` carries ``gang=<PodGroup name>`` (placement keys it
``<namespace>/<name>``), ``gang_size`` and ``gang_timeout`` (docs/gangs.md).

PodGroups are followed by a list+watch (:class:`~services.binder.kube.ListWatch`); a
pod naming one the watch has not seen (not synced yet, created a moment ago, or the
CRD is not served at all) is looked up with a GET. A PodGroup that does not exist, or
whose spec is not a gang (``minMember`` missing or below 1, a negative timeout), is a
:class:`PodGroupError`: the pod is not placed until it is fixed, as coscheduling's
Permit denies a pod whose PodGroup is not found.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from shared.hami.podgroup import (
    GROUP,
    PLURAL,
    VERSION,
    Gang,
    PodGroupError,
    gang_of,
    pod_group_name,
)
from shared.kube import Kube, NotFound, path

from .kube import ListWatch, list_all

log = logging.getLogger("hami.binder.podgroups")
# A cluster without the CRD answers the list 404: look again this much later (pods
# naming a PodGroup are still looked up one by one meanwhile).
ABSENT_RETRY_S = 60.0

Obj = dict[str, Any]


class PodGroups:
    """The PodGroups of the cluster, kept by a watch; looked up by namespace and name."""

    def __init__(
        self,
        kube: Kube,
        *,
        timeout_s: int = 300,
        on_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.kube = kube
        self.objs: dict[str, Obj] = {}  # "namespace/name" -> the PodGroup as last seen
        self.on_change = on_change  # called with the key of a PodGroup added, changed or deleted
        self.served = True  # False while the API server answers the CRD's list 404
        self.watch = ListWatch(
            kube,
            path(PLURAL, group=GROUP, version=VERSION),
            self._relist,
            self._on_event,
            timeout_s=timeout_s,
            name="podgroups",
        )

    async def _relist(self) -> str:
        while True:
            try:
                items, rv = await list_all(self.kube, path(PLURAL, group=GROUP, version=VERSION))
                break
            except NotFound:
                # The CRD is not installed (no coscheduling): said once, not every 5 s.
                if self.served:
                    log.info(
                        "%s.%s is not served; PodGroups named by pods are read one by one",
                        PLURAL,
                        GROUP,
                    )
                self.served = False
                await asyncio.sleep(ABSENT_RETRY_S)
        self.served = True
        before = set(self.objs)
        self.objs = {_key(o): o for o in items}
        for key in before | set(self.objs):
            await self._changed(key)
        return rv

    async def _on_event(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        if kind == "DELETED":
            self.objs.pop(key, None)
        else:
            self.objs[key] = obj
        await self._changed(key)

    async def _changed(self, key: str) -> None:
        if self.on_change is not None:
            await self.on_change(key)

    async def lookup(self, namespace: str, name: str) -> Gang:
        """The gang of PodGroup ``namespace/name``: :class:`PodGroupError` when it is
        missing or not a gang; the API's errors other than 404 propagate (transient)."""
        obj = self.objs.get(f"{namespace}/{name}")
        if obj is None:
            # Not seen by the watch (yet): the API server has the last word.
            try:
                obj = await self.kube.get(
                    path(PLURAL, namespace, name, group=GROUP, version=VERSION)
                )
            except NotFound:
                raise PodGroupError(
                    f"PodGroup {namespace}/{name} ({GROUP}/{VERSION}) not found"
                ) from None
        return gang_of(obj)

    async def pod_gang(self, pod: Mapping[str, Any]) -> Gang | None:
        """The gang of a pod (None: it names no PodGroup); :class:`PodGroupError`."""
        name = pod_group_name(pod)
        if not name:
            return None
        ns = str((pod.get("metadata") or {}).get("namespace") or "default")
        return await self.lookup(ns, name)


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"
