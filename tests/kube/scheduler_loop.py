"""A small stand-in for kube-scheduler driving the binder's extender over HTTP.

It does what kube-scheduler does with an extender configured with ``filterVerb:
filter``, ``bindVerb: bind``, ``nodeCacheCapable: true`` and our schedulerName's pods as
its managed ones: list+watch the pending pods from the API server, then one scheduling
cycle at a time (the scheduler's cycle is serial) ``POST {urlPrefix}/filter`` with the
pod and every node's name, take the first node left (no prioritize verb), and bind in
the background (binding cycles run concurrently) with ``POST {urlPrefix}/bind``. A
pod whose bind fails goes back to the queue after a back-off, as the scheduler's
``Unreserve`` + requeue do; one that fits nowhere is recorded as unschedulable (and,
with ``retry_unschedulable``, tried again later).

The bodies are built as dicts from the Go types of ``k8s.io/kube-scheduler/extender/v1``
(json tags ``pod``, ``nodes``, ``nodenames``; ``podName``, ``podNamespace``, ``podUID``,
``node``), the way the scheduler marshals them. Used by tests/kube/test_extender.py and
bench/kube_burst.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

Obj = dict[str, Any]


def extender_args(pod: Obj, nodes: list[str] | None = None, *,
                  node_list: Obj | None = None) -> Obj:
    """``ExtenderArgs`` as kube-scheduler marshals it: ``nodenames`` when the extender is
    nodeCacheCapable (``nodes`` then null), else the ``v1.NodeList`` in ``nodes``."""
    if node_list is not None:
        return {"pod": pod, "nodes": node_list, "nodenames": None}
    return {"pod": pod, "nodes": None, "nodenames": list(nodes or [])}


def binding_args(pod: Obj, node: str) -> Obj:
    """``ExtenderBindingArgs`` for ``pod`` on ``node``."""
    meta = pod["metadata"]
    return {"podName": meta["name"], "podNamespace": meta.get("namespace") or "default",
            "podUID": meta["uid"], "node": node}


@dataclass
class LoopStats:
    filters: int = 0
    binds: int = 0
    bound: dict[str, str] = field(default_factory=dict)  # uid -> node the bind succeeded on
    bound_at: dict[str, float] = field(default_factory=dict)  # uid -> time.time()
    names: dict[str, str] = field(default_factory=dict)  # uid -> ns/name
    unschedulable: dict[str, Obj] = field(default_factory=dict)  # uid -> last filter result
    filter_errors: list[str] = field(default_factory=list)
    bind_errors: dict[str, list[str]] = field(default_factory=dict)
    filter_ms: list[float] = field(default_factory=list)
    timed_out: bool = False


class SchedulerLoop:
    def __init__(
        self, api_url: str, extender_url: str, *, scheduler_name: str = "hami-scheduler",
        nodes: list[str] | None = None, bind_concurrency: int = 16, retry_s: float = 0.2,
        retry_unschedulable: bool = False,
    ) -> None:
        self.api = api_url.rstrip("/")
        self.ext = extender_url.rstrip("/")
        self.scheduler_name = scheduler_name
        self.nodes = nodes
        self.bind_room = asyncio.Semaphore(bind_concurrency)
        self.retry_s = retry_s
        self.retry_unschedulable = retry_unschedulable
        self.stats = LoopStats()
        self.pods: dict[str, Obj] = {}  # uid -> latest pending pod seen
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.assumed: set[str] = set()  # filtered to a node, bind in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ informer

    def _offer(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if (pod.get("spec") or {}).get("nodeName") or meta.get("deletionTimestamp"):
            self.pods.pop(uid, None)
            return
        self.pods[uid] = pod
        self.stats.names[uid] = f"{meta.get('namespace') or 'default'}/{meta['name']}"
        if uid in self.queued or uid in self.assumed or uid in self.stats.bound:
            return
        if uid in self.stats.unschedulable and not self.retry_unschedulable:
            return
        self.queued.add(uid)
        self.queue.put_nowait(uid)

    async def _watch(self, http: aiohttp.ClientSession) -> None:
        sel = f"spec.schedulerName={self.scheduler_name}"
        async with http.get(f"{self.api}/api/v1/pods", params={"fieldSelector": sel}) as r:
            r.raise_for_status()
            lst = await r.json()
        for pod in lst.get("items") or []:
            self._offer(pod)
        rv = lst["metadata"]["resourceVersion"]
        while True:
            params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                      "fieldSelector": sel}
            try:
                async with http.get(f"{self.api}/api/v1/pods", params=params,
                                    timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    async for line in resp.content:
                        ev = json.loads(line)
                        obj = ev["object"]
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] == "DELETED":
                            self.pods.pop(obj["metadata"]["uid"], None)
                        elif ev["type"] in ("ADDED", "MODIFIED"):
                            self._offer(obj)
            except (aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.05)

    # --------------------------------------------------------------- the cycles

    def _later(self, uid: str, delay: float) -> None:
        async def again() -> None:
            await asyncio.sleep(delay)
            pod = self.pods.get(uid)
            if pod is not None:
                self._offer(pod)

        self._spawn(again())

    def _spawn(self, coro: Any) -> None:
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _cycle(self, http: aiohttp.ClientSession, uid: str) -> None:
        """One scheduling cycle: filter (serial), then the bind in the background."""
        pod = self.pods.get(uid)
        if pod is None:
            return
        nodes = self.nodes
        if nodes is None:
            async with http.get(f"{self.api}/api/v1/nodes") as r:
                nodes = [n["metadata"]["name"] for n in (await r.json())["items"]]
        t = time.perf_counter()
        async with http.post(f"{self.ext}/filter", json=extender_args(pod, nodes)) as r:
            status = r.status
            res = await r.json(content_type=None)
        self.stats.filter_ms.append((time.perf_counter() - t) * 1000)
        self.stats.filters += 1
        if status != 200 or res.get("error"):
            self.stats.filter_errors.append(f"{self.stats.names.get(uid)}: {status} {res.get('error')}")
            self._later(uid, self.retry_s)
            return
        left = res.get("nodenames") or []
        if not left:
            self.stats.unschedulable[uid] = res
            self._changed.set()
            if self.retry_unschedulable:
                self._later(uid, self.retry_s)
            return
        self.stats.unschedulable.pop(uid, None)
        self.assumed.add(uid)
        self._spawn(self._bind(http, pod, left[0]))

    async def _bind(self, http: aiohttp.ClientSession, pod: Obj, node: str) -> None:
        uid = pod["metadata"]["uid"]
        try:
            async with self.bind_room:
                async with http.post(f"{self.ext}/bind", json=binding_args(pod, node)) as r:
                    status = r.status
                    res = await r.json(content_type=None)
            self.stats.binds += 1
            if status == 200 and not res.get("error"):
                self.stats.bound[uid] = node
                self.stats.bound_at[uid] = time.time()
                self.pods.pop(uid, None)
                return
            self.stats.bind_errors.setdefault(uid, []).append(f"{status} {res.get('error')}")
        finally:
            self.assumed.discard(uid)
            self._changed.set()
        self._later(uid, self.retry_s)  # Unreserve, back to the queue

    async def _schedule(self, http: aiohttp.ClientSession) -> None:
        while True:
            uid = await self.queue.get()
            self.queued.discard(uid)
            try:
                await self._cycle(http, uid)
            except (aiohttp.ClientError, ValueError) as exc:
                self.stats.filter_errors.append(f"{self.stats.names.get(uid)}: {exc!r}")
                self._later(uid, self.retry_s)

    async def run(self, done: Callable[[LoopStats], bool], timeout: float) -> LoopStats:
        """Schedule until ``done(stats)`` holds with no bind in flight, or ``timeout``."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            main = [asyncio.create_task(self._watch(http)), asyncio.create_task(self._schedule(http))]
            deadline = time.monotonic() + timeout
            try:
                while not (done(self.stats) and not self.assumed):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.stats.timed_out = True
                        break
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            finally:
                for t in [*main, *self._tasks]:
                    t.cancel()
                for t in [*main, *list(self._tasks)]:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        return self.stats
