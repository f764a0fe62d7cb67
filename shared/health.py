"""Liveness and readiness over HTTP: ``GET /healthz`` and ``GET /readyz``.

One :class:`HealthServer` per process (``shared.runner`` starts it on ``--health-port``,
8081 by default, for the kubelet's probes).

- ``/healthz``: 200 while the process runs its event loop and the service is not
  stopping. The server answers from the service's own loop, so an answer at all proves
  the loop turns; a loop stuck in a blocking call lets the probe time out.
- ``/readyz``: 200 only when every check passes: the service finished starting, the NATS
  connection is up, every KV watch the service holds has delivered the bucket's
  existing entries (:meth:`shared.bus.Bus.watch_states`), and whatever the service adds
  (``ready_checks()``: the binder's pod watch has synced). 503 otherwise. The body has
  one line per check, ``name: ok`` or ``name: what is not ready``, so a failing probe's
  event in ``kubectl describe pod`` says why.

A check is a function returning ``(name, problem)`` pairs, ``problem`` None when fine;
checks must not block (they read state the service keeps anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from aiohttp import web

from shared.bus import Bus

log = logging.getLogger("hami.health")

Result = tuple[str, str | None]
Check = Callable[[], Iterable[Result]]

DEFAULT_PORT = 8081


def bus_checks(bus: Bus) -> Check:
    """The NATS connection and the KV watches of ``bus``."""

    def check() -> list[Result]:
        nc = bus.nc
        if nc.is_connected:
            out: list[Result] = [("nats", None)]
        elif nc.is_reconnecting:
            out = [("nats", "disconnected, reconnecting")]
        elif nc.is_closed:
            out = [("nats", "connection closed")]
        else:
            out = [("nats", "not connected")]
        for w in bus.watch_states():
            if w.ended:
                out.append((f"kv {w.name}", "watch ended"))
            elif not w.caught_up:
                out.append((f"kv {w.name}", "initial values not yet delivered"))
            else:
                out.append((f"kv {w.name}", None))
        return out

    return check


class Health:
    """What the probes answer from: a started/stopping state and a list of checks."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.started = False
        self.stopping = False

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def live(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        return True, "ok"

    def ready(self) -> tuple[bool, list[str]]:
        results: list[Result] = [("service", None if self.started else "starting")]
        if self.stopping:
            results[0] = ("service", "stopping")
        for check in self.checks:
            try:
                results.extend(check())
            except Exception as exc:  # a broken check is a not-ready answer, not a 500
                log.exception("readiness check failed")
                results.append(("check", f"failed: {exc}"))
        ok = all(problem is None for _, problem in results)
        return ok, [f"{name}: {problem or 'ok'}" for name, problem in results]


class HealthServer:
    """Plain HTTP on ``host:port`` (port 0: any free port; see :attr:`port`)."""

    def __init__(self, health: Health, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> None:
        self.health = health
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, text = self.health.live()
        return web.Response(text=text + "\n", status=200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, lines = self.health.ready()
        return web.Response(text="\n".join(lines) + "\n", status=200 if ok else 503)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("health endpoints on %s (/healthz, /readyz)", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
