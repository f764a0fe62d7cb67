"""Placement benchmark at cluster scale: in-process, and requested -> decided over NATS.

Prints one JSON object:
- ``inprocess``: ``bench/placement_inproc.py`` (decide + reserve, no I/O);
- ``nats``: a placement service in its own process against an embedded nats-server,
  5,000 nodes x 8 cards registered in the inventory KV bucket, requests published to
  the durable stream at a fixed rate (open loop), each reserved by compare-and-set on
  the node's ledger entry; latency is from just before the publish to the arrival of
  the ``decided`` / ``failed`` event at a subscriber; throughput is requests over the
  time from the first publish to the last answer;
- ``nats_rtt``: a core NATS request/reply round trip measured in the same run, so the
  overhead above reads as a ratio. The responder is a process of its own
  (``bench/_echo.py``), as placement is: once after the load, in a tight loop
  (``nats_rtt_ms``), and sampled every 50 ms while the load runs
  (``nats_rtt_under_load_ms``), which is what the decisions' messages see. The same
  tight loop against a responder inside the bench process (one event loop answering
  itself, no second process to wake) is ``nats_rtt_same_process_ms``;
- ``p50_to_decision_ms`` / ``p50_decision_to_answer_ms``: the p50 split at the
  decision's time stamp; ``cpu_ms_per_request``: CPU per request of each process;
- ``placement_rss_mb``: the placement process's resident memory at the end;
- ``placement_threads_cpu_ms_per_request``: placement's CPU split between its main
  thread and the others (an exporter's), per request.

``--profile DIR`` runs the placement process under cProfile and leaves its stats in DIR
(``python -m pstats``), to see where a setting's cost goes.

``--trace-sampling off,0.01,1`` runs the ``nats`` part once per setting (``--repeat``
times each, interleaved, so drift of a shared machine spreads over all of them): ``off``
without an exporter, a number with OTLP export over gRPC to a sink in this process that
accepts every export without decoding it, sampled at that ratio
(``parentbased_traceidratio``). ``tracing`` then holds each run and ``tracing_ratios``
each setting's medians over those of ``off`` (throughput, p50, p99, placement's CPU per
request), with the exports the sink received.

    .venv/bin/python bench/placement.py [--nodes 5000] [--cards 8] [--requests 20000] [--rate 1000]
    .venv/bin/python bench/placement.py --skip-inprocess --rate 0 --trace-sampling off,0.01,1
    .venv/bin/python bench/placement.py --mixed 0.1   # a tenth of nodes and requests other vendors'

The default rate is the issue's target (1,000 decisions/s sustained), so the latency
figures are those of that load; ``--rate 0`` publishes everything at once (a burst).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import nats
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import placement_inproc  # noqa: E402

from shared import subjects  # noqa: E402
from shared.bus import Bus, decode_event  # noqa: E402
from shared.natsserver import EmbeddedNats  # noqa: E402
from shared.schemas import AllocDecided, AllocFailed, NodeInventory  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def inventories(nodes: int, cards: int, mixed: float = 0.0) -> list[NodeInventory]:
    out = []
    for n in range(nodes):
        devs = placement_inproc.node_devices(n, cards, mixed)  # --mixed: other vendors' nodes too
        out.append(NodeInventory(node=f"node-{n:05d}", devices=devs, cpu_milli=128000,
                                 memory_mib=1 << 20, max_pods=110,
                                 labels={"zone": f"z{n % 4}", "pool": "gpu"}))
    return out


async def round_trips(
    bus: Bus, out: list[float], *, count: int | None = None, every: float = 0.0,
    subject: str = "bench.echo", local: bool = True,
) -> None:
    """Core request/reply round trips (seconds) into ``out``: ``count`` of them, one
    every ``every`` seconds (0: back to back), or until cancelled when ``count`` is None.

    ``local``: the responder is a subscription of this process (else the echo process
    answers ``subject``)."""
    async def echo(msg: object) -> None:
        await msg.respond(b"ok")  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(subject, cb=echo) if local else None
    other = await Bus.connect(bus.nc.connected_url.geturl() if bus.nc.connected_url else "", "rtt", setup=False)
    try:
        await bus.nc.flush()
        while count is None or len(out) < count:
            t = time.perf_counter()
            await other.nc.request(subject, b"x", timeout=5)
            out.append(time.perf_counter() - t)
            if every:
                await asyncio.sleep(every)
    finally:
        if sub is not None:
            await sub.unsubscribe()
        await other.close()


async def rtt(bus: Bus, n: int = 2000, *, local: bool, subject: str = "bench.echo") -> float:
    """The idle round trip: ``n`` back to back, p50 of all but the first tenth."""
    samples: list[float] = []
    await round_trips(bus, samples, count=n, local=local, subject=subject)
    return pct(samples[n // 10:], 50)


async def _until_answered(bus: Bus, subject: str) -> None:
    while True:
        try:
            await bus.nc.request(subject, b"x", timeout=0.5)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.1)


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds in a ``/proc`` stat file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process's main thread and of its other threads together
    (Python names no native thread): what background threads (an exporter's) cost."""
    out = {"main": 0.0, "other_threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            used = _stat_cpu_s(task / "stat")
        except OSError:  # the thread ended
            continue
        out["main" if task.name == str(pid) else "other_threads"] += used
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class OtlpSink:
    """An OTLP/gRPC trace endpoint that accepts every export and only counts it: what
    a collector costs is not placement's, and decoding 100 % of the spans here would
    take CPU from the service being measured (two cores are shared)."""

    METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)},
        ),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _export(self, request: bytes, context: object) -> bytes:
        with self._lock:
            self.exports += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse: all accepted

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.exports, self.bytes

    def stop(self) -> None:
        self.server.stop(grace=None)


