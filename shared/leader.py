"""Leader election through a ``coordination.k8s.io/v1`` Lease, for work that must run
once per cluster (the binder's pod watch and reconcile).

:class:`LeaderElector` runs the decisions of :mod:`shared.election` against the API:
read the Lease, write it back with the read ``resourceVersion`` as precondition (a 409
means another candidate wrote first: read again and decide again), create it when
missing. ``on_start`` runs when leadership is won; ``on_stop`` runs, and is awaited,
before the lease can be given up or re-contested, so the gated work never overlaps
another leader's. After losing, the elector becomes a candidate again.

:func:`pod_namespace` is the namespace this pod runs in (service account file, else
``$POD_NAMESPACE``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared.election import Election, LeaseRecord, Timing
from shared.kube import Conflict, Kube, KubeError, NotFound, path

log = logging.getLogger("hami.leader")

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LEASE_GROUP = "coordination.k8s.io"


def pod_namespace(default: str = "default") -> str:
    try:
        ns = SA_NAMESPACE.read_text().strip()
    except OSError:
        ns = ""
    return ns or os.environ.get("POD_NAMESPACE") or default


def default_identity() -> str:
    """The pod name (hostname) plus a random part, as client-go callers use."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


Callback = Callable[[], Awaitable[None]]


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        *,
        on_start: Callback,
        on_stop: Callback,
        identity: str | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.kube = kube
        self.namespace, self.name = namespace, name
        self.on_start, self.on_stop = on_start, on_stop
        self.election = Election(identity or default_identity(), timing or Timing())
        self.leading = False
        self.transitions = 0  # times this elector became leader
        self._task: asyncio.Task[None] | None = None
        self._rv: str | None = None

    @property
    def identity(self) -> str:
        return self.election.identity

    @property
    def holder(self) -> str:
        o = self.election.observed
        return o.holder if o else ""

    def _path(self, named: bool = True) -> str:
        return path("leases", self.namespace, self.name if named else None, group=LEASE_GROUP)

    async def _read(self) -> LeaseRecord | None:
        try:
            obj = await self.kube.get(self._path())
        except NotFound:
            self._rv = None
            return None
        self._rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        return LeaseRecord.from_spec(obj.get("spec"))

    async def _write(self, rec: LeaseRecord, create: bool) -> None:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        body = {"apiVersion": f"{LEASE_GROUP}/v1", "kind": "Lease", "metadata": meta,
                "spec": rec.to_spec()}
        if create:
            await self.kube.post(self._path(named=False), body)
        else:
            meta["resourceVersion"] = self._rv
            await self.kube.request("PUT", self._path(), body=body)

    async def try_acquire_or_renew(self) -> bool:
        """One round: read, decide, write. A 409 is answered by one fresh round."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            started = loop.time()
            try:
                current = await self._read()
                rec = self.election.proposal(current, loop.time(), dt.datetime.now(dt.UTC))
                if rec is None:
                    return False
                await self._write(rec, create=current is None)
            except Conflict:
                continue  # another candidate wrote in between: decide on what it wrote
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                return False
            self.election.written(rec, started, loop.time())
            return True
        return False

    async def _campaign(self) -> None:
        t = self.election.timing
        while True:
            # Candidate: try every retry period (jittered as client-go's 1.2 factor).
            while not await self.try_acquire_or_renew():  # noqa: ASYNC110 - polls the API
                await asyncio.sleep(t.retry_period * (1 + random.random() * 1.2))
            self.leading = True
            self.transitions += 1
            log.info("%s leads %s/%s", self.identity, self.namespace, self.name)
            try:
                try:
                    await self.on_start()
                except Exception:
                    log.exception("%s: starting the leader's work failed; stepping down",
                                  self.identity)
                    await asyncio.sleep(t.retry_period)
                    continue
                loop = asyncio.get_running_loop()
                while True:
                    await asyncio.sleep(t.retry_period)
                    ok = await self.try_acquire_or_renew()
                    if not ok and self.election.held_by_other(loop.time()):
                        log.warning("%s: lease taken by %s", self.identity, self.holder)
                        break
                    if not ok and self.election.renew_overdue(loop.time()):
                        log.warning("%s: no renewal within %gs; stepping down",
                                    self.identity, t.renew_deadline)
                        break
            finally:
                self.leading = False
                self.election.lost()
                await self.on_stop()

    def start(self) -> None:
        self._task = asyncio.create_task(self._campaign(), name=f"leader-{self.name}")

    async def stop(self, release: bool = True) -> None:
        """Stop leading (``on_stop`` awaited) and, with ``release``, give the lease up."""
        was_leader = self.election.is_leader()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not (release and was_leader):
            return
        rec = self.election.release_record(dt.datetime.now(dt.UTC))
        if rec is None:
            return
        try:
            current = await self._read()
            if current is not None and current.holder == self.identity:
                await self._write(rec, create=False)
        except Exception as exc:  # best effort: the lease then expires on its own
            log.warning("releasing lease %s/%s: %s", self.namespace, self.name, exc)
