"""A real Prometheus scraping ``hami up`` answers both dashboards, every query with data.

``hami up`` runs as a user starts it (its own nats-server, authorization on, simulated
nodes); slices are placed, one request is refused, one waits for capacity and a few come
and go while Debian's ``prometheus`` scrapes its ``/metrics``. Then each query of HAMi's
own Grafana dashboard (tests/system/hami_dashboard_queries.py) and of ours
(helm/hami-bus/dashboards/hami-bus.json) goes through Prometheus's HTTP API, with
Grafana's variables as "All" sets them, and must answer series carrying the labels the
panel shows or groups by; each template variable must list values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hami import cli
from shared import subjects
from shared.bus import Bus
from shared.schemas import ContainerAsk, DeviceAsk, ReleaseReply, ReleaseRequest, SubmitRequest
from tests.system.hami_dashboard_queries import (
    DASHBOARD_QUERIES,
    DASHBOARD_SERIES,
    DASHBOARD_VARIABLES,
)
from tests.system.test_cli import HAMI
from tests.system.test_grafana_dashboard import (
    LEGEND,
    ask,
    grafana_vars,
    panel_targets,
    parse_query,
    prometheus,
    query,
    scrape,
    submit,
    variable_queries,
)

NODES = 2


@dataclass
class Up:
    metrics_url: str
    bus: Bus  # the CLI's identity on hami up's server
    waiter: asyncio.Task[Any]


@contextlib.contextmanager
def hami_up(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``hami up`` in the foreground, as a user runs it; its state file's contents."""
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    env.pop("HAMI_NATS_URL", None)
    conf = tmp_path / "hami.yaml"
    conf.write_text("telemetryInterval: 0.5\n")  # usage samples between scrapes
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", str(NODES), "--sim-gpus", "A100-80GB:2:81920",
         "--metrics-port", "0", "--config", str(conf)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "hami is up" in line:
                break
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "hami up ended")
        yield json.loads((tmp_path / "state.json").read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Up]:
    monkeypatch.setenv("HAMI_STATE_FILE", str(tmp_path / "state.json"))  # the CLI's creds
    with hami_up(tmp_path) as state:
        bus = await cli.connect(state["nats_url"])
        waiter: asyncio.Task[Any] | None = None
        try:
            for i, name in enumerate(("a-train", "a-infer", "b-notebook", "b-last-card")):
                r = await submit(bus, ask(name, pct=60, cores=10 * (i + 1)))
                assert r.ok, r
            big = SubmitRequest(
                name="too-big", containers=[ContainerAsk(name="main", devices=[DeviceAsk(nums=3)])]
            )
            refused = await submit(bus, big)
            assert not refused.ok and refused.failure is not None
            # Every card has 60 % taken: one more 60 % slice waits for capacity.
            waiter = asyncio.create_task(
                submit(bus, ask("a-waits", pct=60, wait=True, timeout=300))
            )
            url = state["metrics_url"]
            async with asyncio.timeout(30):
                while True:
                    got = await asyncio.to_thread(scrape, url)
                    if got.get("hami_pending_request_age_seconds") and got.get(
                        "hami_vgpu_memory_used_bytes"
                    ):
                        break
                    await asyncio.sleep(0.2)
            yield Up(metrics_url=url, bus=bus, waiter=waiter)
        finally:
            if waiter is not None:
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
            await bus.close()


def lacking(result: list[dict[str, Any]], labels: set[str]) -> list[str]:
    """What is wrong with a query's answer: empty, no numbers, or series without labels."""
    values = [float(s["value"][1]) for s in result]
    if not values or all(math.isnan(v) for v in values):
        return [f"no data: {result}"]
    out = []
    for s in result:
        missing = sorted(lb for lb in labels if not s["metric"].get(lb))
        if missing:
            out.append(f"series {s['metric']} lacks {missing}")
    return out


def test_the_restated_queries_are_the_dashboards_series() -> None:
    # The queries above and the names and labels kept from HAMi's dashboard are one
    # dashboard: every metric and label a query touches is a kept one, and each kept
    # metric is queried.
    seen: set[str] = set()
    for title, expr, shown in DASHBOARD_QUERIES:
        names, labels, _ = parse_query(expr)
        assert names <= set(DASHBOARD_SERIES), title
        seen |= names
        kept = set().union(*(DASHBOARD_SERIES[n] for n in names))
        assert (labels | set(shown)) <= kept, (title, (labels | set(shown)) - kept)
    assert seen == set(DASHBOARD_SERIES)
    assert len(DASHBOARD_QUERIES) == 17


async def test_a_real_prometheus_answers_both_dashboards_against_hami_up(
    up: Up, tmp_path: Path
) -> None:
    target = up.metrics_url.removeprefix("http://").rstrip("/")
    with prometheus(target, tmp_path) as base:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(OSError, ValueError):
                    got = await asyncio.to_thread(query, base, "up")
                    if got and got[0]["value"][1] == "1":
                        break
                await asyncio.sleep(0.2)
        # Decisions, binds, refusals and releases while it scrapes, so every rate has
        # samples on both sides of a change.
        for i in range(5):
            r = await submit(up.bus, ask(f"churn-{i}", pct=10))
            assert r.ok, r
            bad = await submit(
                up.bus,
                SubmitRequest(
                    name=f"huge-{i}",
                    containers=[ContainerAsk(name="main", devices=[DeviceAsk(nums=3)])],
                ),
            )
            assert not bad.ok
            rel = await up.bus.request(
                subjects.API_RELEASE, ReleaseRequest(name=f"churn-{i}"), ReleaseReply
            )
            assert rel.ok, rel
            await asyncio.sleep(0.7)
        await asyncio.sleep(1.5)  # one scrape more after the last change

        problems: list[str] = []
        for title, expr, labels in DASHBOARD_QUERIES:
            result = await asyncio.to_thread(query, base, grafana_vars(expr))
            problems += [f"HAMi {title}: {expr}: {p}" for p in lacking(result, set(labels))]
        for var, metric, label in DASHBOARD_VARIABLES:
            result = await asyncio.to_thread(query, base, f"count by ({label}) ({metric})")
            if not result:
                problems.append(f"HAMi variable {var}: no {label} values")
        for title, expr, legend in panel_targets():
            # The labels a legend shows, or for a table (no legend) the columns its
            # outermost aggregation keeps.
            shown = set(LEGEND.findall(legend))
            outer = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", expr)
            if not legend and outer:
                shown = {x.strip() for x in outer.group(1).split(",") if x.strip()}
            result = await asyncio.to_thread(query, base, grafana_vars(expr))
            problems += [f"ours {title}: {expr}: {p}" for p in lacking(result, shown)]
        for var, metric, label in variable_queries():
            result = await asyncio.to_thread(query, base, f"count by ({label}) ({metric})")
            if not result:
                problems.append(f"our variable {var}: no {label} values")
        assert not problems, "\n".join(problems)
