"""The page's Queues section in a real browser: headless Chromium against the real services.

One node of two 80 GiB cards and the queues of ``docs/queues.md``'s example: ``org``
(guarantee both cards) with children ``research`` (guarantee one card) and ``batch``
(none), and ``capped`` (at most 40 GiB). What a person sees: each queue under its
parent with its guarantee, limit and weight; ``batch`` borrowing the idle cluster; a
``research`` request that waits counted pending in ``research`` and in ``org``; and,
once a ``batch`` slice is released, that request placed, all without a reload. The
numbers are placement's, the ones ``hami queues`` shows. Without queues the section
says so in one line.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hami.system import System
from shared import subjects
from shared.bus import Bus
from shared.config import Config, QueueAmount, QueueSettings
from shared.schemas import (
    ContainerAsk,
    DeviceAsk,
    QueuesReply,
    QueuesRequest,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)
from tests.cdp import chromium
from tests.debpkg import need

CARD = 81920
MIB = 1024 * 1024
GUARD_S = 90.0  # a hang fails the test instead of stalling the suite; not a speed limit

# Each queue's row as the page shows it: the cells' text by column.
ROWS = (
    "Object.fromEntries([...document.querySelectorAll('tr.queue')].map(r => [r.dataset.queue,"
    " {depth: Number(r.dataset.depth), parent: r.dataset.parent,"
    " ...Object.fromEntries([...r.cells].map(c => [c.classList[0], c.innerText]))}]))"
)


def cell(queue: str, column: str) -> str:
    """JS: the text of one queue's cell, undefined while the row is not shown."""
    return f"document.querySelector('tr.queue[data-queue=\"{queue}\"] td.{column}')?.innerText"


def shown(mem: int, cores: int = 0) -> str:
    return f"{mem} MiB, {cores} % cores"


def row(
    name: str, parent: str, depth: int, guarantee: str, limit: str, used: str, borrowed: str
) -> dict[str, Any]:
    return {
        "name": name,
        "parent": parent,
        "depth": depth,
        "guarantee": guarantee,
        "limit": limit,
        "used": used,
        "borrowed": borrowed,
        "pending": "0",
        "weight": "1",
    }


def ask(name: str, queue: str, wait: bool = False) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[DeviceAsk(mem_percent=100)])],
        queue=queue,
        uid=str(uuid.uuid4()),
        wait=wait,
        timeout=60.0,
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


