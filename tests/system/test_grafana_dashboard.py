"""Our Grafana dashboard against the real thing: what the metrics service exports.

The whole system runs on a real nats-server with simulated nodes; slices are placed,
one request is refused and one waits for capacity, and the node agents publish
telemetry. Then:

* every metric each panel (and each template variable) queries is in a scrape of the
  running metrics service, carrying every label the query selects on, groups by or
  names in its legend;
* a real Prometheus (Debian's ``prometheus``) scrapes that service and answers every
  panel's query with data: the PromQL parses, the joins match, the rates have samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hami.system import System
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    ContainerAsk,
    DeviceAsk,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)
from tests.debpkg import need

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "hami-bus" / "dashboards" / "hami-bus.json"

# PromQL words that are not metric names.
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "le",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
LABEL_VALUES = re.compile(
    r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)"
)
# label_replace(v, "dst", "repl", "src", "regex") makes label dst.
LABEL_REPLACE = re.compile(r'label_replace\([^"]*"([a-zA-Z_][a-zA-Z0-9_]*)"')


def grafana_vars(expr: str, rate: str = "30s") -> str:
    return (
        expr.replace("$__rate_interval", rate)
        .replace("$__interval", rate)
        .replace("$node", ".*")
        .replace("$namespace", ".*")
    )


def parse_query(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, labels the query needs on them, labels it makes itself)."""
    made = set(LABEL_REPLACE.findall(expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', grafana_vars(expr))
    labels: set[str] = set()
    for m in SELECTOR.finditer(text):
        labels |= set(MATCHER.findall(m.group(1)))
    text = SELECTOR.sub(" ", text)
    for m in GROUPING.finditer(text):
        labels |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names: set[str] = set()
    for m in IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or a keyword
        if re.fullmatch(r"[0-9.e+-]+", word):
            continue
        names.add(word)
    return names, labels - {"le"}, made


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panel_targets() -> list[tuple[str, str, str]]:
    """(panel title, expression, legend format) of every query of the dashboard."""
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"], t.get("legendFormat", "")))
    assert len(out) > 25
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    out = []
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = LABEL_VALUES.fullmatch(q.strip())
            assert m, q
            out.append((v["name"], m.group(1), m.group(2)))
    return out


def ask(
    name: str, pct: int | None, cores: int = 20, wait: bool = False, timeout: float = 30.0
) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        namespace="team-a" if name.startswith("a-") else "",
        containers=[
            ContainerAsk(name="main", devices=[DeviceAsk(nums=1, mem_percent=pct, cores=cores)])
        ],
        wait=wait,
        timeout=timeout,
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 5)


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


@dataclass
class Fleet:
    system: System
    bus: Bus
    waiter: asyncio.Task[SubmitReply]


@pytest.fixture
async def fleet(nats_url: str, cfg: Config, bus: Bus) -> AsyncIterator[Fleet]:
    cfg.telemetry_interval = 0.3
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["A100-80GB:2:81920"], metrics_port=0)
    await s.start()
    waiter: asyncio.Task[SubmitReply] | None = None
    try:
        for i, name in enumerate(("a-train", "a-infer", "b-notebook")):
            r = await submit(bus, ask(name, pct=60, cores=10 * (i + 1)))
            assert r.ok, r
        refused = await submit(
            bus,
            SubmitRequest(
                name="too-big", containers=[ContainerAsk(name="main", devices=[DeviceAsk(nums=3)])]
            ),
        )
        assert not refused.ok and refused.failure is not None
        r = await submit(bus, ask("b-last-card", pct=60))
        assert r.ok
        # Every card now has 60 % taken: one more 60 % slice waits for capacity.
        waiter = asyncio.create_task(submit(bus, ask("a-waits", pct=60, wait=True, timeout=120)))
        async with asyncio.timeout(15):
            while True:
                got = await asyncio.to_thread(scrape, s.metrics_url)
                if (
                    got.get("hami_pending_request_age_seconds")
                    and got.get("hami_vgpu_memory_used_bytes")
                    and got.get("hami_scheduling_bind_seconds_count")
                ):
                    break
                await asyncio.sleep(0.1)
        yield Fleet(system=s, bus=bus, waiter=waiter)
    finally:
        if waiter is not None:
            waiter.cancel()
            with contextlib.suppress(BaseException):
                await waiter
        await s.stop()


