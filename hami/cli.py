"""The ``hami`` command: run the system, ask for slices, look at the cluster, replay traces.

``hami up`` records where it listens in a state file (``$HAMI_STATE_FILE``, default
``~/.hami/state.json``) so the other commands find the running system without flags;
``--nats-url`` or ``$HAMI_NATS_URL`` point them elsewhere.

Every failure is one line and an exit code (docs/cli.md): a one-shot command connects
once, with a timeout, and never retries; with ``--json`` an error is one JSON object
``{"error": ..., "code": ...}`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from importlib import metadata
from typing import Any, NoReturn

import msgspec

from hami import creds, state
from hami import defrag as defrag_cmd
from shared import config, logs, subjects, tracing
from shared.bus import Bus, decode_event
from shared.hami.codec import NODE_POLICIES
from shared.schemas import (
    AllocPreempted,
    ClusterStatus,
    Constraints,
    ContainerAsk,
    DeviceAsk,
    ErrorReply,
    LedgerAlloc,
    NodeStatus,
    PendingRequest,
    QueuesReply,
    QueuesRequest,
    QueueStatus,
    ReleaseReply,
    ReleaseRequest,
    RunReply,
    RunRequest,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    WithdrawReply,
    WithdrawRequest,
    card_usage,
)

# Exit codes (docs/cli.md).
OK = 0
REFUSED = 1  # no placement, no such allocation
USAGE = 2  # bad flags, configuration, input files
UNREACHABLE = 3  # NATS or the hami services cannot be reached; no or stale state file
CANNOT_START = 4  # hami up: a port in use, nats-server missing or failing
PREEMPTED = 5  # hami run: the slice was preempted and the command stopped
INTERRUPTED = 130  # Ctrl-C
BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE, as a shell reports it)

CONNECT_TIMEOUT = 2.0  # seconds for the one connection attempt of a one-shot command
WITHDRAW_TIMEOUT = 3.0  # seconds for the answer to a withdrawal, once connected
NO_RESPONDERS_RETRY_S = 3.0  # ask again this long while nothing answers (services reconnecting)


class Fail(Exception):
    """A command's failure: one line for the user and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def version() -> str:
    try:
        return metadata.version("hami-bus")
    except metadata.PackageNotFoundError:
        return "unknown"


def find_nats(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("HAMI_NATS_URL"):
        return os.environ["HAMI_NATS_URL"]
    try:
        return str(state.read()["nats_url"])
    except state.StateError as exc:
        raise Fail(str(exc), UNREACHABLE) from None


def why(exc: BaseException) -> str:
    """A connection failure in a few words."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g}s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def shown(url: str) -> str:
    """A URL fit for a message: credentials left out."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep and "@" in rest else url


async def connect(url: str) -> Bus:
    try:
        return await Bus.connect(url, "cli", setup=False, once=CONNECT_TIMEOUT,
                                 creds=creds.client_credentials())
    except Exception as exc:
        raise Fail(f"cannot reach NATS at {shown(url)}: {why(exc)}", UNREACHABLE) from None


async def request(
    url: str, subject: str, msg: msgspec.Struct | None, reply: type[Any], timeout: float
) -> Any:
    import nats.errors

    bus = await connect(url)
    body = msgspec.json.encode(msg) if msg is not None else b"{}"
    # "No responders" means nobody took the request, so asking again is safe: for a few
    # seconds, the services may be reconnecting after a NATS restart.
    retry_until = time.monotonic() + min(timeout, NO_RESPONDERS_RETRY_S)
    try:
        while True:
            asked = asyncio.ensure_future(bus.nc.request(subject, body, timeout=timeout))
            # Without reconnects a lost server closes the client, but leaves the request
            # waiting out its whole timeout (minutes with --wait): look now and then.
            while not (await asyncio.wait({asked}, timeout=0.25))[0]:
                if not bus.nc.is_connected:
                    asked.cancel()
                    raise Fail(f"lost the connection to NATS at {shown(url)}", UNREACHABLE)
            if not isinstance(asked.exception(), nats.errors.NoRespondersError) or time.monotonic() > retry_until:
                break
            await asyncio.sleep(0.25)
        data = asked.result().data
    except nats.errors.NoRespondersError:
        raise Fail(f"nothing answers {subject} at {shown(url)}: is 'hami up' running?", UNREACHABLE) from None
    except TimeoutError:
        raise Fail(f"no answer on {subject} within {timeout:g}s", UNREACHABLE) from None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), CONNECT_TIMEOUT)
    try:
        err = msgspec.json.decode(data)
        if isinstance(err, dict) and set(err) <= {"error", "detail"} and "error" in err:
            return msgspec.convert(err, ErrorReply)
        return msgspec.json.decode(data, type=reply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Fail(f"unexpected answer on {subject}: {exc}", UNREACHABLE) from None


def emit(args: argparse.Namespace, obj: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj))
    else:
        for line in lines:
            print(line)


# ----------------------------------------------------------------------------- up


