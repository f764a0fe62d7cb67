"""The ``hami`` command: run the system, ask for slices, look at the cluster, replay traces.

``hami up`` records where it listens in a state file (``$HAMI_STATE_FILE``, default
``~/.hami/state.json``) so the other commands find the running system without flags;
``--nats-url`` or ``$HAMI_NATS_URL`` point them elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from shared import config, logs, subjects, tracing
from shared.bus import Bus
from shared.schemas import (
    ClusterStatus,
    Constraints,
    ContainerAsk,
    DeviceAsk,
    ErrorReply,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)


def state_file() -> Path:
    return Path(os.environ.get("HAMI_STATE_FILE") or Path.home() / ".hami" / "state.json")


def find_nats(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("HAMI_NATS_URL"):
        return os.environ["HAMI_NATS_URL"]
    try:
        return str(json.loads(state_file().read_text())["nats_url"])
    except (OSError, ValueError, KeyError):
        raise SystemExit(
            "hami: no running system found: start one with 'hami up', or give --nats-url"
        ) from None


# ----------------------------------------------------------------------------- up


def cmd_up(args: argparse.Namespace) -> int:
    from hami.system import System

    cfg = config.load(args.config)
    logs.setup("up", cfg.log_level)
    tracing.setup("up")

    async def main() -> int:
        system = System(cfg, nats_url=args.nats_url, sim_nodes=args.sim_nodes,
                        sim_gpus=args.sim_gpus, metrics_port=args.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await system.start()
        sf = state_file()
        try:
            sf.parent.mkdir(parents=True, exist_ok=True)
            sf.write_text(json.dumps({"nats_url": system.nats_url, "metrics_url": system.metrics_url,
                                      "pid": os.getpid()}))
            print(f"NATS:    {system.nats_url}", flush=True)
            print(f"Metrics: {system.metrics_url}/metrics", flush=True)
            print(f"Nodes:   {', '.join(a.node for a in system.agents)}", flush=True)
            print("hami is up; Ctrl-C stops it", flush=True)
            await stop.wait()
        finally:
            try:
                if json.loads(sf.read_text()).get("pid") == os.getpid():
                    sf.unlink()
            except (OSError, ValueError):
                pass
            await system.stop()
        print("hami stopped", flush=True)
        return 0

    return asyncio.run(main())


# ------------------------------------------------------------------------- submit


def build_submit(args: argparse.Namespace) -> SubmitRequest:
    if args.mem is not None and args.mem_percent is not None:
        raise SystemExit("hami submit: give --mem or --mem-percent, not both")
    ask = DeviceAsk(
        nums=args.gpus,
        mem=args.mem or 0,
        mem_percent=args.mem_percent,
        cores=args.cores if args.cores is not None else 0,
    )
    if args.mem is None and args.mem_percent is None and args.cores is None:
        ask.cores = 100  # a bare --gpus N asks for N whole, exclusive cards (REFERENCE §1)
    return SubmitRequest(
        name=args.name,
        containers=[ContainerAsk(name=args.name, devices=[ask])],
        constraints=Constraints(node_policy=args.node_policy, gpu_policy=args.gpu_policy),
        wait=args.wait is not None,
        timeout=args.wait if args.wait is not None else 30.0,
    )


async def request(
    url: str, subject: str, msg: msgspec.Struct | None, reply: type[Any], timeout: float
) -> Any:
    bus = await Bus.connect(url, "cli", setup=False)
    body = msgspec.json.encode(msg) if msg is not None else b"{}"
    try:
        data = (await bus.nc.request(subject, body, timeout=timeout)).data
    finally:
        await bus.close()
    err = msgspec.json.decode(data)
    if isinstance(err, dict) and set(err) <= {"error", "detail"} and "error" in err:
        return msgspec.convert(err, ErrorReply)
    return msgspec.json.decode(data, type=reply)


def placement_json(r: SubmitReply) -> dict[str, Any]:
    if r.ok and r.decision is not None:
        d = r.decision
        return {
            "ok": True, "name": r.name, "uid": r.uid, "node": d.node,
            "devices": [
                {"container": c.name, "uuid": g.uuid, "index": g.index, "type": g.type,
                 "mem_mib": g.mem, "cores": g.cores}
                for c in d.containers for g in c.devices
            ],
        }
    out: dict[str, Any] = {"ok": False, "name": r.name, "uid": r.uid}
    if r.failure is not None:
        out.update(reasons=r.failure.reasons, message=r.failure.message,
                   nodes_total=r.failure.nodes_total)
    if r.error:
        out["error"] = r.error
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    req = build_submit(args)
    url = find_nats(args.nats_url)
    r = asyncio.run(request(url, subjects.API_SUBMIT, req, SubmitReply, req.timeout + 10))
    if isinstance(r, ErrorReply):
        print(f"hami submit: {r.error}", file=sys.stderr)
        return 2
    out = placement_json(r)
    if args.json:
        print(json.dumps(out))
        return 0 if r.ok else 1
    if r.ok:
        print(f"{r.name}: placed on {out['node']}")
        for dev in out["devices"]:
            print(f"  {dev['uuid']}  {dev['type']}  {dev['mem_mib']} MiB  {dev['cores']}% cores")
        return 0
    if r.failure is not None:
        print(f"{r.name}: no placement: {r.failure.message}")
        for reason, n in sorted(r.failure.reasons.items()):
            print(f"  {n}/{r.failure.nodes_total} {reason}")
    else:
        print(f"{r.name}: {r.error}")
    return 1


def cmd_release(args: argparse.Namespace) -> int:
    url = find_nats(args.nats_url)
    r = asyncio.run(request(url, subjects.API_RELEASE, ReleaseRequest(name=args.name), ReleaseReply, 20))
    if isinstance(r, ErrorReply) or not r.ok:
        print(f"hami release: {r.error}", file=sys.stderr)
        return 1
    print(f"{args.name}: released from {r.node}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url = find_nats(args.nats_url)
    st = asyncio.run(request(url, subjects.API_STATUS, None, ClusterStatus, 10))
    if isinstance(st, ErrorReply):
        print(f"hami status: {st.error}", file=sys.stderr)
        return 2
    if args.json:
        print(msgspec.json.encode(st).decode())
        return 0
    for n in st.nodes:
        print(f"{n.node}  {'healthy' if n.healthy else 'UNHEALTHY'}  {len(n.allocations)} allocations")
        for c in n.cards:
            flag = " cordoned" if c.cordoned else ("" if c.health else " unhealthy")
            print(f"  [{c.index}] {c.uuid}  {c.type}  mem {c.used_mem}/{c.total_mem} MiB  "
                  f"cores {c.used_cores}/{c.total_cores}  slots {c.used_slots}/{c.total_slots}{flag}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hami.demo import run_demo

    out = asyncio.run(run_demo())
    if args.json:
        print(json.dumps(out))
    else:
        for phase in ("whole_gpu", "sliced"):
            p = out[phase]
            print(f"{phase}: {p['gpus_used']} GPU(s) used")
            for pod, pl in p["pods"].items():
                devs = ", ".join(f"card {d['index']} ({d['mem_mib']} MiB, {d['cores']}%)" for d in pl["devices"])
                print(f"  {pod}: {devs}")
    return 0


def cmd_replay(args: argparse.Namespace, rest: list[str]) -> int:
    from services.placement import replay

    return int(replay.main(rest))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hami", description="HAMi-compatible GPU sharing on NATS")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run everything in the foreground")
    up.add_argument("--sim-nodes", type=int, default=None)
    up.add_argument("--sim-gpus", action="append", default=None, metavar="MODEL:COUNT[:MEMORY_MIB]")
    up.add_argument("--nats-url", default=None)
    up.add_argument("--metrics-port", type=int, default=None)
    up.add_argument("--config", default=None)

    s = sub.add_parser("submit", help="ask for a slice")
    s.add_argument("name")
    s.add_argument("--gpus", type=int, default=1)
    m = s.add_mutually_exclusive_group()
    m.add_argument("--mem", type=int, default=None, metavar="MIB")
    m.add_argument("--mem-percent", type=int, default=None, metavar="P")
    s.add_argument("--cores", type=int, default=None, metavar="P")
    s.add_argument("--node-policy", default=None)
    s.add_argument("--gpu-policy", default=None)
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="stay pending up to SECONDS until capacity frees")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)

    r = sub.add_parser("release", help="give a slice back")
    r.add_argument("name")
    r.add_argument("--nats-url", default=None)

    st = sub.add_parser("status", help="nodes and cards")
    st.add_argument("--json", action="store_true")
    st.add_argument("--nats-url", default=None)

    d = sub.add_parser("demo", help="HAMi's website example, self-contained")
    d.add_argument("--json", action="store_true")

    sub.add_parser("replay", help="replay an openb trace (see hami replay --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:
        return cmd_replay(argparse.Namespace(), argv[1:])
    args = parser().parse_args(argv)
    handlers = {"up": cmd_up, "submit": cmd_submit, "release": cmd_release,
                "status": cmd_status, "demo": cmd_demo}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
