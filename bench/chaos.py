"""Chaos benchmark: a mixed load while every service kind, then NATS, is killed -9.

Starts its own nats-server (JetStream on a store directory of its own) and every
service as a real process (``python -m services.<name>``, each with ``/readyz`` on a
free port): inventory, two placement replicas, the binder, metrics and ``--nodes``
simulated node agents. Client tasks then run for ``--duration`` seconds (longer if the
restarts slip past it, until a submit succeeds after the last one) against
``hami.api.submit`` / ``hami.api.release``: one-shot submits, waiting submits
(``wait``, short deadlines) and releases of what they hold, over a small pool of
names per client, so a name is asked for again once given back. Node churn stops
(SIGTERM) and restarts node agents other than the one chaos kills. The chaos schedule
SIGKILLs, in turn, inventory, placement replica a, placement replica b (one at a
time), the binder, metrics, a node agent, and last nats-server itself, and restarts
each on the same flags (NATS on the same port and store directory); the next kill
waits until the last one is ready again.

Every request's outcome is recorded by the client that sent it: ``ok`` (node, uid),
``refused`` (the binder answered no: placement's reasons, a name in use),
``deadline`` (the binder answered that no placement came in time), ``no_reply``
(the client's own timeout, no responders, a connection error) or ``lost`` (none of
these within the client's deadline plus 5 s: it should be impossible). A client
sends its own uid with each submit and, like ``hami submit``, withdraws it when it
gets no answer (asking again for up to 15 s while NATS or the binder is down;
``withdrawn_after_no_reply`` counts how those ended). After the load,
the bench waits until the last request's deadline plus ``--margin`` has passed and for
the placement and binder consumers to drain (``--settle-max`` at most: a killed replica's unacknowledged
batch is redelivered after the consumer's ack wait), then reads the ``hami-ledger`` and
``hami-nodes`` buckets and prints one JSON object:

- ``requests``: ``sent``, ``answered`` (ok + refused + deadline), ``no_reply``,
  ``lost``, and counts by outcome and kind;
- ``orphaned``: uids in the ledger no client holds as ``ok`` (told otherwise, or
  nothing), with what their clients were told (``orphaned_told``);
  ``held_not_in_ledger``: the reverse (``gone_after_unanswered_release``: the same
  for a client whose last release of it went unanswered, which may rightly be gone);
  ``samples``: a few of each, to start an investigation from;
- ``double_booked``: a uid in two nodes' ledgers, a name held under two uids in the
  ledger, or a client told ``ok`` for a name it already held;
- ``over_capacity``: cards whose allocated memory, cores or slots exceed the card's;
- ``restarts``: per kill, ``ready_s`` (restart to ``/readyz`` 200; for NATS, to every
  service ready again), ``first_ok_s`` (restart to the next ``ok`` submit) and the
  outcomes of the requests sent in the 2 s after the restart;
- ``placement_failover_visible``: while a placement replica is down (kill to its
  restart being ready), one-shot submits sent after the kill that got no reply or a
  deadline, and any no-reply; requests sent before the kill and lost with the dead
  replica's in-flight batch are ``placement_inflight_casualties``;
- ``targets_met`` and ``misses``: 0 lost, 0 orphaned, 0 double-booked, 0 over
  capacity, every request answered or told it timed out, each restart ready within
  ``--recover-target`` (2 s), 0 placement failover visible. The exit code is 0 either
  way (2 when the bench itself could not run).

    .venv/bin/python bench/chaos.py --duration 60 --nodes 10
    .venv/bin/python bench/chaos.py --duration 8 --nodes 3 --release-timeout 4 --settle-max 45  # the test's
    .venv/bin/python bench/chaos.py --auth ...   # per-role nkeys and TLS, as hami up runs
    .venv/bin/python bench/chaos.py --kill '' [--no-churn]   # the same load, nothing killed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402

from hami.creds import Store, roles_for  # noqa: E402
from shared import auth, subjects  # noqa: E402
from shared.bus import ENCODER, Bus, decode  # noqa: E402
from shared.natsserver import EmbeddedNats, die_with_parent, free_port  # noqa: E402
from shared.schemas import (  # noqa: E402
    ContainerAsk,
    DeviceAsk,
    NodeInventory,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
    WithdrawReply,
    WithdrawRequest,
    card_usage,
)

GPUS = "A10:2:24576"  # per simulated node: two 24 GiB cards
# The asks' shapes: (memory %, cores %); a node's 200 cores hold about ten of them.
SHAPES = [(10, 10), (25, 20), (25, 30), (50, 20), (10, 40)]
LOST_MARGIN = 5.0  # past a client's own deadline, a request that has not ended is lost
ENV = {"HAMI__LOGLEVEL": "WARNING", "HAMI__HEARTBEATINTERVAL": "0.3", "HAMI__UNHEALTHYAFTER": "1.5"}


# ------------------------------------------------------------------ processes


class Proc:
    """One service process, killed and restarted on the same flags and ports."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str]) -> None:
        self.name = name
        self.health_port = free_port()
        self.argv = [sys.executable, "-m", *argv, "--health-port", str(self.health_port),
                     "--health-host", "127.0.0.1"]
        self.log = logs / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork, not a wait
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{self.health_port}/readyz",
                                timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def until_ready(self, http: aiohttp.ClientSession, timeout: float) -> float | None:
        """Seconds until ``/readyz`` answers 200, from now; None past ``timeout``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if await self.ready(http):
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return None

    def log_problems(self) -> int:
        """Lines of its log at ERROR or above, and tracebacks."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines()
                   if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"))


