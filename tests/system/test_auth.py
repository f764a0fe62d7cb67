"""With identities on, the server itself refuses every forgery the issue lists, while
the services, each under its own role, still place a slice end to end.

A real nats-server runs the configuration :mod:`shared.auth` generates (nkey users,
permissions, TLS from a CA made for the test); a refusal is the server's
``Permissions Violation`` error, never a check of ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from hami.creds import Store, roles_for
from hami.system import System
from shared import subjects
from shared.bus import ENCODER, Bus, connect_options, decode
from shared.config import Config
from shared.natsserver import EmbeddedNats
from shared.schemas import ContainerAsk, DeviceAsk, NodeInventory, SubmitReply, SubmitRequest

NODES = ["sim-node-0", "sim-node-1"]


def ask(name: str) -> SubmitRequest:
    return SubmitRequest(name=name, containers=[
        ContainerAsk(devices=[DeviceAsk(mem_percent=25, cores=30)])])


class Client_:
    """A raw nats-py client under one role, recording what the server refused."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def refused(self, action: Callable[[], Awaitable[object]], what: str) -> None:
        """``action`` draws the server's permissions violation naming ``what``."""
        await action()
        await self.nc.flush()
        for _ in range(200):
            if any("permissions violation" in e.lower() and what.lower() in e.lower() for e in self.errors):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the server did not refuse {what!r}: {self.errors}")


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, Store]]:
    store = Store(tmp_path / "state")
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure(store.server_config(roles_for(NODES)))
    await server.astart()
    try:
        yield server, store
    finally:
        server.cleanup()


@pytest.fixture
async def connect(
    secured: tuple[EmbeddedNats, Store],
) -> AsyncIterator[Callable[[str], Awaitable[Client_]]]:
    server, store = secured
    opened: list[Client] = []

    async def as_role(role: str) -> Client_:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(
            server.url, allow_reconnect=False, error_cb=on_error,
            **connect_options(store.credentials(role)),
        )
        opened.append(nc)
        return Client_(nc, errors)

    yield as_role
    for nc in opened:
        if not nc.is_closed:
            await nc.close()


@pytest.fixture
async def system(secured: tuple[EmbeddedNats, Store], cfg: Config) -> AsyncIterator[System]:
    server, store = secured
    s = System(cfg, nats_url=server.url, sim_nodes=len(NODES), metrics_port=0, auth=store)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_no_identity_no_connection(secured: tuple[EmbeddedNats, Store]) -> None:
    server, store = secured
    with pytest.raises(Exception):  # noqa: B017 - TLS or authorization, either refuses
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2)
    # TLS but no nkey: the server refuses the user.
    opts = connect_options(store.credentials("cli"))
    opts.pop("nkeys_seed")
    with pytest.raises(Exception):  # noqa: B017
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2, **opts)


async def test_submit_to_decided_under_identities(system: System, connect: Callable[[str], Awaitable[Client_]]) -> None:
    cli = await connect("cli")
    req = ask("job-1")
    resp = await cli.nc.request(subjects.API_SUBMIT, ENCODER.encode(req), timeout=20)
    reply = decode(resp.data, SubmitReply)
    assert reply.ok, reply
    assert reply.decision is not None and reply.decision.node in NODES


async def test_metrics_may_ask_placement_for_the_queues(system: System) -> None:
    # The page at / and the hami_queue_* series ask placement under metrics' identity;
    # a refused ask shows "queues unknown" there instead of the queues.
    def fleet() -> dict[str, Any]:
        with urllib.request.urlopen(system.metrics_url + "/api/fleet", timeout=10) as r:
            got: dict[str, Any] = json.loads(r.read())
        return got

    queues = (await asyncio.to_thread(fleet))["queues"]
    assert queues["known"], queues["error"]
    assert queues["error"] == "" and queues["capacity"]["mem_mib"] > 0


@pytest.mark.parametrize("role", ["cli", "nodeagent:sim-node-0", "reader", "metrics"])
async def test_forged_decided_and_released_refused(
    secured: object, connect: Callable[[str], Awaitable[Client_]], role: str
) -> None:
    c = await connect(role)
    for subject in (subjects.alloc("decided", "attacker-node"), subjects.alloc("released"),
                    subjects.alloc("released", "sim-node-1")):
        await c.refused(lambda s=subject: c.nc.publish(s, b"{}"), subject)


async def test_node_agent_writes_only_its_own_keys(
    secured: tuple[EmbeddedNats, Store], connect: Callable[[str], Awaitable[Client_]]
) -> None:
    _, store = secured
    # The owner of the bucket made it; the agent's own key is its to write.
    setup = await Bus.connect(secured[0].url, "inv", creds=store.credentials("inventory"))
    agent = await Bus.connect(secured[0].url, "agent", creds=store.credentials("nodeagent:sim-node-0"))
    try:
        assert await agent.kv_put(subjects.NODES_BUCKET, "sim-node-0", NodeInventory(node="sim-node-0")) > 0
    finally:
        await agent.close()
        await setup.close()
    c = await connect("nodeagent:sim-node-0")
    for subject in (f"$KV.{subjects.NODES_BUCKET}.sim-node-1", f"$KV.{subjects.LEDGER_BUCKET}.sim-node-0",
                    subjects.heartbeat("sim-node-1"), subjects.telemetry("sim-node-1")):
        await c.refused(lambda s=subject: c.nc.publish(s, b"{}"), subject)
    await c.refused(lambda: c.nc.subscribe(subjects.HEARTBEAT_ALL), subjects.HEARTBEAT_ALL)


