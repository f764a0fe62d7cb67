"""examples/subscriber.py against a real nats-server: restarted mid-stream (killed -9
and stopped), it misses no event and applies none twice; with auth on it follows the
real services as the read-only reader, and its table is the ledger's truth.

Every run is the example itself as a subprocess (what an outside user runs), and the
events are real: published through the bus API, or by the services.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from nats.js import api
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from hami.creds import Store, roles_for
from hami.system import System
from shared import asyncapi, auth, subjects
from shared.bus import Bus
from shared.config import Config
from shared.natsserver import EmbeddedNats
from shared.schemas import (
    AllocBound,
    AllocDecided,
    AllocReleased,
    AllocRequested,
    CardGrant,
    ContainerAsk,
    ContainerGrant,
    DeviceAsk,
    NodeEvent,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIBER = ROOT / "examples" / "subscriber.py"
NODES = ["sim-node-0", "sim-node-1"]


class Run:
    """One run of the subscriber process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.banner = ""  # what it said on stderr until ready

    @classmethod
    async def start(cls, url: str, work: Path, *extra: str) -> Run:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SUBSCRIBER),
            "--nats-url",
            url,
            "--state",
            str(work / "state.json"),
            "--journal",
            str(work / "journal"),
            "--table",
            str(work / "table.txt"),
            "--quiet",
            *extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        run = cls(proc)
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            lines: list[str] = []
            while not lines or not lines[-1].startswith("# ready"):
                line = (await proc.stderr.readline()).decode()
                assert line, f"the subscriber exited: {''.join(lines)}"
                lines.append(line)
        run.banner = "".join(lines)
        return run

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return await self.wait()

    async def wait(self) -> int:
        """Its exit status; what it said on stderr is added to the banner."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            self.banner += (await self.proc.stderr.read()).decode()
            return await self.proc.wait()


def journal(work: Path) -> list[tuple[int, str]]:
    path = work / "journal"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        seq, what = line.split(" ", 1)
        out.append((int(seq.removeprefix("seq=")), what))
    return out


def state(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((work / "state.json").read_text())
    return out


async def until(cond: Any, what: str, timeout: float = 30.0) -> None:
    """Wait for ``cond()`` (a file the subprocess writes: there is no event to await)."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():  # noqa: ASYNC110 - polling another process's files
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# ------------------------------------------------------------------ a plain bus


@pytest.fixture
async def admin(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "story")
    try:
        yield b
    finally:
        await b.close()


async def tell_a_story(
    bus: Bus,
    jobs: int,
    out: list[int],
    expected: dict[str, Any],
    gates: dict[int, asyncio.Event] | None = None,
) -> None:
    """Real allocation events through the bus API, with node events between them (which
    the subscriber's filter leaves out); ``out`` gets the stream sequence of each
    allocation event, ``expected`` who holds what at the end. Before job ``i`` it waits
    for ``gates[i]``, where given."""
    for i in range(jobs):
        if gates and i in gates:
            await gates[i].wait()
        uid, name, node = f"uid-{i:04d}", f"job-{i}", f"node-{i % 3}"
        grant = CardGrant(uuid=f"GPU-{i % 3}-{i % 4}", mem=1000 + i, cores=10 + i % 50)
        for subject, ev in (
            (
                subjects.alloc("requested"),
                AllocRequested(
                    uid=uid,
                    name=name,
                    namespace="team-a",
                    containers=[ContainerAsk(devices=[DeviceAsk()])],
                ),
            ),
            (
                subjects.alloc("decided", node),
                AllocDecided(
                    uid=uid,
                    name=name,
                    namespace="team-a",
                    node=node,
                    containers=[ContainerGrant(devices=[grant])],
                ),
            ),
            (
                subjects.alloc("bound", node),
                AllocBound(uid=uid, name=name, namespace="team-a", node=node),
            ),
        ):
            out.append((await bus.publish_event(subject, ev, msg_id=f"{subject}:{uid}")).seq)
        if i % 3 == 0:
            gone = AllocReleased(
                uid=uid, name=name, namespace="team-a", node=node, reason="released"
            )
            out.append(
                (
                    await bus.publish_event(
                        subjects.alloc("released", node), gone, msg_id=f"released:{uid}"
                    )
                ).seq
            )
        else:
            expected[uid] = {
                "node": node,
                "state": "bound",
                "cards": [{"uuid": grant.uuid, "mem": grant.mem, "cores": grant.cores}],
            }
        if i % 5 == 0:
            await bus.publish_event(
                subjects.node_event("updated", node),
                NodeEvent(node=node, verb="updated"),
                msg_id=f"node:{i}",
            )
        await asyncio.sleep(0.005)