# --------------------------------------------------------------------- clients


@dataclass
class Outcome:
    kind: str  # submit | wait | release
    name: str
    sent: float  # monotonic
    ended: float = 0.0
    result: str = ""  # ok | refused | deadline | no_reply | lost
    uid: str = ""
    node: str = ""
    detail: str = ""


@dataclass
class Load:
    """What every client did, and what each holds now (name -> uid)."""

    outcomes: list[Outcome] = field(default_factory=list)
    held: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (uid, node)
    double_told: int = 0
    # monotonic; no end while the chaos schedule runs (on a loaded machine the restarts
    # slip past the duration, and a client that has ended would see none of them)
    stop_at: float = math.inf
    told: dict[str, str] = field(default_factory=dict)  # uid -> last result its client saw
    # names whose last release went unanswered: the client still holds them, and may
    # rightly find them gone from the ledger
    unsure: set[str] = field(default_factory=set)
    withdrawals: list[asyncio.Task[None]] = field(default_factory=list)
    withdrawn: Counter[str] = field(default_factory=Counter)  # how each withdrawal ended


WITHDRAW_FOR = 15.0  # seconds a client keeps trying to withdraw a submit nobody answered


async def withdraw(nc: Any, load: Load, uid: str, name: str) -> None:
    """What ``hami submit`` does when it gets no answer: withdraw by its own uid, so a
    placement whose reply was lost (or still to come) is released, not orphaned. It
    asks again while NATS or the binder is down."""
    payload = ENCODER.encode(WithdrawRequest(uid=uid, name=name))
    until = time.monotonic() + WITHDRAW_FOR
    while True:
        try:
            msg = await nc.request(subjects.API_WITHDRAW, payload, timeout=2.0)
            rep = decode(msg.data, WithdrawReply)
            if rep.ok:
                load.withdrawn["ok"] += 1
                load.told[uid] = "nothing (no reply); withdrawn"
                return
        except Exception:  # noqa: S110 - down for now: ask again
            pass
        if time.monotonic() > until:
            load.withdrawn["gave up"] += 1
            return
        await asyncio.sleep(0.25)


async def _ask(nc: Any, subject: str, payload: bytes, timeout: float, out: Outcome) -> bytes | None:
    """The reply's data, or None with ``out`` filled in (no reply, or lost)."""
    try:
        async with asyncio.timeout(timeout + LOST_MARGIN):
            try:
                msg = await nc.request(subject, payload, timeout=timeout)
                data: bytes = msg.data
                return data
            except nats.errors.NoRespondersError:
                out.result, out.detail = "no_reply", "no responders"
            except nats.errors.TimeoutError:
                out.result, out.detail = "no_reply", "timeout"
            except (nats.errors.Error, OSError) as exc:
                out.result, out.detail = "no_reply", type(exc).__name__
    except TimeoutError:
        out.result, out.detail = "lost", "no outcome within the deadline"
    return None