def queues() -> list[QueueSettings]:
    return [
        QueueSettings(name="org", guarantee=QueueAmount(memory=2 * CARD, cores=200)),
        QueueSettings(name="research", parent="org", guarantee=QueueAmount(memory=CARD, cores=100)),
        QueueSettings(name="batch", parent="org"),
        QueueSettings(name="capped", limit=QueueAmount(memory=CARD // 2)),
    ]


@pytest.fixture
async def system(
    nats_url: str, cfg: Config, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    cfg.queues = queues() if request.param else []
    cfg.scheduler.preemption = False  # research waits for room rather than take it back
    s = System(
        cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=[f"A100-80GB:2:{CARD}"], metrics_port=0
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.mark.parametrize("system", [True], indirect=True)
async def test_the_page_shows_each_queue_with_guarantee_use_borrowed_and_pending(
    system: System, bus: Bus, tmp_path: Path
) -> None:
    browser = need("chromium", "chromium")
    async with asyncio.timeout(GUARD_S), chromium(browser, tmp_path / "profile", 1280, 860) as page:
        await page.navigate(system.metrics_url + "/")
        await page.wait_for(cell("default", "name"))
        got = await page.evaluate(ROWS)
        told = await bus.request(
            subjects.PLACEMENT_QUEUES, QueuesRequest(), QueuesReply, timeout=10
        )
        assert list(got) == [q.name for q in told.queues]  # placement's order: parents first
        assert list(got).index("org") < list(got).index("research")
        none = shown(0)
        assert got == {
            "org": row("org", "", 0, shown(2 * CARD, 200), "none", none, none),
            "research": row("research", "org", 1, shown(CARD, 100), "none", none, none),
            "batch": row("batch", "org", 1, "none", "none", none, none),
            "capped": row("capped", "", 0, "none", f"{CARD // 2} MiB", none, none),
            "default": row("default", "", 0, "none", "none", none, none),
        }
        # A child is indented under its parent.
        indent = await page.evaluate(
            "['org', 'research'].map(q => parseFloat(getComputedStyle(document.querySelector("
            '`tr.queue[data-queue="${q}"] td.name`)).paddingLeft))'
        )
        assert indent[1] > indent[0], indent
        await page.evaluate("window.sameDocument = true")

        # batch has no guarantee: the whole idle cluster it takes is borrowed (org's own).
        for i in range(2):
            r = await submit(bus, ask(f"batch-{i}", "batch"))
            assert r.ok, r
        await page.wait_for(f"{cell('batch', 'used')} === '{shown(2 * CARD)}'")
        got = await page.evaluate(ROWS)
        assert (got["batch"]["used"], got["batch"]["borrowed"]) == (shown(2 * CARD),) * 2
        assert (got["org"]["used"], got["org"]["borrowed"]) == (shown(2 * CARD), none)
        assert got["research"]["used"] == none
        assert await page.evaluate(
            "document.querySelector('tr.queue[data-queue=\"batch\"] td.borrowed')"
            ".classList.contains('borrowing')"
        )

        # research asks for a card and waits for room: pending in it and in org above it.
        waiting = asyncio.create_task(submit(bus, ask("research-0", "research", wait=True)))
        try:
            await page.wait_for(f"{cell('research', 'pending')} === '1'")
            got = await page.evaluate(ROWS)
            assert (got["org"]["pending"], got["batch"]["pending"]) == ("1", "0")
            # The page agrees with what 'hami queues' is told.
            told = await bus.request(
                subjects.PLACEMENT_QUEUES, QueuesRequest(), QueuesReply, timeout=10
            )
            assert {q.name: q.pending for q in told.queues if q.pending} == {
                "org": 1,
                "research": 1,
            }

            # A batch slice released: research gets its card, under its guarantee.
            rel = await bus.request(
                subjects.API_RELEASE, ReleaseRequest(name="batch-1"), ReleaseReply, timeout=10
            )
            assert rel.ok, rel
            placed = await waiting
            assert placed.ok, placed
        finally:
            if not waiting.done():
                waiting.cancel()
        await page.wait_for(f"{cell('research', 'used')} === '{shown(CARD)}'")
        await page.wait_for(f"{cell('research', 'pending')} === '0'")
        got = await page.evaluate(ROWS)
        assert (got["research"]["used"], got["research"]["borrowed"]) == (shown(CARD), none)
        assert (got["batch"]["used"], got["batch"]["borrowed"]) == (shown(CARD), shown(CARD))
        assert (got["org"]["used"], got["org"]["pending"]) == (shown(2 * CARD), "0")
        assert await page.evaluate("window.sameDocument") is True
        assert page.errors() == []
        # The same numbers as series, for Grafana and alert rules.
        text = await asyncio.to_thread(scrape, system.metrics_url + "/metrics")
        got_series = {
            (s.name, s.labels["queue"]): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name.startswith("hami_queue_")
        }
        assert got_series[("hami_queue_used_memory_bytes", "research")] == CARD * MIB
        assert got_series[("hami_queue_borrowed_memory_bytes", "batch")] == CARD * MIB
        assert got_series[("hami_queue_borrowed_memory_bytes", "research")] == 0
        assert got_series[("hami_queue_guarantee_memory_bytes", "org")] == 2 * CARD * MIB
        assert got_series[("hami_queue_limit_memory_bytes", "capped")] == CARD // 2 * MIB
        assert ("hami_queue_limit_memory_bytes", "org") not in got_series  # no limit
        assert got_series[("hami_queue_pending_requests", "research")] == 0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


@pytest.mark.parametrize("system", [False], indirect=True)
async def test_without_queues_the_section_says_so_in_one_line(
    system: System, tmp_path: Path
) -> None:
    browser = need("chromium", "chromium")
    async with asyncio.timeout(GUARD_S), chromium(browser, tmp_path / "profile", 1280, 860) as page:
        await page.navigate(system.metrics_url + "/")
        text = await page.wait_for(
            "document.getElementById('queues').innerText.includes('no queues')"
            " && document.getElementById('queues').innerText"
        )
        assert text.strip() == "no queues configured: requests are tried in arrival order"
        assert await page.evaluate("document.querySelectorAll('tr.queue').length") == 0
        assert page.errors() == []