async def test_every_query_names_exported_metrics_with_their_labels(fleet: Fleet) -> None:
    got = await asyncio.to_thread(scrape, fleet.system.metrics_url)
    problems = []
    for title, expr, legend in panel_targets():
        names, labels, made = parse_query(expr)
        assert names, (title, expr)
        need_labels = (labels | set(LEGEND.findall(legend))) - made
        for name in sorted(names):
            if name not in got:
                problems.append(f"{title}: {name} is not exported")
                continue
            have = set().union(*(set(s) for s in got[name]))
            # A label the query groups by must be on the series; a legend label on the
            # series of at least one of the query's metrics (the other may be joined).
            lacking = labels - made - have
            if lacking:
                problems.append(f"{title}: {name} lacks {sorted(lacking)}")
        legend_lacking = (
            need_labels - labels - set().union(*(set(s) for n in names if n in got for s in got[n]))
        )
        if legend_lacking:
            problems.append(
                f"{title}: legend names {sorted(legend_lacking)}, on none of {sorted(names)}"
            )
    for var, metric, label in variable_queries():
        if metric not in got or not all(s.get(label) for s in got[metric]):
            problems.append(f"variable {var}: {metric} has no {label} label")
    assert not problems, "\n".join(problems)


def test_the_query_parser_finds_names_and_labels() -> None:
    # The check above is only as good as this: it must see through functions, strings,
    # ranges, matchers and groupings.
    names, labels, made = parse_query(
        'histogram_quantile(0.99, sum by (le, outcome) (rate(x_bucket{outcome="decided",node=~"$node"}'
        '[$__rate_interval]))) / on (node) group_left max by (node) (label_replace(y, "vendor", "$1", '
        '"device_type", "([^-]+).*")) or vector(0)'
    )
    assert names == {"x_bucket", "y"}
    assert labels == {"outcome", "node"}
    assert made == {"vendor"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def prometheus(target: str, tmp_path: Path) -> Iterator[str]:
    binary = need("prometheus", "prometheus")
    port = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "hami-bus", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr, "time": f"{time.time():.3f}"}
    )
    doc = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert doc["status"] == "success", doc
    result = doc["data"]["result"]
    assert isinstance(result, list)
    return result


async def test_a_real_prometheus_answers_every_panel_with_data(
    fleet: Fleet, tmp_path: Path
) -> None:
    target = fleet.system.metrics_url.removeprefix("http://")
    with prometheus(target, tmp_path) as base:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(OSError, ValueError):
                    up = await asyncio.to_thread(query, base, "up")
                    if up and up[0]["value"][1] == "1":
                        break
                await asyncio.sleep(0.2)
        # Decisions, binds, refusals and releases while Prometheus scrapes, so that every
        # rate has samples on both sides of a change.
        for i in range(6):
            r = await submit(fleet.bus, ask(f"churn-{i}", pct=10))
            assert r.ok, r
            bad = await submit(
                fleet.bus,
                SubmitRequest(
                    name=f"huge-{i}",
                    containers=[ContainerAsk(name="main", devices=[DeviceAsk(nums=3)])],
                ),
            )
            assert not bad.ok
            rel = await fleet.bus.request(
                subjects.API_RELEASE, ReleaseRequest(name=f"churn-{i}"), ReleaseReply
            )
            assert rel.ok
            await asyncio.sleep(0.7)
        await asyncio.sleep(1.5)  # one more scrape after the last change
        empty = []
        for title, expr, _ in panel_targets():
            result = await asyncio.to_thread(query, base, grafana_vars(expr))
            values = [float(s["value"][1]) for s in result]
            if not values or all(math.isnan(v) for v in values):
                empty.append(f"{title}: {expr} -> {result}")
        for var, metric, label in variable_queries():
            result = await asyncio.to_thread(query, base, f"count by ({label}) ({metric})")
            if not result:
                empty.append(f"variable {var}: no {label} values")
        assert not empty, "\n".join(empty)
