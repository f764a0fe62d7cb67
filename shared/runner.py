"""Running one service as its own process: ``python -m services.<name>``.

Parses the common flags, loads the configuration, connects the bus, starts the service
and stops it cleanly on SIGINT/SIGTERM. ``--health-port`` (8081; 0 switches it off)
serves ``/healthz`` and ``/readyz`` (:mod:`shared.health`) from before the connection
is made until the service has stopped; a service with a ``ready_checks()`` method adds
its own readiness checks. ``--creds`` (an nkey seed file), ``--role`` and ``--tls-ca``
connect it under its role's identity (:mod:`shared.auth`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from shared import auth, config, health, logs, tracing
from shared.bus import Bus

log = logging.getLogger("hami.runner")


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def common_args(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--nats-url", default=None, help="NATS server (default: $HAMI_NATS_URL)")
    p.add_argument("--config", default=None, help="YAML configuration file")
    p.add_argument("--health-port", type=int, default=health.DEFAULT_PORT,
                   help="port of /healthz and /readyz (default %(default)s; 0: off)")
    p.add_argument("--health-host", default="0.0.0.0", help="address of the health endpoints")
    a = p.add_argument_group("identity on the bus (docs/security.md)")
    a.add_argument("--creds", default=os.environ.get("HAMI_NATS_SEED") or None, metavar="FILE",
                   help="nkey seed file of this service's role (default: $HAMI_NATS_SEED)")
    a.add_argument("--role", default=os.environ.get("HAMI_NATS_ROLE") or None,
                   help="the role the seed is for (default: $HAMI_NATS_ROLE, else the service; "
                        "a node agent is nodeagent:<node>)")
    a.add_argument("--tls-ca", default=os.environ.get("HAMI_NATS_CA") or None, metavar="FILE",
                   help="CA of the server's certificate: TLS on (default: $HAMI_NATS_CA)")
    return p


def kube_flags(group: argparse._ArgumentGroup) -> None:
    """The flags that name a service's API server (read by :func:`shared.kube.connect_from`)."""
    group.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", default=None, help="kubeconfig context")
    group.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    group.add_argument("--kube-host", default=None, help="API server URL without auth (tests)")


def credentials(
    args: argparse.Namespace, service: str, node_name: str = ""
) -> auth.Credentials | None:
    """The ``--creds`` identity, or None (an unauthenticated connection). A node agent's
    role defaults to ``nodeagent:<its node>``, named as the agent names itself."""
    seed = getattr(args, "creds", None)
    if not seed:
        return None
    role = getattr(args, "role", None) or service
    if role == auth.NODEAGENT:
        node = getattr(args, "node", None) or node_name or socket.gethostname()
        role = f"{auth.NODEAGENT}:{node}"
    return auth.Credentials(role=role, seed_file=seed,
                            tls_ca=getattr(args, "tls_ca", None) or "")


async def start_health(args: argparse.Namespace, name: str) -> health.HealthServer | None:
    """The health server of ``args``, started; None when switched off or the port is taken.

    A taken port is logged, not fatal: several services run side by side on one host
    (benchmarks, a laptop) share the default; in a pod the probes then fail and say so.
    """
    port = getattr(args, "health_port", 0)
    if not port:
        return None
    server = health.HealthServer(health.Health(), getattr(args, "health_host", "0.0.0.0"), port)
    try:
        await server.start()
    except OSError as exc:
        log.warning("%s: no health endpoints on port %d: %s (--health-port to choose another)",
                    name, port, exc)
        return None
    return server


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(
    name: str,
    args: argparse.Namespace,
    make: Callable[[Bus, config.Config], Awaitable[Service]],
) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    url = args.nats_url or cfg.nats_url
    if not url:
        raise SystemExit(f"{name}: no NATS server given (--nats-url or HAMI_NATS_URL)")
    logs.setup(name, cfg.log_level)
    try:
        tracing.setup(name)
    except tracing.TracingError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        hs = await start_health(args, name)
        try:
            bus = await Bus.connect(
                url, name, creds=credentials(args, name, cfg.node_name), settings=cfg.bus
            )
            if hs is not None:
                hs.health.add(health.bus_checks(bus))
            svc = await make(bus, cfg)
            checks = getattr(svc, "ready_checks", None)
            if hs is not None and callable(checks):
                hs.health.add(checks)
            await svc.start()
            if hs is not None:
                hs.health.started = True
            # What start-up built (modules, the cluster's state as first read) lives as
            # long as the process: keep the collector from re-scanning it, whose full
            # passes over a 5,000-node view were the tail of placement's latency.
            gc.freeze()
            try:
                await wait_for_signal()
            finally:
                if hs is not None:
                    hs.health.stopping = True
                await svc.stop()
                await bus.close()
        finally:
            if hs is not None:
                await hs.stop()

    try:
        asyncio.run(main())
    finally:
        tracing.shutdown()  # the last batch of spans reaches the collector
    return 0