async def test_reader_cannot_register_a_node_or_read_outside_the_stream(
    connect: Callable[[str], Awaitable[Client_]],
) -> None:
    c = await connect("reader")
    fake = f"$KV.{subjects.NODES_BUCKET}.fake-node"
    await c.refused(lambda: c.nc.publish(fake, b'{"node":"fake-node"}'), fake)
    for subject in (subjects.HEARTBEAT_ALL, "$KV.>", "_INBOX.>", subjects.API_SUBMIT, ">"):
        await c.refused(lambda s=subject: c.nc.subscribe(s), subject)
    await c.refused(lambda: c.nc.publish(subjects.API_SUBMIT, b"{}"), subjects.API_SUBMIT)


@pytest.mark.parametrize("role", ["placement", "binder", "inventory", "reader", "cli"])
async def test_only_admin_purges_or_deletes(
    system: System, connect: Callable[[str], Awaitable[Client_]], role: str
) -> None:
    c = await connect(role)
    for subject in (f"$JS.API.STREAM.PURGE.KV_{subjects.LEDGER_BUCKET}",
                    f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}",
                    f"$JS.API.CONSUMER.DELETE.{subjects.EVENTS_STREAM}.placement"):
        await c.refused(lambda s=subject: c.nc.publish(s, b""), subject)
    js = system.buses[0].js
    assert (await js.stream_info(subjects.EVENTS_STREAM)).config.name == subjects.EVENTS_STREAM


async def test_reader_follows_the_event_stream(
    system: System, connect: Callable[[str], Awaitable[Client_]]
) -> None:
    """The read-only identity's ordered consumer sees a slice's life, and nothing more."""
    reader = await connect("reader")
    got: asyncio.Queue[str] = asyncio.Queue()

    async def cb(msg: nats.aio.msg.Msg) -> None:
        await got.put(msg.subject)

    js = reader.nc.jetstream()
    await js.subscribe("hami.evt.alloc.>", stream=subjects.EVENTS_STREAM, ordered_consumer=True, cb=cb)
    cli = await connect("cli")
    await cli.nc.request(subjects.API_SUBMIT, ENCODER.encode(ask("job-r")), timeout=20)
    seen = set()
    async with asyncio.timeout(20):
        while not {"requested", "decided", "bound"} <= seen:
            seen.add((await got.get()).split(".")[3])
    assert not reader.errors


async def test_revoked_identity_is_cut_off(
    secured: tuple[EmbeddedNats, Store], connect: Callable[[str], Awaitable[Client_]]
) -> None:
    server, store = secured
    cli = await connect("cli")
    reader = await connect("reader")
    closed = asyncio.Event()
    cli.nc._closed_cb = closed.set  # type: ignore[assignment]  # noqa: SLF001
    server.configure(store.server_config([r for r in roles_for(NODES) if r != "cli"]))
    server.reload()
    async with asyncio.timeout(10):
        while cli.nc.is_connected:  # noqa: ASYNC110 - the server closes it
            await asyncio.sleep(0.02)
    assert reader.nc.is_connected
    with pytest.raises(Exception):  # noqa: B017 - an authorization violation
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2, **connect_options(store.credentials("cli")))