def trace_env(setting: str, sink: OtlpSink | None) -> dict[str, str]:
    """The placement process's tracing environment for one ``--trace-sampling`` value."""
    if setting == "off":
        return {"OTEL_TRACES_EXPORTER": "none"}
    ratio = float(setting)
    if not 0.0 <= ratio <= 1.0 or sink is None:
        raise SystemExit(f"--trace-sampling: {setting!r} is neither off nor a ratio in [0, 1]")
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(ratio),
    }


async def over_nats(
    nodes: int, cards: int, requests: int, rate: float, seed: int,
    trace: dict[str, str] | None = None, mixed: float = 0.0, profile: str | None = None,
) -> dict[str, object]:
    server = EmbeddedNats()
    url = await server.astart()
    bus = await Bus.connect(url, "bench")
    proc: subprocess.Popen[bytes] | None = None
    echo: subprocess.Popen[bytes] | None = None
    try:
        for i, inv in enumerate(inventories(nodes, cards, mixed)):
            await bus.kv_put(subjects.NODES_BUCKET, inv.node, inv)
            if i % 500 == 0:
                await asyncio.sleep(0)
        echo = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
            [sys.executable, str(ROOT / "bench" / "_echo.py"), url, "bench.echo.remote.>"], cwd=ROOT)
        # placement's configured node policy (frag); HAMI__SCHEDULER__NODEPOLICY=binpack in
        # the environment measures HAMi's
        env = dict(os.environ, HAMI_LOG_LEVEL="WARNING")
        env.pop("HAMI_TRACE_EXPORT", None)
        env.update(trace or {"OTEL_TRACES_EXPORTER": "none"})
        # --profile: the placement process under cProfile, its stats written when it stops
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
            [sys.executable, *prof, "-m", "services.placement", "--nats-url", url, "--health-port", "0"], cwd=ROOT, env=env)
        # The echo process answers before any round trip is timed.
        await asyncio.wait_for(_until_answered(bus, "bench.echo.remote.ready"), 30)
        # Wait until the service answers: one probe request.
        rng = np.random.default_rng(seed)
        answers: dict[str, float] = {}
        outcome: dict[str, str] = {}
        decided_at: dict[str, float] = {}
        sent: dict[str, float] = {}
        done = asyncio.Event()

        async def on_answer(msg: object) -> None:
            t = time.time()
            ev = decode_event(msg.data)  # type: ignore[attr-defined]
            if isinstance(ev, AllocDecided | AllocFailed) and ev.uid not in answers:
                answers[ev.uid] = t
                outcome[ev.uid] = "decided" if isinstance(ev, AllocDecided) else "failed"
                if isinstance(ev, AllocDecided):
                    decided_at[ev.uid] = ev.decided_at
                if len(answers) >= requests + 1:
                    done.set()

        await bus.subscribe(subjects.alloc_any("decided"), on_answer)
        await bus.subscribe(subjects.alloc("failed"), on_answer)
        probe = placement_inproc.make_request(rng, -1)
        probe.uid = "probe"
        probe.pending = False
        deadline = time.time() + 120
        while "probe" not in answers and time.time() < deadline:
            probe.requested_at = time.time()
            await bus.publish_event(subjects.alloc("requested"), probe, msg_id=f"probe:{probe.requested_at}")
            await asyncio.sleep(1.0)
        if "probe" not in answers:
            raise RuntimeError("placement service did not answer")
        reqs = []
        for i in range(requests):
            r = placement_inproc.make_request(rng, i, mixed)
            r.uid = f"b{i}"
            r.name = r.uid
            r.pending = False
            reqs.append(r)
        interval = 1.0 / rate if rate > 0 else 0.0
        # The round trip while the load runs, sampled every 50 ms (the one after the run
        # is measured on an idle machine, in a tight loop).
        loaded_rtt: list[float] = []
        sampling = asyncio.create_task(
            round_trips(bus, loaded_rtt, every=0.05, subject="bench.echo.remote.load", local=False))
        pids = {"placement": proc.pid, "nats_server": server.proc.pid, "bench": os.getpid()}  # type: ignore[union-attr]
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        threads0 = thread_cpu_s(proc.pid)
        start = time.time()
        acks = []
        for i, r in enumerate(reqs):
            if interval:
                target = start + i * interval
                delay = target - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            r.requested_at = time.time()
            sent[r.uid] = r.requested_at
            acks.append(await bus.publish_event_nowait(subjects.alloc("requested"), r, msg_id=r.uid))
            if len(acks) >= 2000:
                await asyncio.gather(*acks)
                acks.clear()
        await asyncio.gather(*acks)
        await asyncio.wait_for(done.wait(), timeout=max(60.0, requests / 200))
        cpu = {k: (cpu_s(p) - cpu0[k]) * 1e3 / requests for k, p in pids.items()}
        threads = {k: (v - threads0.get(k, 0.0)) * 1e3 / requests for k, v in thread_cpu_s(proc.pid).items()}
        sampling.cancel()
        (sampled,) = await asyncio.gather(sampling, return_exceptions=True)
        if not loaded_rtt:
            raise RuntimeError(f"no round trip sampled under load: {sampled!r}")
        end = max(answers[u] for u in sent)
        lat = [answers[u] - sent[u] for u in sent]
        rss = rss_mb(proc.pid)
        round_trip = await rtt(bus, local=False, subject="bench.echo.remote.idle")
        same_process = await rtt(bus, local=True)
        p50 = pct(lat, 50)
        # Where the time goes: up to the decision (delivery, queueing, deciding), and
        # from it to the answer's arrival (the compare-and-set, the event's publish).
        before = [decided_at[u] - sent[u] for u in sent if u in decided_at]
        after = [answers[u] - decided_at[u] for u in sent if u in decided_at]
        return {
            "nodes": nodes, "cards": nodes * cards, "requests": requests,
            "target_rate_per_s": rate, "mixed": mixed,
            "decisions_per_s": round(requests / (end - start), 1),
            "decided": sum(1 for u in sent if outcome[u] == "decided"),
            "failed": sum(1 for u in sent if outcome[u] == "failed"),
            "p50_ms": round(p50 * 1e3, 3),
            "p99_ms": round(pct(lat, 99) * 1e3, 3),
            # drift over the run (a view, a stream or a ledger growing) shows here
            "p50_ms_by_tenth": [round(pct(list(x), 50) * 1e3, 3) for x in np.array_split(np.array(lat), 10)],
            "p50_to_decision_ms": round(pct(before, 50) * 1e3, 3),
            "p50_decision_to_answer_ms": round(pct(after, 50) * 1e3, 3),
            "nats_rtt_ms": round(round_trip * 1e3, 3),
            "p50_over_rtt": round(p50 / round_trip, 2),
            "nats_rtt_same_process_ms": round(same_process * 1e3, 3),
            "p50_over_rtt_same_process": round(p50 / same_process, 2),
            "nats_rtt_under_load_ms": round(pct(loaded_rtt, 50) * 1e3, 3),
            "p50_over_rtt_under_load": round(p50 / pct(loaded_rtt, 50), 2) if loaded_rtt else None,
            "placement_rss_mb": round(rss, 1),
            # CPU milliseconds per request, by process, over the timed run: two cores
            # shared by the three is what makes the round trip under load slower.
            "cpu_ms_per_request": {k: round(v, 3) for k, v in cpu.items()},
            "placement_threads_cpu_ms_per_request": {k: round(v, 3) for k, v in threads.items()},
        }
    finally:
        for p in (proc, echo):
            if p is not None:
                p.terminate()
                p.wait(timeout=10)
        await bus.close()
        server.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (0: all at once)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--trace-sampling", default=None, metavar="off,0.01,1",
                    help="run the NATS part once per setting: off, or a sampling ratio "
                         "with OTLP export to an in-process sink; prints the ratios to off")
    ap.add_argument("--mixed", type=float, default=0.0, metavar="FRACTION",
                    help="this share of the nodes, and of the requests, of other vendors (0.1: a tenth)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="run the placement process under cProfile; its stats go to DIR "
                         "(placement.prof, or placement-<setting>-<run>.prof with --trace-sampling)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --trace-sampling: runs per setting, interleaved")
    args = ap.parse_args()
    out: dict[str, object] = {}
    if not args.skip_inprocess:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "placement_inproc.py"),
                            "--nodes", str(args.nodes), "--cards", str(args.cards), "--mixed", str(args.mixed)],
                           capture_output=True, text=True, cwd=ROOT)
        out["inprocess"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-2000:]}
    if args.trace_sampling is None:
        prof = f"{args.profile}/placement.prof" if args.profile else None
        out["nats"] = asyncio.run(over_nats(args.nodes, args.cards, args.requests, args.rate, args.seed,
                                            mixed=args.mixed, profile=prof))
    else:
        out.update(traced(args))
    print(json.dumps(out, indent=2))
    return 0