async def test_restarted_mid_stream_it_misses_nothing_and_repeats_nothing(
    admin: Bus, nats_url: str, tmp_path: Path
) -> None:
    seqs: list[int] = []
    expected: dict[str, Any] = {}
    # The story pauses twice, so that each restart falls in its middle: events stored
    # before it, while the subscriber is down, and after it.
    killed, stopped = asyncio.Event(), asyncio.Event()
    story = asyncio.create_task(
        tell_a_story(admin, 150, seqs, expected, gates={40: killed, 100: stopped})
    )
    try:
        first = await Run.start(nats_url, tmp_path, "--batch", "8", "--ack-wait", "2")
        assert "created consumer alloc-table" in first.banner
        await until(lambda: len(journal(tmp_path)) >= 60, what="the first run's events")
        # A crash: whatever it had applied but not yet acknowledged comes again.
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        applied = state(tmp_path)["last_seq"]
        info = await admin.js.consumer_info(subjects.EVENTS_STREAM, "alloc-table")
        # Acknowledged only what its saved state covers: acks follow the save.
        assert info.ack_floor.stream_seq <= applied
        assert not story.done()
        killed.set()  # the story goes on while the subscriber is down

        second = await Run.start(nats_url, tmp_path, "--batch", "8", "--ack-wait", "2")
        assert "resuming consumer alloc-table" in second.banner
        await until(lambda: len(journal(tmp_path)) >= 250, what="the second run's events")
        assert await second.stop() == 0, second.banner  # a clean stop in the middle of the stream
        assert not story.done()
        stopped.set()
        await story

        third = await Run.start(nats_url, tmp_path, "--batch", "8", "--ack-wait", "2")
        await until(lambda: state(tmp_path)["last_seq"] == seqs[-1], what="catching up")
        assert await third.stop() == 0, third.banner
    finally:
        if not story.done():
            story.cancel()

    got = [seq for seq, _ in journal(tmp_path)]
    assert len(got) == len(set(got)), "an event was applied twice"
    assert got == sorted(seqs), "events were missed or came out of order"
    assert applied in got  # the last save before the crash, applied once
    held = state(tmp_path)["holdings"]
    assert {
        uid: {k: h[k] for k in ("node", "state", "cards")} for uid, h in held.items()
    } == expected
    table = (tmp_path / "table.txt").read_text()
    assert f"# through stream sequence {seqs[-1]}" in table
    assert len(table.splitlines()) == len(expected) + 2  # header, rows, the sequence line


async def test_a_new_consumer_replays_what_the_stream_keeps(
    admin: Bus, nats_url: str, tmp_path: Path
) -> None:
    """Retention is the configured one, and a subscriber started later replays from the
    first event kept."""
    si = await admin.js.stream_info(subjects.EVENTS_STREAM)
    assert si.config.max_age == admin.settings.stream_max_age
    assert si.config.max_bytes == admin.settings.stream_max_bytes
    seqs: list[int] = []
    expected: dict[str, Any] = {}
    await tell_a_story(admin, 12, seqs, expected)
    run = await Run.start(nats_url, tmp_path, "--exit-when-idle")
    assert await run.wait() == 0, run.banner
    assert [s for s, _ in journal(tmp_path)] == seqs
    assert set(state(tmp_path)["holdings"]) == set(expected)


# ------------------------------------------------------------------ the real services, auth on


@pytest.fixture
async def secured(tmp_path: Path, cfg: Config) -> AsyncIterator[tuple[EmbeddedNats, Bus, Store]]:
    store = Store(tmp_path / "state")
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure(store.server_config(roles_for(NODES)))
    await server.astart()
    system = System(cfg, nats_url=server.url, sim_nodes=len(NODES), metrics_port=0, auth=store)
    admin: Bus | None = None
    try:
        await system.start()
        admin = await Bus.connect(
            server.url, "admin", setup=False, creds=store.credentials("admin")
        )
        yield server, admin, store
    finally:
        if admin is not None:
            await admin.close()
        await system.stop()
        server.cleanup()


def ask(name: str) -> SubmitRequest:
    return SubmitRequest(
        name=name, containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=25, cores=30)])]
    )


