"""Burst benchmark of the whole Kubernetes path, in one process on one machine.

Runs an embedded nats-server, the fake API server (tests/fakekube), the admission
webhook (pods are created through it, as the API server would), inventory, placement,
the Kubernetes binder, and per node a node agent in Kubernetes mode with its device
plugin and a fake kubelet (tests/fakekubelet) that picks device replicas at random.
A kubelet simulator watches the API for pods bound to each node, admits them through
the device plugin container by container, then "starts" each container: it reads the
slice file the container would see (by its pod UID and name, exactly as the webhook's
subPathExpr mount resolves it) and compares the cards and limits with the decision the
binder wrote in ``hami.io/vgpu-devices-allocated``.

Two modes (``--mode direct|extender|both``, default both, each on a fresh system):
``direct``, the binder watches the pending pods and schedules them itself; ``extender``,
the binder runs with ``scheduler.mode: extender`` and a kube-scheduler stand-in
(tests/kube/scheduler_loop.py: list+watch, one filter at a time, binds concurrently)
drives ``POST /filter`` and ``POST /bind`` over HTTP instead of the binder's watch.

Prints JSON per mode: time until every pod is bound and allocated, pods per second,
p50/p99 from pod creation to allocated, the number of pods whose slice differs from the
decision (``mismatches``, must be 0), and, read from the ledger and the API server
after the burst, reservations that differ from the pod's binding
(``reservation_mismatches``) or belong to no bound pod (``leaked_reservations``).

    .venv/bin/python bench/kube_burst.py --nodes 1 --pods 40 [--json]
    .venv/bin/python bench/kube_burst.py --nodes 50 --pods 1000 --mode both --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402

from services.binder.webhook import WebhookServer, WebhookSettings  # noqa: E402
from services.nodeagent.slices import CONTAINERS_DIR, ENV_FILE, dir_name, parse_env  # noqa: E402
from shared import config, subjects  # noqa: E402
from shared.bus import Bus, decode_event  # noqa: E402
from shared.hami.annotations import decode_pod_devices, encode_pod_devices  # noqa: E402
from shared.natsserver import EmbeddedNats  # noqa: E402
from shared.schemas import (  # noqa: E402
    AllocReleased,
    AllocRequested,
    ContainerAsk,
    DeviceAsk,
    LedgerAlloc,
    NodeLedger,
)
from tests.fakekube import json_patch  # noqa: E402
from tests.fakekubelet import FakeKubelet  # noqa: E402
from tests.kube.scheduler_loop import LoopStats, SchedulerLoop  # noqa: E402

MODES = ("direct", "extender")

RES = "nvidia.com/gpu"
_decode = msgspec.json.Decoder().decode
ALLOCATED = "hami.io/vgpu-devices-allocated"
# Slice sizes of the burst: (cards, MiB per card, cores per card).
# A mix that fits a burst of 40 on one 8-card node (cores are the scarce dimension).
SHAPES = [(1, 2000, 5), (1, 3000, 10), (1, 4000, 10), (1, 6000, 15), (1, 8000, 20),
          (1, 10000, 10), (2, 5000, 10), (1, 12000, 15)]


def pod_manifest(name: str, shape: tuple[int, int, int], two_containers: bool) -> dict[str, Any]:
    n, mem, cores = shape
    limits = {"nvidia.com/gpu": str(n), "nvidia.com/gpumem": str(mem), "nvidia.com/gpucores": str(cores)}
    containers = [{"name": "main", "image": "busybox:1.36", "resources": {"limits": limits}}]
    if two_containers:
        side = {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "5"}
        containers.append({"name": "side", "image": "busybox:1.36", "resources": {"limits": side}})
    # A pod as a HAMi user writes it: no schedulerName; the webhook sets it.
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": containers}}


class Burst:
    def __init__(self, nodes: int, pods: int, cards: str, seed: int, mode: str = "direct") -> None:
        self.mode = mode
        self.n_nodes = nodes
        self.n_pods = pods
        self.cards = cards
        self.rng = random.Random(seed)
        self.created: dict[str, float] = {}  # pod name -> creation time
        self.allocated: dict[str, float] = {}
        self.mismatches: list[str] = []
        self.failed: dict[str, str] = {}
        self.done = asyncio.Event()
        self.kubelets: dict[str, FakeKubelet] = {}
        self.seen: set[str] = set()
        self.stages: dict[str, dict[str, float]] = {}  # pod name -> stage -> time
        self.raw_events: list[tuple[float, str, bytes]] = []
        self.host_root = Path("/")
        self.counts: tuple[int, int] = (0, 0)  # Allocate answers: exact, union
        self.cpu: dict[str, float] = {}  # CPU seconds per process during the burst
        self.extender_url = ""
        self.loop_stats: LoopStats | None = None
        self.consistency: dict[str, Any] = {}

    async def on_event(self, msg: Any) -> None:
        # Decoded after the run: this process is one of those sharing the CPU.
        self.raw_events.append((time.time(), msg.subject, msg.data))

    def decode_stages(self) -> None:
        for at, subject, data in self.raw_events:
            name = getattr(decode_event(data), "name", "")
            if name:
                self.stages.setdefault(name, {}).setdefault(subject.split(".")[3], at)

    # ---------------------------------------------------------------- kubelet side

    async def admit(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        name, uid, node = meta["name"], meta["uid"], spec["nodeName"]
        try:
            decided = decode_pod_devices(meta.get("annotations", {})[ALLOCATED])
            conts = [*spec.get("initContainers", []), *spec["containers"]]
            # HAMi's encoding ends with ';', which decodes as one more, empty, container.
            while len(decided) > len(conts) and not decided[-1]:
                decided.pop()
            asks = [{RES: len(d)} if d else {} for d in decided]
            await self.kubelets[node].admit_pod(uid, asks)
            for c, grants in zip(conts, decided, strict=True):
                if not grants:
                    continue
                # What the container sees: the webhook mounts the host directory
                # <podUID>_<container> as /usr/local/vgpu/slice; the limiter reads env.
                path = self.host_root / CONTAINERS_DIR / dir_name(uid, c["name"]) / ENV_FILE
                env = parse_env(path.read_text())
                seen = env.get("CUDA_VISIBLE_DEVICES", "").split(",")
                want = [g.uuid for g in grants]
                limits = [env.get(f"CUDA_DEVICE_MEMORY_LIMIT_{i}") for i in range(len(grants))]
                if seen != want or limits != [f"{g.mem}m" for g in grants]:
                    self.mismatches.append(f"{name}/{c['name']}: {seen} {limits} != {want}")
            self.allocated[name] = time.time()
        except Exception as exc:  # one pod's failure is a result, not the end of the run
            self.failed[name] = repr(exc)
        if len(self.allocated) + len(self.failed) >= self.n_pods:
            self.done.set()

    async def watch_pods(self, url: str) -> None:
        """The kubelets' view: every pod bound to a node and annotated, once. (Each
        kubelet watches ``spec.nodeName=<its node>``; one watch of every bound pod is
        the same events for all of them.)"""
        rv = "0"
        async with aiohttp.ClientSession() as http:
            while not self.done.is_set():
                params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true",
                          "fieldSelector": "spec.nodeName!="}
                try:
                    async with http.get(f"{url}/api/v1/pods", params=params,
                                        timeout=aiohttp.ClientTimeout(total=None)) as resp:
                        async for line in resp.content:
                            ev = _decode(line)
                            obj = ev["object"]
                            rv = obj.get("metadata", {}).get("resourceVersion", rv)
                            if ev["type"] not in ("ADDED", "MODIFIED"):
                                continue
                            meta = obj["metadata"]
                            if (obj.get("spec", {}).get("nodeName")
                                    and ALLOCATED in meta.get("annotations", {})
                                    and meta["uid"] not in self.seen):
                                self.seen.add(meta["uid"])
                                asyncio.get_running_loop().create_task(self.admit(obj))
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)

    # ------------------------------------------------------------------------ run

    async def burst(self, cfg: config.Config, fake_url: str, webhook: Webhook) -> float:
        """Create the pods through the webhook; returns when the burst started."""
        watcher = asyncio.create_task(self.watch_pods(fake_url))
        scheduler: asyncio.Task[LoopStats] | None = None
        if self.mode == "extender":
            # kube-scheduler's part; a pod that fits nowhere yet is tried again, as the
            # scheduler retries unschedulable pods when the cluster changes.
            loop = SchedulerLoop(fake_url, self.extender_url, scheduler_name=cfg.scheduler.scheduler_name,
                                 nodes=[f"node-{i:03d}" for i in range(self.n_nodes)],
                                 retry_s=0.5, retry_unschedulable=True)
            scheduler = asyncio.create_task(
                loop.run(lambda _s: self.done.is_set(), timeout=max(60.0, self.n_pods * 0.2) + 5))
        manifests = [pod_manifest(f"burst-{k:05d}", self.rng.choice(SHAPES), self.rng.random() < 0.2)
                     for k in range(self.n_pods)]
        room = asyncio.Semaphore(32)  # a job controller creates pods concurrently
        t0 = time.time()
        async with aiohttp.ClientSession() as http:

            async def create(m: dict[str, Any]) -> None:
                async with room:
                    self.created[m["metadata"]["name"]] = time.time()
                    pod = await webhook.admit(m)
                    async with http.post(f"{fake_url}/api/v1/namespaces/default/pods", json=pod) as r:
                        if r.status != 201:
                            self.failed[m["metadata"]["name"]] = f"create: {r.status} {await r.text()}"

            await asyncio.gather(*(create(m) for m in manifests))
            try:
                await asyncio.wait_for(self.done.wait(), timeout=max(60.0, self.n_pods * 0.2))
            except TimeoutError:
                pass
        watcher.cancel()
        if scheduler is not None:
            self.done.set()
            self.loop_stats = await scheduler
        return t0

    async def check_consistency(self, bus: Bus, fake_url: str, nodes: list[str]) -> None:
        """Ledger against the API server, once the burst is over: each bound pod's
        reservation is on its node with exactly its annotation; no kube reservation
        belongs to a pod that is not bound (a leak)."""
        ledger: dict[str, tuple[str, LedgerAlloc]] = {}
        for node in nodes:
            led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
            for uid, a in (led.allocs if led else {}).items():
                if a.source == "kube":
                    ledger[uid] = (node, a)
        async with aiohttp.ClientSession() as http, http.get(f"{fake_url}/api/v1/pods") as r:
            pods = (await r.json())["items"]
        bound = {p["metadata"]["uid"]: p for p in pods if p["spec"].get("nodeName")}
        mismatched = [p["metadata"]["name"] for uid, p in bound.items()
                      if uid not in ledger or ledger[uid][0] != p["spec"]["nodeName"]
                      or p["metadata"].get("annotations", {}).get(ALLOCATED)
                      != encode_pod_devices(ledger[uid][1].containers)]
        leaked = [a.name for uid, (_, a) in ledger.items() if uid not in bound]
        self.consistency = {"reservation_mismatches": len(mismatched),
                            "leaked_reservations": len(leaked),
                            "examples_inconsistent": {"mismatch": mismatched[:3], "leaked": leaked[:3]}}

    def report(self, t0: float, conflicts: int | None) -> dict[str, Any]:
        self.decode_stages()
        t1 = max(self.allocated.values(), default=time.time())
        lat = sorted(self.allocated[n] - self.created[n] for n in self.allocated)

        def q(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else float("nan")

        stage_ms: dict[str, float] = {}
        order = ["created", "requested", "decided", "bound", "prepared", "allocated"]
        for name in self.allocated:
            st = self.stages.setdefault(name, {})
            st["created"] = self.created[name]
            st["allocated"] = self.allocated[name]
        for a, b in zip(order, order[1:], strict=False):
            gaps = sorted(st[b] - st[a] for st in self.stages.values() if a in st and b in st)
            if gaps:
                stage_ms[f"{a}->{b}_p50"] = round(gaps[len(gaps) // 2] * 1000, 1)
        extra: dict[str, Any] = {}
        ls = self.loop_stats
        if ls is not None:
            fms = sorted(ls.filter_ms)

            def fq(p: float) -> float:
                return round(fms[min(len(fms) - 1, int(p * len(fms)))], 1) if fms else float("nan")

            extra = {"filters": ls.filters, "binds": ls.binds, "filter_p50_ms": fq(0.5),
                     "filter_p99_ms": fq(0.99), "filter_errors": len(ls.filter_errors),
                     "bind_errors": sum(len(v) for v in ls.bind_errors.values()),
                     "unschedulable_at_end": len(ls.unschedulable)}
        return {
            "mode": self.mode,
            "nodes": self.n_nodes, "pods": self.n_pods, "cards_per_node": self.cards,
            "allocated": len(self.allocated), "failed": len(self.failed),
            "seconds_to_all_allocated": round(t1 - t0, 3),
            "pods_per_s": round(len(self.allocated) / (t1 - t0), 1) if t1 > t0 else None,
            "p50_ms": q(0.50), "p99_ms": q(0.99),
            "mismatches": len(self.mismatches),
            "allocate_exact": self.counts[0], "allocate_union": self.counts[1],
            "placement_conflicts": conflicts,
            **self.consistency,
            **extra,
            "stages": stage_ms,
            "cpu_seconds": self.cpu,
            "examples": {"mismatch": self.mismatches[:3], "failed": list(self.failed.items())[:3]},
        }

    async def run(self) -> dict[str, Any]:
        """Every service in its own process, as deployed; fake kubelets and the
        webhook in this one (the kubelets reach the device plugins over their sockets)."""
        tmp = Path(tempfile.mkdtemp(prefix="hami-burst-"))
        self.host_root = tmp / "host"
        env = dict(os.environ, HAMI_LOG_LEVEL=os.environ.get("HAMI_LOG_LEVEL", "WARNING"),
                   HAMI__SCHEDULER__NODEPOLICY="binpack", PYTHONPATH=str(ROOT))
        cfg = config.load(env=env)
        nats = EmbeddedNats(data_dir=tmp / "nats")
        url = await nats.astart()
        procs: list[asyncio.subprocess.Process] = []
        sock_dirs: list[str] = []
        webhook: Webhook | None = None
        bus = await Bus.connect(url, "bench")
        try:
            async def spawn(*args: str, wait_line: bool = False) -> tuple[asyncio.subprocess.Process, str]:
                p = await asyncio.create_subprocess_exec(
                    sys.executable, *args, cwd=ROOT, env=env,
                    stdout=asyncio.subprocess.PIPE if wait_line else asyncio.subprocess.DEVNULL)
                procs.append(p)
                line = ""
                if wait_line:
                    assert p.stdout is not None
                    line = (await asyncio.wait_for(p.stdout.readline(), 120)).decode().strip()
                    if not line:
                        raise RuntimeError(f"{args[0]} exited before it was ready")
                return p, line

            node_names = [f"node-{i:03d}" for i in range(self.n_nodes)]
            named: dict[str, asyncio.subprocess.Process] = {}
            named["fakekube"], fake_url = await spawn(
                str(ROOT / "bench" / "_fakekube_server.py"), *node_names, wait_line=True)
            named["nats-server"] = nats.proc  # type: ignore[assignment]
            await bus.nc.subscribe("hami.evt.alloc.>", cb=self.on_event)
            named["inventory"], _ = await spawn("-m", "services.inventory", "--nats-url", url, "--health-port", "0")
            named["placement"], _ = await spawn("-m", "services.placement", "--nats-url", url, "--health-port", "0")
            pairs = []
            for i, node in enumerate(node_names):
                plugin_dir = tempfile.mkdtemp(prefix="dp-")
                sock_dirs.append(plugin_dir)
                pairs.append(f"{node}={plugin_dir}")
                kubelet = FakeKubelet(plugin_dir, strategy="random", seed=i)
                await kubelet.start()
                self.kubelets[node] = kubelet
            nodes_proc, _ = await spawn(str(ROOT / "bench" / "_burst_nodes.py"), url,
                                        str(self.host_root), self.cards, *pairs, wait_line=True)
            named["nodeagents"] = nodes_proc
            for kubelet in self.kubelets.values():
                await kubelet.wait_registered(RES)
            binder_args = ["-m", "services.binder", "--nats-url", url, "--health-port", "0", "--kube",
                           "--kube-host", fake_url, "--no-api"]
            if self.mode == "extender":
                port = free_port()
                binder_args += ["--extender-host", "127.0.0.1", "--extender-port", str(port)]
                self.extender_url = f"http://127.0.0.1:{port}"
                env["HAMI__SCHEDULER__MODE"] = "extender"  # the binder's own; spawned next
            named["binder"], _ = await spawn(*binder_args)
            env.pop("HAMI__SCHEDULER__MODE", None)
            await wait_placement_ready(bus, node_names)
            if self.mode == "extender":
                await wait_extender_serving(self.extender_url)
            webhook = Webhook(cfg, tmp)
            await webhook.start()
            before = {name: cpu_seconds(p.pid) for name, p in named.items()}
            before["bench"] = cpu_seconds(os.getpid())
            t0 = await self.burst(cfg, fake_url, webhook)
            after = {name: cpu_seconds(p.pid) for name, p in named.items()}
            after["bench"] = cpu_seconds(os.getpid())
            self.cpu = {k: round(after[k] - before[k], 2) for k in after}
            await self.check_consistency(bus, fake_url, node_names)
            nodes_proc.send_signal(signal.SIGTERM)
            assert nodes_proc.stdout is not None
            last = (await asyncio.wait_for(nodes_proc.stdout.read(), 30)).decode().split()
            if len(last) >= 3 and last[-3] == "allocate":
                self.counts = (int(last[-2]), int(last[-1]))
            return self.report(t0, None)
        finally:
            if webhook is not None:
                await webhook.stop()
            for kl in self.kubelets.values():
                await kl.stop()
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), 15)
                except TimeoutError:
                    p.kill()
            await bus.close()
            nats.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            for d in sock_dirs:
                shutil.rmtree(d, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_extender_serving(url: str) -> None:
    """Until the binder's extender answers as the Lease holder (a 400 to an empty body;
    503 while it is not leading yet, no answer while it is starting)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(120):
        while True:
            try:
                async with http.post(f"{url}/filter", data=b"{}") as r:
                    if r.status == 400:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def wait_placement_ready(bus: Bus, nodes: list[str]) -> None:
    """Until the placement process answers: a probe request placed on a registered node."""
    probe = AllocRequested(uid="probe", name="probe", namespace="bench", pending=False,
                           containers=[ContainerAsk(devices=[DeviceAsk(mem=1, cores=0)])])
    got = asyncio.Event()

    async def cb(msg: Any) -> None:
        if decode_event(msg.data).uid == "probe":  # type: ignore[union-attr]
            got.set()

    sub = await bus.nc.subscribe(subjects.alloc_any("decided"), cb=cb)
    try:
        async with asyncio.timeout(120):
            while not got.is_set():
                probe.requested_at = time.time()
                await bus.publish_event(subjects.alloc("requested"), probe,
                                        msg_id=f"probe:{probe.requested_at}")
                try:
                    await asyncio.wait_for(got.wait(), 1.0)
                except TimeoutError:
                    pass
        await bus.publish_event(subjects.alloc("released"), AllocReleased(uid="probe"),
                                msg_id="released:probe")
    finally:
        await sub.unsubscribe()