async def client(
    k: int, nc: Any, load: Load, rng: random.Random, *, names: int,
    submit_timeout: float, wait_timeout: float, release_timeout: float,
) -> None:
    pool = [f"c{k}-{i}" for i in range(names)]
    while time.monotonic() < load.stop_at:
        held = [n for n in pool if n in load.held]
        free = [n for n in pool if n not in load.held]
        if held and (not free or rng.random() < 0.4):
            name = rng.choice(held)
            o = Outcome("release", name, time.monotonic())
            load.outcomes.append(o)
            data = await _ask(nc, subjects.API_RELEASE, ENCODER.encode(ReleaseRequest(name=name)),
                              release_timeout, o)
            o.ended = time.monotonic()
            if data is not None:
                rel = decode(data, ReleaseReply)
                o.uid, o.node = rel.uid, rel.node
                uid = load.held[name][0]
                # Told it is gone, or that there is no such allocation: either way the
                # client no longer holds it. After no reply it still does, and asks again.
                del load.held[name]
                load.unsure.discard(name)
                o.result = "ok" if rel.ok else "refused"
                o.detail = rel.error
                told = "released" if rel.ok else "release refused"
                if rel.ok and rel.uid and rel.uid != uid:  # the binder freed another uid
                    told += f" (the binder released {rel.uid})"
                load.told[uid] = f"{told}: {rel.error}" if rel.error else told
            else:
                load.unsure.add(name)
        else:
            name = rng.choice(free)
            mem, cores = rng.choice(SHAPES)
            wait = rng.random() < 0.35
            timeout = wait_timeout if wait else submit_timeout
            o = Outcome("wait" if wait else "submit", name, time.monotonic())
            load.outcomes.append(o)
            # Its own uid, as ``hami submit`` sends: it can withdraw by it whatever happens.
            req = SubmitRequest(name=name, wait=wait, timeout=timeout, uid=str(uuid.uuid4()), containers=[
                ContainerAsk(devices=[DeviceAsk(mem_percent=mem, cores=cores)])])
            # The binder answers within the request's own timeout; one more second for
            # the round trips, after which the client tells itself it timed out.
            data = await _ask(nc, subjects.API_SUBMIT, ENCODER.encode(req), timeout + 1.0, o)
            o.ended = time.monotonic()
            if data is not None:
                rep = decode(data, SubmitReply)
                o.uid = rep.uid
                if rep.ok and rep.decision is not None:
                    o.result, o.node = "ok", rep.decision.node
                    if name in load.held:
                        load.double_told += 1
                    load.held[name] = (rep.uid, rep.decision.node)
                    load.unsure.discard(name)
                elif rep.error.startswith("no placement within"):  # (with the last reasons)
                    o.result, o.detail = "deadline", rep.error
                elif rep.failure is not None:
                    o.result, o.detail = "refused", rep.failure.message
                else:
                    o.result, o.detail = "refused", rep.error
                if rep.uid:
                    load.told[rep.uid] = o.result
            else:
                o.uid = req.uid
                load.withdrawals.append(asyncio.create_task(withdraw(nc, load, req.uid, name)))
        if o.result == "no_reply":
            await asyncio.sleep(0.1)  # the binder or NATS is down: do not spin
        else:
            await asyncio.sleep(rng.uniform(0.02, 0.1))