def traced(args: argparse.Namespace) -> dict[str, object]:
    """The NATS part under each tracing setting, and each setting's ratios to off."""
    settings = [s.strip().lower() for s in args.trace_sampling.split(",") if s.strip()]
    if "off" not in settings:
        settings.insert(0, "off")
    sink = OtlpSink()
    runs: dict[str, list[dict[str, object]]] = {s: [] for s in settings}
    try:
        for _ in range(max(1, args.repeat)):
            for s in settings:
                before = sink.counts()
                prof = f"{args.profile}/placement-{s}-{len(runs[s])}.prof" if args.profile else None
                r = asyncio.run(over_nats(args.nodes, args.cards, args.requests, args.rate,
                                          args.seed, trace_env(s, sink), args.mixed, prof))
                after = sink.counts()
                r["otlp_exports"], r["otlp_bytes"] = after[0] - before[0], after[1] - before[1]
                runs[s].append(r)
    finally:
        sink.stop()

    def med(s: str, key: str) -> float:
        vals = []
        for r in runs[s]:
            v = r[key]
            vals.append(float(v["placement"] if isinstance(v, dict) else v))  # type: ignore[arg-type]
        return float(np.median(vals))

    keys = {"decisions_per_s": "decisions_per_s", "p50_ms": "p50_ms", "p99_ms": "p99_ms",
            "placement_cpu_ms_per_request": "cpu_ms_per_request"}
    ratios = {
        s: {name: round(med(s, key) / med("off", key), 3) for name, key in keys.items()}
        | {"otlp_exports": sum(int(r["otlp_exports"]) for r in runs[s]),  # type: ignore[call-overload]
           "otlp_bytes": sum(int(r["otlp_bytes"]) for r in runs[s])}  # type: ignore[call-overload]
        for s in settings
    }
    return {"tracing": runs, "tracing_ratios": ratios}


if __name__ == "__main__":
    sys.exit(main())