async def test_services_recreate_a_deleted_stream(
    secured: tuple[EmbeddedNats, Store], connect: Callable[[str], Awaitable[Client_]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, store = secured
    binder = await Bus.connect(server.url, "binder", creds=store.credentials("binder"))
    try:
        admin = await connect("admin")
        await admin.nc.jetstream().delete_stream(subjects.EVENTS_STREAM)
        with caplog.at_level(logging.WARNING, logger="hami.bus"):
            ack = await binder.publish_event(
                subjects.alloc("requested"), NodeInventory(node="x"), msg_id="m1")
        assert ack.stream == subjects.EVENTS_STREAM
        assert any("was missing" in r.getMessage() for r in caplog.records)
    finally:
        await binder.close()


async def test_hami_up_hands_out_a_reader_and_revokes_it(tmp_path: Path) -> None:
    """Through the real command line: ``hami up`` is secured by default, ``hami creds
    reader`` gives a working read-only identity, ``--revoke`` cuts it off."""
    import json
    import os
    import subprocess

    from tests.system.test_cli import HAMI, run

    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    env.pop("HAMI_NATS_URL", None)
    env.pop("HAMI_NATS_SEED", None)
    proc = await asyncio.to_thread(
        subprocess.Popen, [*HAMI, "up", "--sim-nodes", "1", "--metrics-port", "0"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def hami(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run, env, *args)

    try:
        assert proc.stdout is not None
        lines = []
        async with asyncio.timeout(60):
            while not lines or "hami is up" not in lines[-1]:
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line, proc.stderr.read() if proc.stderr else ""
                lines.append(line)
        assert any("hami creds reader" in ln for ln in lines)
        st = json.loads((tmp_path / "state.json").read_text())
        seeds = list((Path(st["auth_dir"]) / "nkeys").glob("*.nk"))
        assert seeds and all(p.stat().st_mode & 0o077 == 0 for p in seeds)
        assert os.stat(st["auth_dir"]).st_mode & 0o077 == 0

        got = await hami("creds", "reader")
        assert got.returncode == 0 and got.stdout.startswith("SU"), got.stderr
        from shared.auth import Credentials

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        reader = await nats.connect(st["nats_url"], allow_reconnect=False, error_cb=on_error, **connect_options(
            Credentials(role="reader", seed=got.stdout, tls_ca=str(Path(st["auth_dir"]) / "ca.crt"))))
        c = Client_(reader, errors)
        forged = subjects.alloc("decided", "attacker-node")
        await c.refused(lambda: reader.publish(forged, b"{}"), forged)
        events = await reader.subscribe("hami.evt.>")
        await reader.flush()
        assert (await hami("submit", "job-1", "--mem", "1000")).returncode == 0  # the cli identity
        assert (await events.next_msg(timeout=10)).subject.startswith("hami.evt.")

        assert (await hami("creds", "reader", "--revoke")).returncode == 0
        async with asyncio.timeout(10):
            while reader.is_connected:  # noqa: ASYNC110 - the server closes it
                await asyncio.sleep(0.02)
        assert (await hami("status")).returncode == 0  # the others keep working
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def test_a_service_process_runs_under_its_creds(
    secured: tuple[EmbeddedNats, Store], connect: Callable[[str], Awaitable[Client_]]
) -> None:
    """``python -m services.inventory --creds … --tls-ca …``: the process form of a role."""
    import subprocess
    import sys

    from shared.schemas import ClusterStatus, StatusRequest

    server, store = secured
    c = store.credentials("inventory")
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "services.inventory", "--nats-url", server.url, "--health-port", "0",
         "--creds", c.seed_file, "--tls-ca", c.tls_ca],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        cli = await connect("cli")
        async with asyncio.timeout(30):
            while True:
                try:
                    resp = await cli.nc.request(subjects.API_STATUS, ENCODER.encode(StatusRequest()), timeout=1)
                    break
                except Exception:  # not up yet: no responders
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                    await asyncio.sleep(0.2)
        assert decode(resp.data, ClusterStatus).nodes == []
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)


async def test_submits_work_again_after_the_event_stream_is_deleted(
    secured: tuple[EmbeddedNats, Store], cfg: Config, connect: Callable[[str], Awaitable[Client_]],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream and the durable consumers come back by themselves, and say so."""
    import shared.bus

    monkeypatch.setattr(shared.bus, "CONSUMER_CHECK_S", 0.2)
    server, store = secured
    s = System(cfg, nats_url=server.url, sim_nodes=len(NODES), metrics_port=0, auth=store)
    await s.start()
    try:
        cli = await connect("cli")
        first = await cli.nc.request(subjects.API_SUBMIT, ENCODER.encode(ask("before")), timeout=20)
        assert decode(first.data, SubmitReply).ok
        admin = await connect("admin")
        with caplog.at_level(logging.WARNING, logger="hami.bus"):
            await admin.nc.jetstream().delete_stream(subjects.EVENTS_STREAM)
            resp = await cli.nc.request(subjects.API_SUBMIT, ENCODER.encode(ask("after")), timeout=30)
            assert decode(resp.data, SubmitReply).ok, resp.data
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"stream {subjects.EVENTS_STREAM} was missing" in said
        assert "consumer placement was missing" in said and "consumer binder was missing" in said
    finally:
        await s.stop()


async def test_deployment_credentials_from_init(tmp_path: Path) -> None:
    """``python -m hami.creds init``: what compose and the chart mount; the seeds it
    writes authenticate against the configuration it writes, and a rerun keeps them."""
    import subprocess
    import sys

    from shared.auth import Credentials

    out = tmp_path / "auth"
    cmd = [sys.executable, "-m", "hami.creds", "init", str(out), "--node", "n1", "--server-name", "nats",
           "--store-dir", ""]  # EmbeddedNats gives its own -sd
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seed = (out / "nkeys" / "nodeagent:n1.nk").read_text()
    again = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (out / "nkeys" / "nodeagent:n1.nk").read_text() == seed
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure((out / "nats-server.conf").read_text())
    await server.astart()
    try:
        creds = Credentials(role="nodeagent:n1", seed_file=str(out / "nkeys" / "nodeagent:n1.nk"),
                            tls_ca=str(out / "ca.crt"))
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(server.url, allow_reconnect=False, error_cb=on_error,
                                **connect_options(creds))
        c = Client_(nc, errors)
        await nc.publish(subjects.heartbeat("n1"), b"{}")
        await c.refused(lambda: nc.publish(subjects.heartbeat("n2"), b"{}"), subjects.heartbeat("n2"))
        assert [e for e in errors if "n1" in e] == []
        await nc.close()
    finally:
        server.cleanup()