# ------------------------------------------------------------------ the system


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hami-chaos-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.server = EmbeddedNats(data_dir=self.tmp / "nats", die_with_parent=True)
        self.store: Store | None = Store(self.tmp / "auth") if args.auth else None
        self.nodes = [f"chaos-node-{i}" for i in range(args.nodes)]
        self.procs: dict[str, Proc] = {}
        self.restarts: list[dict[str, Any]] = []
        self.downtime: list[tuple[str, float, float]] = []  # placement kills: (name, kill, ready)
        self.churned = 0

    def _role_flags(self, role: str) -> list[str]:
        if self.store is None:
            return []
        c = self.store.credentials(role)
        return ["--creds", c.seed_file, "--role", role, "--tls-ca", c.tls_ca]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAMI")}
        env.update(ENV)
        env["HAMI_CONFIG"] = ""
        env["HAMI_STATE_FILE"] = str(self.tmp / "state.json")
        return env

    def _define(self, url: str) -> None:
        env = self._env()
        base = ["--nats-url", url]

        def add(name: str, module: str, role: str, extra: list[str] | None = None) -> None:
            self.procs[name] = Proc(name, [module, *base, *self._role_flags(role), *(extra or [])],
                                    self.logs, env)

        add("inventory", "services.inventory", auth.INVENTORY)
        add("placement-a", "services.placement", auth.PLACEMENT)
        add("placement-b", "services.placement", auth.PLACEMENT)
        add("binder", "services.binder", auth.BINDER)
        add("metrics", "services.metrics", auth.METRICS, ["--port", str(free_port())])
        for n in self.nodes:
            add(n, "services.nodeagent", f"{auth.NODEAGENT}:{n}", ["--node", n, "--sim-gpus", GPUS])

    async def connect(self, name: str, role: str) -> Bus:
        creds = self.store.credentials(role) if self.store is not None else None
        return await Bus.connect(self.server.url, name, setup=False, creds=creds)

    async def start(self, http: aiohttp.ClientSession) -> None:
        if self.store is not None:
            self.server.configure(self.store.server_config(roles_for(self.nodes), port=self.server.port))
        await self.server.astart()
        # The services create the stream and buckets; the admin bus does too, so the
        # bench never reads a bucket that is not there yet.
        admin = await Bus.connect(self.server.url, "chaos-setup",
                                  creds=self.store.credentials(auth.ADMIN) if self.store else None)
        await admin.close()
        self._define(self.server.url)
        for p in self.procs.values():
            p.start()
        waits = await asyncio.gather(*(p.until_ready(http, 60) for p in self.procs.values()))
        late = [n for n, w in zip(self.procs, waits, strict=True) if w is None]
        if late:
            raise RuntimeError(f"not ready within 60 s: {', '.join(late)}; logs in {self.logs}")

    async def all_ready(self, http: aiohttp.ClientSession) -> bool:
        live = [p for p in self.procs.values() if p.running]
        return all(await asyncio.gather(*(p.ready(http) for p in live)))

    # ------------------------------------------------------------- chaos

    async def kill_and_restart(self, http: aiohttp.ClientSession, kind: str, down: float,
                               load: Load) -> None:
        t_kill = time.monotonic()
        if kind == "nats":
            assert self.server.proc is not None
            self.server.proc.send_signal(signal.SIGKILL)
            self.server.proc.wait()
            await asyncio.sleep(down)
            t_restart = time.monotonic()
            await self.server.astart()
            ready: float | None = None
            deadline = t_restart + self.args.recover_max
            while time.monotonic() < deadline:
                if await self.all_ready(http):
                    ready = time.monotonic() - t_restart
                    break
                await asyncio.sleep(0.05)
        else:
            p = self.procs[kind]
            p.signal(signal.SIGKILL)
            await asyncio.sleep(down)
            t_restart = time.monotonic()
            p.start()
            ready = await p.until_ready(http, self.args.recover_max)
        if kind.startswith("placement"):
            self.downtime.append((kind, t_kill, t_restart + (ready if ready is not None else self.args.recover_max)))
        self.restarts.append({"kind": kind, "_kill": t_kill, "_restart": t_restart,
                              "down_s": round(t_restart - t_kill, 3),
                              "ready_s": None if ready is None else round(ready, 3)})

    async def schedule(self, http: aiohttp.ClientSession, load: Load, t0: float) -> None:
        every = ["inventory", "placement-a", "placement-b", "binder", "metrics", "nodeagent", "nats"]
        kinds = [self.nodes[0] if k == "nodeagent" else k for k in every if k in self.args.kill]
        if not kinds:
            return
        d = self.args.duration
        first, last = 0.12 * d, 0.8 * d
        step = (last - first) / max(1, len(kinds) - 1)
        down = min(0.5, step * 0.25)
        for i, kind in enumerate(kinds):
            delay = t0 + first + i * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.kill_and_restart(http, kind, down, load)

    async def churn(self, stop_at: float, rng: random.Random) -> None:
        """Stop and later start node agents other than the one chaos kills."""
        candidates = self.nodes[1:]
        if not candidates or self.args.no_churn:
            return
        period = max(1.0, self.args.duration / 5)
        while time.monotonic() + period < stop_at:
            await asyncio.sleep(period * rng.uniform(0.5, 1.0))
            p = self.procs[rng.choice(candidates)]
            await asyncio.to_thread(p.signal, signal.SIGTERM)
            self.churned += 1
            await asyncio.sleep(period * 0.4)
            p.start()

    # ------------------------------------------------------------- results

    async def settle(self, bus: Bus, deadline: float) -> tuple[float, dict[str, Any]]:
        """Past ``deadline`` (the last request's) plus a margin, and until the placement
        and binder consumers have nothing pending or unacknowledged (``--settle-max`` at
        most), then the margin again."""
        t0 = time.monotonic()
        await asyncio.sleep(max(0.0, deadline + self.args.margin - t0))
        state: dict[str, Any] = {}
        while time.monotonic() - t0 < self.args.settle_max:
            try:
                for c in (subjects.PLACEMENT_CONSUMER, auth.BINDER_CONSUMER):
                    i = await bus.js.consumer_info(subjects.EVENTS_STREAM, c)
                    state[c] = {"pending": i.num_pending, "ack_pending": i.num_ack_pending,
                                "redelivered": i.num_redelivered}
                if all(v["pending"] == 0 and v["ack_pending"] == 0 for v in state.values()):
                    break
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                state["error"] = str(exc)
            await asyncio.sleep(0.2)
        state["drained"] = all(isinstance(v, dict) and not v["pending"] and not v["ack_pending"]
                               for k, v in state.items() if k != "error") and bool(state)
        # what a drained consumer last handed over reaches the ledger
        await asyncio.sleep(self.args.margin)
        return time.monotonic() - t0, state

    async def read_bucket(self, bus: Bus, bucket: str) -> dict[str, bytes]:
        kv = await bus.kv(bucket)
        out: dict[str, bytes] = {}
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return out
        for key in keys:
            raw, _ = await bus.kv_get_raw(bucket, key)
            if raw is not None:
                out[key] = raw
        return out

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.signal(signal.SIGTERM)
        self.server.stop()