def cmd_up(args: argparse.Namespace) -> int:
    from hami.system import System
    from services.nodeagent.backends.sim import SimSpecError, parse_gpu_specs
    from shared.natsserver import NatsServerError

    cfg = config.load(args.config)
    if args.sim_node and (args.sim_gpus or args.sim_nodes is not None):
        raise Fail("--sim-node gives each node its cards: not with --sim-nodes or --sim-gpus", USAGE)
    for spec in (args.sim_gpus or []) + (args.sim_node or []):
        try:
            parse_gpu_specs([spec])
        except SimSpecError as exc:
            raise Fail(str(exc), USAGE) from None
    for spec in cfg.sim.gpus:
        try:
            parse_gpu_specs([spec])
        except SimSpecError as exc:
            raise Fail(f"configuration sim.gpus: {exc}", USAGE) from None
    try:
        other = state.read()
    except state.StateError:
        pass  # none, unreadable or stale (read() cleared a stale one): ours to write
    else:
        if other.get("pid") != os.getpid():
            raise Fail(
                f"another 'hami up' runs (pid {other.get('pid')}, {other['nats_url']}); "
                "stop it, or give this one its own HAMI_STATE_FILE", CANNOT_START,
            )
    logs.setup("up", cfg.log_level)
    try:
        tracing.setup("up")
    except tracing.TracingError as exc:
        raise Fail(str(exc), USAGE) from None

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.nats_url:
            # An outside server must answer now; the services would wait for it forever.
            await (await connect(args.nats_url)).close()
        system = System(cfg, nats_url=args.nats_url, sim_nodes=args.sim_nodes,
                        sim_gpus=args.sim_gpus, metrics_port=args.metrics_port,
                        sim_node_gpus=[[n] for n in args.sim_node] if args.sim_node else None,
                        nats_dies_with_parent=True,
                        auth=creds.up_store(args.no_auth, bool(args.nats_url)))
        starting = asyncio.create_task(system.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal while starting: System.start cleans up
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            return INTERRUPTED
        stopping.cancel()
        try:
            starting.result()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Fail(f"metrics port {system.metrics.port if system.metrics else '?'} "
                           "is in use: choose another with --metrics-port", CANNOT_START) from None
            raise Fail(f"cannot start: {exc}", CANNOT_START) from None
        except NatsServerError as exc:
            raise Fail(f"cannot start nats-server: {exc}", CANNOT_START) from None
        except TimeoutError:
            raise Fail("cannot start: the nodes did not register within 10s", CANNOT_START) from None
        try:
            nats_proc = system.nats.proc if system.nats else None
            temp_dir = str(system.nats.data_dir) if system.nats and system.nats.temporary else None
            try:
                state.write(state.record(system.nats_url or "", system.metrics_url,
                                         nats_proc.pid if nats_proc else None, temp_dir)
                            | creds.up_state(system.auth, system.nats.config_file if system.nats else None))
            except OSError as exc:
                raise Fail(f"cannot write state file {state.path()}: {exc}", CANNOT_START) from None
            nodes = [a.node for a in system.agents]
            emit(args, {"nats_url": system.nats_url, "metrics_url": system.metrics_url,
                        "nodes": nodes, "pid": os.getpid(), "state_file": str(state.path())},
                 [f"NATS:    {system.nats_url}", f"Metrics: {system.metrics_url}/metrics",
                  f"Nodes:   {', '.join(nodes)}",
                  *creds.up_lines(system.auth, system.nats_url or ""), "hami is up; Ctrl-C stops it"])
            sys.stdout.flush()
            await stop.wait()
        finally:
            state.remove_if_mine()
            await system.stop()
            tracing.shutdown()  # the last batch of spans reaches the collector
        if not args.json:
            print("hami stopped", flush=True)
        return OK

    return asyncio.run(main())


# ------------------------------------------------------------------------- submit


def build_submit(args: argparse.Namespace) -> SubmitRequest:
    ask = DeviceAsk(
        nums=args.gpus,
        mem=args.mem or 0,
        mem_percent=args.mem_percent,
        cores=args.cores if args.cores is not None else 0,
    )
    if args.mem is None and args.mem_percent is None and args.cores is None:
        ask.cores = 100  # a bare --gpus N asks for N whole, exclusive cards (REFERENCE §1)
    if getattr(args, "vendor", None):
        from hami.vendorask import vendor_ask

        try:  # another family's ask, as its resources on a pod's container would make it
            ask = vendor_ask(args.vendor, args.gpus, args.mem, args.mem_percent, args.cores)
        except ValueError as exc:
            raise Fail(str(exc), USAGE) from None
    return SubmitRequest(
        name=args.name,
        containers=[ContainerAsk(name=args.name, devices=[ask])],
        constraints=Constraints(node_policy=args.node_policy, gpu_policy=args.gpu_policy),
        wait=args.wait is not None,
        timeout=args.wait if args.wait is not None else 30.0,
        # Ours, so that we can withdraw it whatever happens to the binder that takes it.
        uid=str(uuid.uuid4()),
        pod_priority=getattr(args, "priority", 0),
        gang=getattr(args, "gang", None) or "",
        gang_size=getattr(args, "gang_size", None) or 0,
        gang_timeout=getattr(args, "gang_timeout", None) or 0.0,
        movable=getattr(args, "movable", False),
        queue=getattr(args, "queue", None) or "",
    )


async def withdraw(url: str, req: SubmitRequest) -> None:
    """Best effort, bounded: tell the binders nobody waits for ``req`` any more, so it is
    never placed (or is released). Whatever fails here, the binder's own deadline
    withdraws it too."""
    with contextlib.suppress(Exception):
        await request(url, subjects.API_WITHDRAW,
                      WithdrawRequest(uid=req.uid, name=req.name, namespace=req.namespace),
                      WithdrawReply, WITHDRAW_TIMEOUT)


async def submit(url: str, req: SubmitRequest) -> Any:
    """Ask, and withdraw when we stop waiting: Ctrl-C, or no answer by our own timeout
    (the binder that took the request died: its reply never comes)."""
    try:
        return await request(url, subjects.API_SUBMIT, req, SubmitReply, req.timeout + 10)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
        await withdraw(url, req)
        raise
    except Fail as exc:
        # No answer in time: the binder that took it may have died with it. (Without a
        # server nothing can be withdrawn; the binder's own deadline withdraws it then.)
        if exc.message.startswith("no answer on"):
            await withdraw(url, req)
        raise


def placement_json(r: SubmitReply) -> dict[str, Any]:
    """``submit --json``: the same keys whether placed or not."""
    out: dict[str, Any] = {
        "ok": r.ok, "name": r.name, "uid": r.uid, "node": None, "devices": [],
        "reasons": {}, "message": "", "nodes_total": 0, "error": r.error,
    }
    if r.ok and r.decision is not None:
        d = r.decision
        out["node"] = d.node
        out["devices"] = [
            {"container": c.name, "uuid": g.uuid, "index": g.index, "type": g.type, "vendor": g.vendor,
             "mem_mib": g.mem, "cores": g.cores,
             # a MIG instance: its profile and memory slices
             **({"mig": {"profile": g.mig.profile, "start": g.mig.start, "size": g.mig.size}} if g.mig else {})}
            for c in d.containers for g in c.devices
        ]
    if r.failure is not None:
        out.update(reasons=r.failure.reasons, message=r.failure.message,
                   nodes_total=r.failure.nodes_total)
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    req = build_submit(args)
    url = find_nats(args.nats_url)
    r = asyncio.run(submit(url, req))
    if isinstance(r, ErrorReply):
        busy = isinstance(r.detail, dict) and r.detail.get("busy")
        raise Fail(r.error, UNREACHABLE if busy else USAGE)
    out = placement_json(r)
    if args.json:
        print(json.dumps(out))
        return OK if r.ok else REFUSED
    if r.ok:
        print(f"{r.name}: placed on {out['node']}")
        for dev in out["devices"]:
            mig = f"  MIG {dev['mig']['profile']} at slice {dev['mig']['start']}" if "mig" in dev else ""
            print(f"  {dev['uuid']}  {dev['type']}  {dev['mem_mib']} MiB  {dev['cores']}% cores{mig}")
        return OK
    if r.failure is not None:
        # A waiting submit that timed out carries the reasons placement last gave.
        print(f"{r.name}: {r.error or 'no placement'}: {r.failure.message}")
        for reason, n in sorted(r.failure.reasons.items()):
            print(f"  {n}/{r.failure.nodes_total} {reason}")
    else:
        print(f"{r.name}: {r.error}")
    return REFUSED


def cmd_release(args: argparse.Namespace) -> int:
    url = find_nats(args.nats_url)
    r = asyncio.run(request(url, subjects.API_RELEASE, ReleaseRequest(name=args.name), ReleaseReply, 20))
    if isinstance(r, ErrorReply):
        raise Fail(r.error, USAGE)
    if not r.ok:
        raise Fail(r.error, REFUSED)
    emit(args, {"ok": True, "name": args.name, "uid": r.uid, "node": r.node, "note": r.error},
         [f"{args.name}: released from {r.node}" + (f" ({r.error})" if r.error else "")])
    return OK


# ---------------------------------------------------------------------------- run

RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent (a terminal's Ctrl-C)
PR_SET_PDEATHSIG = 1
CANNOT_EXEC = 127  # the command could not be started (as a shell reports it)
# Where the limiter is looked for: a source checkout's `make native`, then the image's.
REPO_LIMITER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "isolation", "native", "build", "libvgpu.so")
IMAGE_LIMITER = "/usr/local/vgpu/libvgpu.so"


def find_limiter(explicit: str | None) -> str:
    """The libvgpu.so to preload: --limiter, $HAMI_LIMITER, the checkout's build, the image's."""
    given = explicit or os.environ.get("HAMI_LIMITER")
    if given:
        if not os.path.isfile(given):
            raise Fail(f"limiter {given}: no such file", USAGE)
        return os.path.abspath(given)
    for path in (REPO_LIMITER, IMAGE_LIMITER):
        if os.path.isfile(path):
            return path
    raise Fail("no libvgpu.so found: run 'make native', or pass --limiter PATH", USAGE)


def child_env(base: dict[str, str], slice_env: dict[str, str], limiter: str) -> dict[str, str]:
    """The command's environment: ours, the slice's (it wins), the limiter preloaded first."""
    env = dict(base)
    env.update(slice_env)
    old = base.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{limiter}:{old}" if old else limiter
    return env


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _in_child(parent: int) -> None:
    # Runs between fork and exec: the command takes the default signal mask, and dies
    # with 'hami run' even when that is SIGKILLed (so the node agent sees both gone).
    import ctypes

    signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # died before the prctl took
        os._exit(137)


async def agent_run(url: str, node: str, req: RunRequest) -> RunReply:
    r = await request(url, subjects.agent_run(node), req, RunReply, 10)
    if isinstance(r, ErrorReply):
        return RunReply(ok=False, error=r.error)
    assert isinstance(r, RunReply)
    return r


async def give_back(url: str, req: SubmitRequest) -> bool:
    """Release by name (answered once placement has freed it); else withdraw by uid."""
    try:
        r = await request(url, subjects.API_RELEASE, ReleaseRequest(name=req.name), ReleaseReply, 20)
        if isinstance(r, ReleaseReply) and r.ok:
            return True
    except Fail:
        pass
    await withdraw(url, req)
    return False


class PreemptWatch:
    """Follows, in a thread of its own (the supervising loop is synchronous), the
    preemption events of one allocation's node, and notes the one naming its uid."""

    def __init__(self, url: str, node: str, uid: str, name: str, namespace: str = "") -> None:
        self.url, self.node, self.uid, self.name = url, node, uid, name
        self.key = full_name(name, namespace)  # as status lists it
        self.preempted = threading.Event()
        self.by: AllocPreempted | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hami-run-preempt", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(CONNECT_TIMEOUT + 2)

    def _run(self) -> None:
        # Without the watch the command still runs; it is just not stopped on preemption.
        with contextlib.suppress(Exception):
            asyncio.run(self._follow())

    async def _follow(self) -> None:
        bus = await connect(self.url)
        try:
            async def seen(msg: Any) -> None:
                with contextlib.suppress(Exception):
                    ev = decode_event(msg.data)
                    if isinstance(ev, AllocPreempted) and ev.uid == self.uid:
                        self.by = ev
                        self.preempted.set()

            await bus.subscribe(subjects.alloc("preempted", self.node), seen)
            # Preempted before the subscription took: the allocation is gone already.
            st = await bus.request(subjects.API_STATUS, StatusRequest(), ClusterStatus, timeout=10)
            if not any(self.key in n.allocations for n in st.nodes):
                self.preempted.set()
            await asyncio.to_thread(self._done.wait)
        finally:
            await bus.close()

    def message(self) -> str:
        by = self.by
        if by is None:
            return f"{self.name} on {self.node} is gone (preempted or released by someone else)"
        who = full_name(by.by_name, by.by_namespace) or by.by_uid
        return (f"{self.name} on {self.node} was preempted by {who} "
                f"(priority {by.by_priority} over {by.priority})")


def supervise(child: subprocess.Popen[bytes], watch: PreemptWatch | None = None,
              grace: float = 10.0, quiet: bool = False) -> tuple[int, bool]:
    """Wait for the command; a signal sent to us by a process is passed on to it (a
    terminal's Ctrl-C reached its whole process group, the command included, already).
    When the slice is preempted, the command is sent SIGTERM, and SIGKILL ``grace``
    seconds later. Returns its status and whether it was preempted."""
    kill_at: float | None = None
    while True:
        rc = child.poll()
        if rc is not None:
            return rc, kill_at is not None
        if watch is not None and kill_at is None and watch.preempted.is_set():
            print(f"hami run: {watch.message()}; stopping the command (SIGKILL in {grace:g}s)",
                  file=sys.stderr, flush=True)
            kill_at = time.monotonic() + grace
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        elif kill_at is not None and time.monotonic() >= kill_at:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        info = signal.sigtimedwait(RUN_SIGNALS, 0.2)
        if info is not None and info.si_code != SI_KERNEL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, info.si_signo)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise Fail("nothing to run: hami run [flags] -- CMD ARGS", USAGE)
    limiter = find_limiter(args.limiter)
    args.name = args.name or f"run-{uuid.uuid4().hex[:8]}"
    req = build_submit(args)
    url = find_nats(args.nats_url)
    r = asyncio.run(submit(url, req))
    if isinstance(r, ErrorReply):
        busy = isinstance(r.detail, dict) and r.detail.get("busy")
        raise Fail(r.error, UNREACHABLE if busy else USAGE)
    if not r.ok or r.decision is None:
        if r.failure is not None:
            reasons = ", ".join(f"{n}/{r.failure.nodes_total} {k}" for k, n in sorted(r.failure.reasons.items()))
            raise Fail(f"{req.name}: no placement: {r.failure.message}" + (f" ({reasons})" if reasons else ""),
                       REFUSED)
        raise Fail(f"{req.name}: {r.error}", REFUSED)
    node = r.decision.node
    me = os.getpid()
    watch: PreemptWatch | None = None
    try:
        ready = asyncio.run(agent_run(url, node, RunRequest(uid=r.uid, container=req.name, pids=[me])))
        if not ready.ok:
            raise Fail(f"node agent of {node}: {ready.error}", REFUSED)
        if not args.quiet:
            devs = ", ".join(f"{g.uuid} {g.mem} MiB {g.cores}% cores"
                             for c in r.decision.containers for g in c.devices)
            print(f"hami run: {req.name} on {node}: {devs}", file=sys.stderr, flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, RUN_SIGNALS)
        try:
            child = subprocess.Popen(command, env=child_env(dict(os.environ), ready.env, limiter),
                                     preexec_fn=lambda: _in_child(me))
        except OSError as exc:
            raise Fail(f"cannot run {command[0]}: {exc.strerror or exc}", CANNOT_EXEC) from None
        try:
            # From now on the slice is the command's: reclaimed once it and we are gone.
            asyncio.run(agent_run(url, node, RunRequest(uid=r.uid, container=req.name,
                                                        pids=[me, child.pid])))
        except Fail as exc:
            print(f"hami run: cannot register the command with {node}: {exc.message}",
                  file=sys.stderr, flush=True)
        watch = PreemptWatch(url, node, r.uid, req.name, req.namespace)
        watch.start()
        try:
            rc, preempted = supervise(child, watch, args.grace)
        finally:
            watch.stop()
        return PREEMPTED if preempted else exit_status(rc)
    finally:
        if watch is not None and watch.preempted.is_set():
            pass  # placement released it already
        elif not asyncio.run(give_back(url, req)):
            print(f"hami run: {req.name}: release not confirmed; its node agent reclaims it",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------ looking at it


def fetch_status(args: argparse.Namespace, detail: bool) -> ClusterStatus:
    url = find_nats(args.nats_url)
    st = asyncio.run(request(url, subjects.API_STATUS, StatusRequest(detail=detail), ClusterStatus, 10))
    if isinstance(st, ErrorReply):
        raise Fail(st.error, USAGE)
    assert isinstance(st, ClusterStatus)
    return st


def node_json(n: NodeStatus) -> dict[str, Any]:
    return {
        "node": n.node, "healthy": n.healthy, "allocations": list(n.allocations),
        "cards": [
            {"uuid": c.uuid, "index": c.index, "type": c.type, "health": c.health,
             "cordoned": c.cordoned, "used_mem": c.used_mem, "total_mem": c.total_mem,
             "used_cores": c.used_cores, "total_cores": c.total_cores,
             "used_slots": c.used_slots, "total_slots": c.total_slots}
            for c in n.cards
        ],
    }


def cmd_status(args: argparse.Namespace) -> int:
    st = fetch_status(args, detail=False)
    lines: list[str] = []
    for n in st.nodes:
        lines.append(f"{n.node}  {'healthy' if n.healthy else 'UNHEALTHY'}  {len(n.allocations)} allocations")
        for c in n.cards:
            flag = " cordoned" if c.cordoned else ("" if c.health else " unhealthy")
            lines.append(f"  [{c.index}] {c.uuid}  {c.type}  mem {c.used_mem}/{c.total_mem} MiB  "
                         f"cores {c.used_cores}/{c.total_cores}  slots {c.used_slots}/{c.total_slots}{flag}")
    if not st.nodes:
        lines.append("no nodes registered")
    if st.pending:
        lines.append(f"{st.pending} pending request(s): see 'hami list'")
    allocations = sorted(a for n in st.nodes for a in n.allocations)
    emit(args, {"nodes": [node_json(n) for n in st.nodes], "allocations": allocations,
                "pending": st.pending}, lines)
    return OK


def full_name(name: str, namespace: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def alloc_json(node: str, a: LedgerAlloc) -> dict[str, Any]:
    usage = card_usage(a.containers)
    return {
        "name": full_name(a.name, a.namespace), "namespace": a.namespace, "uid": a.uid,
        "state": "allocated", "node": node, "source": a.source, "decided_at": a.decided_at,
        "cards": len(usage), "mem_mib": sum(u[0] for u in usage.values()),
        "cores": sum(u[1] for u in usage.values()),
        "devices": [
            {"container": c.name, "init": c.init, "uuid": g.uuid, "index": g.index,
             "type": g.type, "mem_mib": g.mem, "cores": g.cores}
            for c in a.containers for g in c.devices
        ],
    }


def pending_json(p: PendingRequest) -> dict[str, Any]:
    return {
        "name": full_name(p.name, p.namespace), "namespace": p.namespace, "uid": p.uid,
        "state": "pending", "source": p.source, "requested_at": p.requested_at,
        "failed_at": p.failed_at, "reasons": dict(p.reasons), "nodes_total": p.nodes_total,
        "message": p.message,
    }


def listing(st: ClusterStatus) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    allocs = [alloc_json(n.node, a) for n in st.nodes for a in n.held]
    allocs.sort(key=lambda a: (a["node"], a["name"]))
    return allocs, [pending_json(p) for p in st.pending_requests]


def ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago" if t else "-"


def cmd_list(args: argparse.Namespace) -> int:
    allocs, pending = listing(fetch_status(args, detail=True))
    lines: list[str] = []
    if allocs:
        lines.append(f"{'NAME':<24} {'NODE':<16} {'CARDS':>5} {'MEMORY':>11} {'CORES':>6}")
        for a in allocs:
            lines.append(f"{a['name']:<24} {a['node']:<16} {a['cards']:>5} "
                         f"{a['mem_mib']:>7} MiB {a['cores']:>5}%")
    else:
        lines.append("no allocations")
    if pending:
        lines.append("")
        lines.append(f"{'PENDING':<24} {'SINCE':<10} WHY")
        for p in pending:
            lines.append(f"{p['name']:<24} {ago(p['requested_at']):<10} {p['message']}")
    emit(args, {"allocations": allocs, "pending": pending}, lines)
    return OK


def cmd_describe(args: argparse.Namespace) -> int:
    allocs, pending = listing(fetch_status(args, detail=True))
    want = args.name
    found = [e for e in [*allocs, *pending]
             if e["name"] == want or (e["namespace"] and e["name"].split("/", 1)[1] == want)]
    if not found:
        raise Fail(f"{want}: no such allocation or pending request", REFUSED)
    if len(found) > 1:
        raise Fail(f"{want} is in several namespaces ({', '.join(e['name'] for e in found)}): "
                   "give NAMESPACE/NAME", USAGE)
    e = found[0]
    lines = [f"Name:       {e['name']}", f"UID:        {e['uid']}", f"State:      {e['state']}",
             f"Source:     {e['source']}"]
    if e["state"] == "allocated":
        lines += [f"Node:       {e['node']}", f"Decided:    {ago(e['decided_at'])}",
                  f"Holds:      {e['cards']} card(s), {e['mem_mib']} MiB, {e['cores']}% cores",
                  "Devices:"]
        lines += [f"  {d['container'] or '-'}{' (init)' if d['init'] else ''}: [{d['index']}] "
                  f"{d['uuid']}  {d['type']}  {d['mem_mib']} MiB  {d['cores']}% cores"
                  for d in e["devices"]]
    else:
        lines += [f"Requested:  {ago(e['requested_at'])}", f"Last tried: {ago(e['failed_at'])}",
                  f"Why:        {e['message'] or 'not yet tried'}"]
        lines += [f"  {n}/{e['nodes_total']} {reason}" for reason, n in sorted(e["reasons"].items())]
    emit(args, e, lines)
    return OK


def queue_json(q: QueueStatus, cap_mem: int, cap_cores: int) -> dict[str, Any]:
    return {
        "name": q.name, "parent": q.parent, "weight": q.weight,
        "guarantee": {"mem_mib": q.guarantee_mem, "cores": q.guarantee_cores},
        "limit": {"mem_mib": None if q.limit_mem < 0 else q.limit_mem,
                  "cores": None if q.limit_cores < 0 else q.limit_cores},
        "used": {"mem_mib": q.used_mem, "cores": q.used_cores},
        "borrowed": {"mem_mib": q.borrowed_mem, "cores": q.borrowed_cores},
        "pending": q.pending,
        "share_of_cluster": round(max(q.used_mem / cap_mem if cap_mem else 0.0,
                                      q.used_cores / cap_cores if cap_cores else 0.0), 4),
    }


def cmd_queues(args: argparse.Namespace) -> int:
    url = find_nats(args.nats_url)
    got = asyncio.run(request(url, subjects.PLACEMENT_QUEUES, QueuesRequest(), QueuesReply, 10))
    if isinstance(got, ErrorReply):
        raise Fail(got.error, USAGE)
    assert isinstance(got, QueuesReply)
    rows = [queue_json(q, got.capacity_mem, got.capacity_cores) for q in got.queues]
    lines: list[str] = []
    if not rows:
        lines.append("no queues configured: requests are tried in arrival order (docs/queues.md)")
    else:
        lines.append(f"{'QUEUE':<20} {'GUARANTEE':>18} {'USED':>18} {'BORROWED':>18} {'PENDING':>7}")
        depth = {q.name: 0 for q in got.queues}
        for q in got.queues:
            if q.parent:
                depth[q.name] = depth.get(q.parent, 0) + 1

        def amount(mem: int, cores: int) -> str:
            return f"{mem} MiB/{cores}%"

        for q in got.queues:
            name = "  " * depth[q.name] + q.name
            lines.append(f"{name:<20} {amount(q.guarantee_mem, q.guarantee_cores):>18} "
                         f"{amount(q.used_mem, q.used_cores):>18} "
                         f"{amount(q.borrowed_mem, q.borrowed_cores):>18} {q.pending:>7}")
    emit(args, {"queues": rows, "capacity": {"mem_mib": got.capacity_mem, "cores": got.capacity_cores}},
         lines)
    return OK


# ------------------------------------------------------------------ self-contained


def cmd_demo(args: argparse.Namespace) -> int:
    from hami.demo import mixed_lines, run_demo, run_mixed

    if getattr(args, "mixed", False):
        mixed = asyncio.run(run_mixed())
        emit(args, mixed, mixed_lines(mixed))
        return OK if mixed["placed"] == mixed["total"] else REFUSED
    out = asyncio.run(run_demo())
    lines: list[str] = []
    for phase in ("whole_gpu", "sliced"):
        p = out[phase]
        lines.append(f"{phase}: {p['gpus_used']} GPU(s) used")
        for pod, pl in p["pods"].items():
            devs = ", ".join(f"card {d['index']} ({d['mem_mib']} MiB, {d['cores']}%)" for d in pl["devices"])
            lines.append(f"  {pod}: {devs}")
    emit(args, out, lines)
    return OK


def plot_target(rest: list[str]) -> str | None:
    for i, a in enumerate(rest):
        if a == "--plot" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--plot="):
            return a.split("=", 1)[1]
    return None


def check_plot(target: str) -> None:
    """Before a replay that may run for minutes: can its plot be written at all?"""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise Fail("--plot needs matplotlib: install hami-bus[plot]", USAGE) from None
    ext = os.path.splitext(target)[1].lstrip(".").lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    if ext not in kinds:
        raise Fail(f"--plot {target}: the file name must end in one of "
                   f"{', '.join('.' + k for k in sorted(kinds))}", USAGE)
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise Fail(f"--plot {target}: no such directory {parent}", USAGE)
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise Fail(f"--plot {target}: not writable", USAGE)


def cmd_replay(rest: list[str]) -> int:
    from services.placement import replay

    target = plot_target(rest)
    if target is not None and not any(a in ("-h", "--help") for a in rest):
        check_plot(target)
    try:
        return int(replay.main(rest, Parser))
    except OSError as exc:
        raise Fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), USAGE) from None
    except (ValueError, KeyError, IndexError) as exc:
        raise Fail(f"bad trace file: {exc}", USAGE) from None