# --------------------------------------------------------------------- the webhook


class Webhook:
    """The admission webhook over HTTPS, called the way the API server calls it."""

    def __init__(self, cfg: config.Config, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.server: WebhookServer | None = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        crt, key = self.tmp / "tls.crt", self.tmp / "tls.key"
        proc = await asyncio.create_subprocess_exec(
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(crt),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        if await proc.wait() != 0:
            raise RuntimeError("openssl could not make the webhook's certificate")
        self.server = WebhookServer(WebhookSettings.from_config(self.cfg), certfile=str(crt),
                                    keyfile=str(key), host="127.0.0.1", port=0)
        await self.server.start()
        ctx = ssl.create_default_context(cafile=str(crt))
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))

    async def admit(self, pod: dict[str, Any]) -> dict[str, Any]:
        assert self.server is not None and self.http is not None
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": str(uuid.uuid4()), "kind": {"kind": "Pod"},
                              "operation": "CREATE", "namespace": "default", "object": pod}}
        async with self.http.post(f"https://127.0.0.1:{self.server.port}/mutate", json=review) as r:
            resp = (await r.json())["response"]
        if not resp["allowed"]:
            raise RuntimeError(f"webhook refused {pod['metadata']['name']}: {resp['status']['message']}")
        if resp.get("patch"):
            pod = json_patch(pod, json.loads(base64.b64decode(resp["patch"])))
        return pod

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.server is not None:
            await self.server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description="Burst of HAMi pods through the whole Kubernetes path")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--pods", type=int, default=40)
    ap.add_argument("--cards", default="A100-80GB:8:81920", help="MODEL:COUNT[:MEMORY_MIB] per node")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=(*MODES, "both"), default="both",
                    help="who schedules the pods: the binder (direct), or kube-scheduler "
                         "through the extender; both: one after the other")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("HAMI_LOG_LEVEL", "WARNING"))
    modes = MODES if args.mode == "both" else (args.mode,)
    out = {m: asyncio.run(Burst(args.nodes, args.pods, args.cards, args.seed, m).run()) for m in modes}
    if args.json:
        print(json.dumps(out))
    else:
        for m, res in out.items():
            print(f"[{m}]")
            for k, v in res.items():
                print(f"  {k}: {v}")
    ok = all(r["mismatches"] == 0 and r["failed"] == 0 and r["allocated"] == r["pods"]
             and r["reservation_mismatches"] == 0 and r["leaked_reservations"] == 0
             for r in out.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