def check_ledger(
    ledgers: list[NodeLedger], inventories: dict[str, NodeInventory]
) -> tuple[dict[str, str], int, list[dict[str, Any]]]:
    """uid -> node of every allocation; double bookings; cards over capacity."""
    where: dict[str, str] = {}
    double = 0
    names: dict[tuple[str, str], set[str]] = {}
    per_card: dict[str, list[int]] = {}
    for led in ledgers:
        for uid, a in led.allocs.items():
            if uid in where and where[uid] != led.node:
                double += 1
            where[uid] = led.node
            names.setdefault((a.namespace, a.name), set()).add(uid)
            for card, (mem, cores, slots) in card_usage(a.containers).items():
                u = per_card.setdefault(card, [0, 0, 0])
                u[0] += mem
                u[1] += cores
                u[2] += slots
    double += sum(len(u) - 1 for u in names.values() if len(u) > 1)
    cards = {d.uuid: d for inv in inventories.values() for d in inv.devices}
    over: list[dict[str, Any]] = []
    for card, (mem, cores, slots) in per_card.items():
        d = cards.get(card)
        if d is None:
            over.append({"card": card, "problem": "not in the inventory"})
        elif mem > d.devmem or cores > d.devcore or slots > d.count:
            over.append({"card": card, "mem": [mem, d.devmem], "cores": [cores, d.devcore],
                         "slots": [slots, d.count]})
    return where, double, over


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    chaos = Chaos(args)
    load = Load()
    wall0 = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            await chaos.start(http)
            startup = time.monotonic() - wall0
            cbus = await chaos.connect("chaos-clients", auth.CLI)
            t0 = time.monotonic()
            timeouts = {"submit_timeout": args.submit_timeout, "wait_timeout": args.wait_timeout,
                        "release_timeout": args.release_timeout}
            sched = asyncio.create_task(chaos.schedule(http, load, t0))
            churn = asyncio.create_task(chaos.churn(t0 + args.duration, random.Random(rng.random())))
            clients = [asyncio.create_task(client(k, cbus.nc, load, random.Random(rng.random()),
                                                  names=args.names, **timeouts))
                       for k in range(args.clients)]
            await sched
            # The load runs its duration and at least 3 s past the last restart's being
            # ready (NATS: the clients reconnect 0.5 s apart), so it is seen working after.
            load.stop_at = max(t0 + args.duration, time.monotonic() + 3.0)
            # On a loaded machine 3 s may see no request through yet: go on until one
            # placed after the last restart is seen (20 s at most), so "works after
            # NATS's restart" is measured rather than guessed.
            last = chaos.restarts[-1]["_restart"] if chaos.restarts else 0.0
            while time.monotonic() < last + 20.0 and not any(
                    o.result == "ok" and o.kind != "release" and o.sent > last
                    for o in load.outcomes):
                load.stop_at = max(load.stop_at, time.monotonic() + 1.0)
                await asyncio.sleep(0.2)
            await asyncio.gather(*clients)
            await asyncio.gather(*load.withdrawals)
            await churn
            load_s = time.monotonic() - t0
            # node agents churned out come back before the inventory is read
            for n in chaos.nodes:
                if not chaos.procs[n].running:
                    chaos.procs[n].start()
            rbus = await chaos.connect("chaos-reader", auth.ADMIN)
            # Past the last request's deadline (every request has ended by now, so this
            # is mostly over already), then until the consumers drain.
            longest = max(args.submit_timeout, args.wait_timeout, args.release_timeout) + 1.0
            last_sent = max((o.sent for o in load.outcomes), default=time.monotonic())
            settle_s, consumers = await chaos.settle(rbus, last_sent + longest)
            led_raw = await chaos.read_bucket(rbus, subjects.LEDGER_BUCKET)
            inv_raw = await chaos.read_bucket(rbus, subjects.NODES_BUCKET)
            await rbus.close()
            await cbus.close()
    finally:
        await asyncio.to_thread(chaos.stop_all)
        if args.keep_logs:
            shutil.copytree(chaos.logs, args.keep_logs, dirs_exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(chaos.server.data_dir / "nats-server.log", args.keep_logs)
        shutil.rmtree(chaos.tmp, ignore_errors=True)
    ledgers = [decode(v, NodeLedger) for v in led_raw.values()]
    invs = {inv.node: inv for inv in (decode(v, NodeInventory) for v in inv_raw.values())}
    where, double, over = check_ledger(ledgers, invs)
    return report(args, chaos, load, where, double + load.double_told, over,
                  {"startup_s": startup, "load_s": load_s, "settle_s": settle_s}, consumers)


def report(
    args: argparse.Namespace, chaos: Chaos, load: Load, where: dict[str, str], double: int,
    over: list[dict[str, Any]], times: dict[str, Any], consumers: dict[str, Any],
) -> dict[str, Any]:
    outs = load.outcomes
    by = Counter(o.result for o in outs)
    by_kind: dict[str, dict[str, int]] = {}
    for o in outs:
        d = by_kind.setdefault(o.kind, {})
        d[o.result] = d.get(o.result, 0) + 1
    held = {uid for uid, _ in load.held.values()}
    orphans = sorted(set(where) - held)
    orphaned_told = Counter(load.told.get(u, "nothing (no reply)") for u in orphans)
    unsure = {load.held[n][0] for n in load.unsure if n in load.held}
    missing = sorted(held - set(where) - unsure)
    gone_unanswered = len((held - set(where)) & unsure)
    ok_times = sorted(o.ended for o in outs if o.result == "ok" and o.kind != "release")
    restarts = []
    for r in chaos.restarts:
        after = [t for t in ok_times if t > r["_restart"]]
        soon = Counter(o.result for o in outs if r["_restart"] < o.sent <= r["_restart"] + 2.0)
        restarts.append({k: v for k, v in r.items() if not k.startswith("_")}
                        | {"first_ok_s": round(after[0] - r["_restart"], 3) if after else None,
                           "sent_in_next_2s": dict(soon)})
    visible: list[dict[str, Any]] = []
    casualties = 0
    for kind, kill, back in chaos.downtime:
        # A request in flight when another service (the binder, NATS) is killed next is
        # that kill's casualty, not the placement replica's.
        others = [r["_kill"] for r in chaos.restarts if r["_kill"] != kill]
        for o in outs:
            bad = o.result == "no_reply" or (o.kind == "submit" and o.result == "deadline")
            if not bad or o.kind == "release":
                continue
            if any(o.sent <= k < o.ended for k in others):
                continue
            if kill < o.sent <= back:
                visible.append({"replica": kind, "kind": o.kind, "result": o.result,
                                "detail": o.detail, "sent_after_kill_s": round(o.sent - kill, 3),
                                "down_until_s": round(back - kill, 3)})
            elif o.sent <= kill < o.ended:
                casualties += 1
    n_lost = by.get("lost", 0)
    answered = by.get("ok", 0) + by.get("refused", 0) + by.get("deadline", 0)
    misses = []
    if n_lost:
        misses.append(f"{n_lost} lost")
    if orphans:
        misses.append(f"{len(orphans)} orphaned")
    if double:
        misses.append(f"{double} double-booked")
    if over:
        misses.append(f"{len(over)} cards over capacity")
    if answered + by.get("no_reply", 0) != len(outs):
        misses.append("not every request answered or timed out")
    for r in restarts:
        if r["ready_s"] is None or r["ready_s"] > args.recover_target:
            misses.append(f"{r['kind']} ready after {r['ready_s']} s (target {args.recover_target} s)")
    if visible:
        misses.append(f"{len(visible)} requests failed during a placement failover")
    return {
        "config": {"duration_s": args.duration, "nodes": args.nodes, "clients": args.clients,
                   "names_per_client": args.names, "gpus_per_node": GPUS, "auth": bool(args.auth),
                   "submit_timeout_s": args.submit_timeout, "wait_timeout_s": args.wait_timeout,
                   "seed": args.seed},
        "times_s": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in times.items()},
        "consumers_after_settle": consumers,
        "requests": {"sent": len(outs), "answered": answered, "no_reply": by.get("no_reply", 0),
                     "lost": n_lost, "by_result": dict(by), "by_kind": by_kind,
                     "no_reply_why": dict(Counter(o.detail for o in outs if o.result == "no_reply")),
                     "withdrawn_after_no_reply": dict(load.withdrawn)},
        "ledger_allocations": len(where),
        "held_by_clients": len(held),
        "orphaned": len(orphans),
        "orphaned_told": dict(orphaned_told),
        "held_not_in_ledger": len(missing),
        "gone_after_unanswered_release": gone_unanswered,
        # a few of each, to start an investigation from
        "samples": {
            "orphaned": [{"uid": u, "node": where[u], "told": load.told.get(u, "")} for u in orphans[:5]],
            "placement_failover_visible": visible[:5],
            "held_not_in_ledger": [{"uid": u, "name": n, "node": nd} for n, (u, nd) in load.held.items()
                                   if u in set(missing[:5])],
        },
        "double_booked": double,
        "over_capacity": len(over),
        "over_capacity_cards": over[:10],
        "restarts": restarts,
        "node_churn_stops": chaos.churned,
        "placement_failover_visible": len(visible),
        "placement_inflight_casualties": casualties,
        "log_problems": {n: c for n, p in chaos.procs.items() if (c := p.log_problems())},
        "targets_met": not misses,
        "misses": misses,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--nodes", type=int, default=10, help="simulated node agents (2 A10 each)")
    ap.add_argument("--clients", type=int, default=12, help="concurrent client tasks")
    ap.add_argument("--names", type=int, default=3, help="names each client submits under")
    ap.add_argument("--submit-timeout", type=float, default=2.0, help="a one-shot submit's timeout")
    ap.add_argument("--wait-timeout", type=float, default=1.5, help="a waiting submit's timeout")
    ap.add_argument("--release-timeout", type=float, default=12.0, help="the client's wait for a release")
    ap.add_argument("--settle-max", type=float, default=40.0,
                    help="longest wait for the consumers to drain after the load")
    ap.add_argument("--margin", type=float, default=1.0, help="settle margin past the deadlines")
    ap.add_argument("--recover-target", type=float, default=2.0, help="ready within, after a restart")
    ap.add_argument("--recover-max", type=float, default=20.0, help="give up waiting for a restart")
    ap.add_argument("--kill", default="inventory,placement-a,placement-b,binder,metrics,nodeagent,nats",
                    type=lambda v: [k for k in v.split(",") if k],
                    help="what the schedule kills, in this order ('' for none: the load and churn alone)")
    ap.add_argument("--no-churn", action="store_true", help="leave the node agents alone")
    ap.add_argument("--auth", action="store_true", help="per-role nkeys and TLS, as hami up")
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the services' logs here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    unknown = set(args.kill) - {"inventory", "placement-a", "placement-b", "binder", "metrics",
                                "nodeagent", "nats"}
    if unknown:
        ap.error(f"--kill: unknown {', '.join(sorted(unknown))}")
    if args.nodes < 1 or args.clients < 1 or args.names < 1 or args.duration <= 0:
        ap.error("--nodes, --clients, --names and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The clients' connection logs every NATS restart; the JSON says what matters.
    logging.getLogger("hami").setLevel(logging.ERROR)
    try:
        out = asyncio.run(run(args))
    except Exception as exc:  # the bench itself could not run: say so as JSON
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