# ------------------------------------------------------------------------ parsing


class Parser(argparse.ArgumentParser):
    """A usage error is one line (and an exit code), not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise Fail(f"{message} (see '{self.prog} --help')", USAGE)


class Help(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _int_in(lo: int, hi: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{hi if hi is not None else ''}")
        return v

    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="hami", description="HAMi-compatible GPU sharing on NATS",
               epilog="exit codes: 0 ok, 1 refused or not found, 2 usage or configuration, "
                      "3 cannot reach NATS or hami, 4 cannot start, 130 interrupted",
               formatter_class=Help)
    p.add_argument("--version", action="version", version=f"hami {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=Help)

    def client(c: argparse.ArgumentParser) -> None:
        c.add_argument("--nats-url", default=None,
                       help="NATS server (default: $HAMI_NATS_URL, else the state file of 'hami up')")
        c.add_argument("--json", action="store_true", help="one JSON object on stdout")

    up = command("up", "run everything in the foreground")
    up.add_argument("--sim-nodes", type=_int_in(0, 10000), default=None,
                    help="simulated nodes (default: sim.nodes of the configuration, 1)")
    up.add_argument("--sim-gpus", action="append", default=None, metavar="MODEL:COUNT[:MEMORY_MIB][:mig]",
                    help="cards of each simulated node, repeatable (default: sim.gpus, A100-80GB:4:81920)")
    up.add_argument("--sim-node", action="append", default=None, metavar="MODEL:COUNT[,...]",
                    help="one simulated node with these cards, repeatable (a mixed cluster: "
                    "--sim-node Ascend910B3:8 --sim-node A100-40GB:2); not with --sim-nodes/--sim-gpus")
    up.add_argument("--nats-url", default=None,
                    help="use this NATS server (default: start an embedded nats-server)")
    up.add_argument("--metrics-port", type=_int_in(0, 65535), default=None,
                    help="port of /metrics, 0 for any (default: metricsPort, 9394, or a free one if taken)")
    up.add_argument("--config", default=None, help="YAML configuration file (default: $HAMI_CONFIG)")
    up.add_argument("--json", action="store_true", help="print where it listens as one JSON object")
    up.add_argument("--no-auth", action="store_true",
                    help="no identities, no TLS: any client may do anything (docs/security.md)")

    creds.add_arguments(command("creds", "print a role's nkey seed (hami creds reader), or --revoke it"))

    def slice_flags(s: argparse.ArgumentParser) -> None:
        s.add_argument("--gpus", type=_int_in(1, 64), default=1, help="cards")
        m = s.add_mutually_exclusive_group()
        m.add_argument("--mem", type=_int_in(1), default=None, metavar="MIB",
                       help="MiB per card (default: the whole card, or defaultMemory)")
        m.add_argument("--mem-percent", type=_int_in(1, 100), default=None, metavar="P",
                       help="percent of each card's memory (default: not used)")
        s.add_argument("--cores", type=_int_in(0, 100), default=None, metavar="P",
                       help="percent of each card's SMs (default: 0, or 100 with neither --mem option)")
        s.add_argument("--node-policy", default=None, choices=NODE_POLICIES,
                       help="node policy (default: scheduler.nodePolicy)")
        s.add_argument("--gpu-policy", default=None,
                       help="card policy or chain such as binpack,numa (default: scheduler.gpuPolicy)")
        s.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                       help="stay pending up to SECONDS until capacity frees (default: fail at once)")
        s.add_argument("--priority", type=_int_in(-(1 << 31), (1 << 31) - 1), default=0, metavar="N",
                       help="scheduling priority, higher wins; with scheduler.preemption on, a slice "
                       "that fits nowhere may preempt lower ones (default: 0; docs/preemption.md)")
        s.add_argument("--queue", default=None, metavar="NAME",
                       help="the leaf queue to join (default: the namespace's default queue, else "
                       "'default'; docs/queues.md)")

    s = command("submit", "ask for a slice")
    s.add_argument("name", help="the allocation's name")
    slice_flags(s)
    s.add_argument("--gang", default=None, metavar="NAME",
                   help="a member of gang NAME: placed only together with the rest (docs/gangs.md)")
    s.add_argument("--gang-size", type=_int_in(1, 10000), default=None, metavar="N",
                   help="members the gang needs placed together (with --gang)")
    s.add_argument("--gang-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="how long a partial gang may hold its reservations (default: 60)")
    s.add_argument("--movable", action="store_true",
                   help="hami defrag may move it to other cards (docs/defrag.md)")
    s.add_argument("--vendor", default=None, metavar="FAMILY",
                   help="ask another vendor's cards: a device type (MLU, Ascend910B3, DCU, ...) or "
                   "one of its resource names; --gpus/--mem/--mem-percent/--cores become its "
                   "resources, in their units as a pod gives them (default: NVIDIA)")
    client(s)

    ru = command("run", "run a command on a slice, with the limiter preloaded; release it when it ends")
    ru.add_argument("--name", default=None, help="the allocation's name (default: run-<random>)")
    slice_flags(ru)
    ru.add_argument("--limiter", default=None, metavar="PATH",
                    help="libvgpu.so to preload (default: $HAMI_LIMITER, the checkout's build, "
                         "/usr/local/vgpu/libvgpu.so)")
    ru.add_argument("-q", "--quiet", action="store_true", help="print nothing of our own but errors")
    ru.add_argument("--grace", type=float, default=10.0, metavar="S",
                    help="when the slice is preempted, seconds between SIGTERM and SIGKILL of "
                         "the command (default: 10); hami run then exits 5")
    ru.add_argument("--nats-url", default=None,
                    help="NATS server (default: $HAMI_NATS_URL, else the state file of 'hami up')")
    ru.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the command and its arguments")

    r = command("release", "give a slice back")
    r.add_argument("name", help="the allocation's name")
    client(r)

    st = command("status", "nodes and cards")
    client(st)

    ls = command("list", "who holds what, and the pending requests")
    client(ls)

    de = command("describe", "one allocation or pending request in full, with why it waits")
    de.add_argument("name", help="NAME or NAMESPACE/NAME")
    client(de)

    qu = command("queues", "each queue's guarantee, use, borrowed and pending (docs/queues.md)")
    client(qu)

    d = command("demo", "HAMi's website example, self-contained")
    dg = command("defrag", "moves of movable allocations that free whole cards or make a slice fit")
    defrag_cmd.add_arguments(dg)
    client(dg)

    d.add_argument("--json", action="store_true", help="one JSON object on stdout")
    d.add_argument("--mixed", action="store_true",
                   help="a pod per vendor on a cluster of one simulated node per vendor: who got what")

    sub.add_parser("replay", help="replay an openb trace (see hami replay --help)", add_help=False)
    return p


HANDLERS = {"up": cmd_up, "submit": cmd_submit, "run": cmd_run, "release": cmd_release, "status": cmd_status,
            "list": cmd_list, "describe": cmd_describe, "demo": cmd_demo, "creds": creds.cmd_creds,
            "queues": cmd_queues}
HANDLERS["defrag"] = defrag_cmd.cmd_defrag


def run(argv: list[str]) -> int:
    if argv[:1] == ["replay"]:
        return cmd_replay(argv[1:])
    args = parser().parse_args(argv)
    return HANDLERS[args.cmd](args)


def report(argv: list[str], message: str, code: int) -> int:
    argv = argv[: argv.index("--")] if "--" in argv else argv  # not the flags of 'hami run's command
    if "--json" in argv:
        print(json.dumps({"error": message, "code": code}), flush=True)
    else:
        cmd = next((a for a in argv if a in HANDLERS or a == "replay"), None)
        print(f"hami{' ' + cmd if cmd else ''}: {message}", file=sys.stderr, flush=True)
    return code


def guarded(argv: list[str]) -> int:
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except SystemExit:  # --help, --version, replay's own argument errors
        sys.stdout.flush()
        raise
    except Fail as exc:
        return report(argv, exc.message, exc.code)
    except config.ConfigError as exc:
        return report(argv, str(exc), USAGE)
    except KeyboardInterrupt:
        return report(argv, "interrupted", INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return guarded(argv)
    except BrokenPipeError:
        # Nobody reads any more: send what is left nowhere, so exit does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