async def test_follows_the_services_as_the_reader_and_matches_the_ledger(
    secured: tuple[EmbeddedNats, Bus, Store], tmp_path: Path
) -> None:
    server, admin, store = secured
    work = tmp_path / "sub"
    work.mkdir()
    reader = [
        "--nkey",
        str(store.seed_file("reader")),
        "--tlsca",
        str(store.ca_file),
        "--durable",
        "ops",
    ]
    store.seed("reader")
    cli = await Bus.connect(server.url, "cli", setup=False, creds=store.credentials("cli"))
    try:
        run = await Run.start(server.url, work, *reader)
        for name in ("job-a", "job-b"):
            r = await cli.request(subjects.API_SUBMIT, ask(name), SubmitReply, timeout=20)
            assert r.ok, r
        await until(lambda: sum("bound" in w for _, w in journal(work)) >= 2, what="two bound")
        assert await run.stop() == 0, run.banner
        # While it is away: one more slice, and one given back.
        assert (await cli.request(subjects.API_SUBMIT, ask("job-c"), SubmitReply, timeout=20)).ok
        assert (
            await cli.request(subjects.API_RELEASE, ReleaseRequest(name="job-a"), ReleaseReply)
        ).ok

        run = await Run.start(server.url, work, *reader)
        assert "resuming consumer ops" in run.banner

        async def ledger() -> dict[str, Any]:
            out = {}
            for node in NODES:
                led, _ = await admin.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
                for uid, a in (led.allocs if led else {}).items():
                    out[uid] = {
                        "name": a.name,
                        "node": node,
                        "cards": [
                            {"uuid": d.uuid, "mem": d.mem, "cores": d.cores}
                            for c in a.containers
                            for d in c.devices
                        ],
                    }
            return out

        truth = await ledger()
        assert sorted(h["name"] for h in truth.values()) == ["job-b", "job-c"]

        def table_is_the_ledger() -> bool:
            held = state(work)["holdings"]
            return {
                u: {k: h[k] for k in ("name", "node", "cards")} for u, h in held.items()
            } == truth

        await until(table_is_the_ledger, "the table to match the ledger")
        assert await run.stop() == 0, run.banner
    finally:
        await cli.close()
    got = [seq for seq, _ in journal(work)]
    assert len(got) == len(set(got))
    assert any(w.startswith("released job-a") for _, w in journal(work))

    # The reader may not take a service's work queue, and the attempt changes nothing.
    js = admin.js
    before = (await js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)).config
    taken = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SUBSCRIBER),
        "--nats-url",
        server.url,
        "--state",
        str(work / "x.json"),
        "--quiet",
        *reader[:4],
        "--durable",
        subjects.PLACEMENT_CONSUMER,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await taken.communicate()
    assert taken.returncode == 1 and b"ermissions violation" in err, err
    after = (await js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)).config
    assert (
        after.filter_subjects == before.filter_subjects
        and after.deliver_subject == before.deliver_subject
    )


async def test_stored_events_and_work_queues_are_what_the_contract_says(
    secured: tuple[EmbeddedNats, Bus, Store],
) -> None:
    """Every event the services store validates against its channel's payload schema in
    docs/asyncapi.yaml and carries its headers; the durable work queues are filtered
    as the document's operations say."""
    server, admin, store = secured
    cli = await Bus.connect(server.url, "cli", setup=False, creds=store.credentials("cli"))
    try:
        assert (await cli.request(subjects.API_SUBMIT, ask("job-x"), SubmitReply, timeout=20)).ok
        assert (
            await cli.request(subjects.API_RELEASE, ReleaseRequest(name="job-x"), ReleaseReply)
        ).ok
    finally:
        await cli.close()
    doc = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    registry: Registry[Any] = Registry().with_resource(
        "urn:hami-bus", DRAFT202012.create_resource(doc)
    )
    patterns = []
    for ch in doc["channels"].values():
        if ch["address"] and ch["address"].startswith("hami.evt."):
            pattern = ".".join("*" if t.startswith("{") else t for t in ch["address"].split("."))
            (message,) = ch["messages"].values()
            name = message["$ref"].rsplit("/", 1)[1]
            patterns.append((pattern, doc["components"]["messages"][name]))
    js = admin.js
    last = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    kinds = set()
    for seq in range(1, last + 1):
        msg = await js.get_msg(subjects.EVENTS_STREAM, seq)
        assert msg.subject and msg.data is not None
        matched = [m for p, m in patterns if auth.subject_matches(p, msg.subject)]
        assert len(matched) == 1, msg.subject
        payload = json.loads(msg.data)
        Draft202012Validator(
            {"$ref": "urn:hami-bus" + matched[0]["payload"]["$ref"]}, registry=registry
        ).validate(payload)
        headers = dict(msg.headers or {})
        assert headers.get("Nats-Msg-Id"), msg.subject
        hdr_schema = {"$ref": "urn:hami-bus" + matched[0]["headers"]["$ref"]}
        Draft202012Validator(hdr_schema, registry=registry).validate(headers)
        kinds.add(payload["kind"])
    assert {"requested", "decided", "bound", "released"} <= kinds
    for durable, filters in asyncapi.WORK_QUEUES.items():
        cfg: api.ConsumerConfig = (await js.consumer_info(subjects.EVENTS_STREAM, durable)).config
        assert set(cfg.filter_subjects or [cfg.filter_subject or ""]) == set(filters), durable
