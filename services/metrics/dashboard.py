"""The operator's page at ``/``: what each card holds, who shares it, what waits, live.

Pure: :func:`fleet_view` turns the inventory, ledgers, health, node telemetry, the
pending requests, the recent events and placement's queues into the JSON
``/api/fleet`` answers; :data:`PAGE`
is the page itself, plain HTML and JavaScript with no build step and nothing fetched
from elsewhere. The page renders ``/api/fleet`` and follows ``/api/events`` (server-sent
events), fetching the view again whenever something happens, so a new allocation shows
without a reload.
"""

from __future__ import annotations

from typing import Any

from services.metrics.queues import QueueState, queue_view
from shared.schemas import (
    NodeHealth,
    NodeInventory,
    NodeLedger,
    PendingRequest,
    Telemetry,
    card_usage,
)

MIB = 1024 * 1024


def fleet_view(
    nodes: dict[str, NodeInventory],
    ledgers: dict[str, NodeLedger],
    health: dict[str, NodeHealth],
    telemetry: dict[str, Telemetry],
    waiting: list[PendingRequest],
    events: list[dict[str, Any]],
    now: float,
    queues: QueueState | None = None,
) -> dict[str, Any]:
    out_nodes: list[dict[str, Any]] = []
    for name in sorted(nodes):
        inv = nodes[name]
        ledger = ledgers.get(name)
        allocs = (
            sorted(ledger.allocs.values(), key=lambda a: (a.namespace, a.name)) if ledger else []
        )
        tel = telemetry.get(name)
        host = {d.uuid: d for d in tel.devices} if tel else {}
        used_bytes: dict[tuple[str, str], int] = {}  # (alloc uid, card) -> bytes in use
        for cu in tel.containers if tel else []:
            k = (cu.uid, cu.uuid)
            used_bytes[k] = used_bytes.get(k, 0) + cu.memory_used_bytes
        sharers: dict[str, list[dict[str, Any]]] = {}
        totals: dict[str, tuple[int, int, int]] = {}
        for a in allocs:
            for uuid, (mem, cores, slots) in card_usage(a.containers).items():
                t = totals.get(uuid, (0, 0, 0))
                totals[uuid] = (t[0] + mem, t[1] + cores, t[2] + slots)
                containers = sorted(
                    {c.name for c in a.containers if any(g.uuid == uuid for g in c.devices)}
                )
                sharers.setdefault(uuid, []).append(
                    {
                        "uid": a.uid,
                        "pod": a.name,
                        "namespace": a.namespace,
                        "source": a.source,
                        "containers": containers,
                        "mem_mib": mem,
                        "cores": cores,
                        "mem_used_mib": round(used_bytes.get((a.uid, uuid), 0) / MIB),
                        "since": a.decided_at,
                    }
                )
        cordoned = set(inv.cordoned)
        cards: list[dict[str, Any]] = []
        for d in inv.devices:
            mem, cores, slots = totals.get(d.uuid, (0, 0, 0))
            du = host.get(d.uuid)
            cards.append(
                {
                    "uuid": d.uuid,
                    "index": d.index,
                    "type": d.type,
                    "vendor": d.vendor,
                    "mode": d.mode,
                    "health": d.health,
                    "cordoned": d.uuid in cordoned,
                    "mem_total_mib": d.devmem,
                    "mem_granted_mib": mem,
                    "mem_free_mib": max(0, d.devmem - mem),
                    "cores_total": d.devcore,
                    "cores_granted": cores,
                    "cores_free": max(0, d.devcore - cores),
                    "slots_total": d.count,
                    "slots_used": slots,
                    "slots_free": max(0, d.count - slots),
                    "mem_used_mib": du.memory_used_mib if du else None,
                    "utilization": round(du.utilization * 100) if du else None,
                    "sharers": sharers.get(d.uuid, []),
                }
            )
        h = health.get(name)
        out_nodes.append(
            {
                "node": name,
                "healthy": h.healthy if h else True,
                "reason": h.reason if h else "",
                "cards": cards,
                "telemetry_at": tel.at if tel else None,
            }
        )
    return {
        "at": now,
        "nodes": out_nodes,
        "pending": [
            {
                "uid": p.uid,
                "name": p.name,
                "namespace": p.namespace,
                "source": p.source,
                "waiting_s": round(max(0.0, now - (p.requested_at or p.failed_at)), 1),
                "message": p.message,
                "reasons": p.reasons,
            }
            for p in waiting
        ],
        "events": events,
        "queues": queue_view(queues or QueueState(error="placement not asked")),
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hami-bus: GPU slices</title>
<link rel="icon" href="data:,">
<style>
:root{--ok:#2a8a57;--bad:#c0392b;--warn:#b7791f;--mute:#666;--line:#ddd}
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{color:#cbd5e1}
main{display:grid;grid-template-columns:minmax(0,3fr) minmax(280px,1fr);gap:16px;padding:16px 20px}
section.node{background:#fff;border:1px solid var(--line);border-radius:6px;margin-bottom:16px;padding:10px 14px}
section.node h2,section.queues h2{font-size:16px;margin:0 0 8px}
section.queues{background:#fff;border:1px solid var(--line);border-radius:6px;margin-bottom:16px;padding:10px 14px}
.borrowing{color:var(--warn)}
.badge{font-size:12px;padding:1px 6px;border-radius:8px;color:#fff;margin-left:6px}
.healthy{background:var(--ok)}.unhealthy{background:var(--bad)}.cordoned{background:var(--warn)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 10px}
.card h3{font-size:14px;margin:0}.card .uuid{color:var(--mute);font-size:11px;word-break:break-all}
.meter{display:grid;grid-template-columns:56px 1fr 190px;gap:6px;align-items:center;font-size:12px;margin-top:3px}
.bar{height:9px;background:#e5e7eb;border-radius:4px;overflow:hidden}
.bar div{height:100%;background:#3b82f6}
.free{font-size:12px;color:var(--ok);margin-top:4px}
table{border-collapse:collapse;width:100%;font-size:12px;margin-top:6px}
th,td{text-align:left;padding:2px 6px;border-bottom:1px solid var(--line)}th{color:var(--mute);font-weight:600}
aside section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 14px;margin-bottom:16px}
aside h2{font-size:15px;margin:0 0 6px}
#events{list-style:none;margin:0;padding:0;max-height:60vh;overflow:auto;font-size:12px}
#events li{border-bottom:1px solid var(--line);padding:3px 0}#events time{color:var(--mute);margin-right:6px}
#events .failed,#events .bind_failed,#events .unhealthy{color:var(--bad)}#events .decided{color:var(--ok)}
.empty{color:var(--mute)}#conn.down{color:#fca5a5}
</style></head>
<body>
<header><h1>GPU slices</h1><span id="summary">loading...</span><span id="conn">live</span>
<span><a style="color:#93c5fd" href="/metrics">/metrics</a></span></header>
<main><div><section class="queues"><h2>Queues</h2><div id="queues"><p class="empty">loading...</p></div></section>
<div id="nodes"><p class="empty">loading...</p></div></div>
<aside><section><h2>Pending requests</h2><div id="pending"><p class="empty">none</p></div></section>
<section><h2>Recent events</h2><ul id="events"></ul></section></aside></main>
<script>
"use strict";
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v; else el.setAttribute(k, v);
  }
  for (const k of kids) el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return el;
}
function pct(used, total) { return total > 0 ? Math.min(100, Math.round(100 * used / total)) : 0; }
function meter(label, granted, total, unit, note) {
  const bar = h("div", {class: "bar"}, h("div", {style: "width:" + pct(granted, total) + "%"}));
  return h("div", {class: "meter"}, h("span", {}, label), bar,
    h("span", {}, granted + " / " + total + unit + (note ? ", " + note : "")));
}
function card(c) {
  const title = h("h3", {}, "GPU " + c.index + " \\u00b7 " + c.type);
  if (!c.health) title.append(h("span", {class: "badge unhealthy"}, "unhealthy"));
  if (c.cordoned) title.append(h("span", {class: "badge cordoned"}, "cordoned"));
  const el = h("div", {class: "card", "data-uuid": c.uuid}, title, h("div", {class: "uuid"}, c.uuid),
    meter("memory", c.mem_granted_mib, c.mem_total_mib, " MiB", c.mem_used_mib === null ? "" : c.mem_used_mib + " used"),
    meter("cores", c.cores_granted, c.cores_total, " %", c.utilization === null ? "" : "util " + c.utilization + " %"),
    meter("slots", c.slots_used, c.slots_total, "", ""),
    h("div", {class: "free"}, "free: " + c.mem_free_mib + " MiB, " + c.cores_free + " % cores, " + c.slots_free + " slots"));
  if (c.sharers.length) {
    const t = h("table", {}, h("tr", {}, h("th", {}, "pod"), h("th", {}, "namespace"), h("th", {}, "memory"),
      h("th", {}, "cores"), h("th", {}, "used")));
    for (const s of c.sharers) {
      t.append(h("tr", {class: "sharer", "data-pod": s.pod, "data-namespace": s.namespace},
        h("td", {title: s.containers.join(", ")}, s.pod), h("td", {}, s.namespace || "-"),
        h("td", {}, s.mem_mib + " MiB"), h("td", {}, s.cores + " %"), h("td", {}, s.mem_used_mib + " MiB")));
    }
    el.append(t);
  } else el.append(h("p", {class: "empty"}, "not shared: nobody holds a slice"));
  return el;
}
function amount(a, none) {
  const parts = [];
  if (a.mem_mib !== null) parts.push(a.mem_mib + " MiB");
  if (a.cores !== null) parts.push(a.cores + " % cores");
  return parts.length ? parts.join(", ") : none;
}
function renderQueues(qv) {
  const el = document.getElementById("queues");
  el.replaceChildren();
  if (!qv.known) { el.append(h("p", {class: "empty"}, "queues unknown: " + qv.error)); return; }
  if (!qv.rows.length) {
    el.append(h("p", {class: "empty"}, "no queues configured: requests are tried in arrival order"));
    return;
  }
  const t = h("table", {}, h("tr", {}, ...["queue", "guarantee", "limit", "used", "borrowed", "pending",
    "weight"].map((c) => h("th", {}, c))));
  for (const q of qv.rows) {
    const zero = q.guarantee.mem_mib === 0 && q.guarantee.cores === 0;
    const lent = q.borrowed.mem_mib > 0 || q.borrowed.cores > 0;
    t.append(h("tr", {class: "queue", "data-queue": q.name, "data-parent": q.parent, "data-depth": q.depth},
      h("td", {class: "name", style: "padding-left:" + (6 + 16 * q.depth) + "px"}, q.name),
      h("td", {class: "guarantee"}, zero ? "none" : amount(q.guarantee, "none")),
      h("td", {class: "limit"}, amount(q.limit, "none")),
      h("td", {class: "used"}, amount(q.used, "")),
      h("td", {class: "borrowed" + (lent ? " borrowing" : "")}, amount(q.borrowed, "")),
      h("td", {class: "pending"}, q.pending),
      h("td", {class: "weight"}, q.weight)));
  }
  el.append(t);
}
function render(v) {
  renderQueues(v.queues);
  const nodes = document.getElementById("nodes");
  nodes.replaceChildren();
  let cards = 0, slices = 0, free = 0;
  for (const n of v.nodes) {
    const badge = h("span", {class: "badge " + (n.healthy ? "healthy" : "unhealthy")}, n.healthy ? "healthy" : "unhealthy");
    const head = h("h2", {}, n.node, badge);
    if (!n.healthy && n.reason) head.append(h("small", {}, " " + n.reason));
    const grid = h("div", {class: "cards"});
    for (const c of n.cards) { grid.append(card(c)); cards++; slices += c.sharers.length; free += c.mem_free_mib; }
    nodes.append(h("section", {class: "node", "data-node": n.node}, head, grid));
  }
  if (!v.nodes.length) nodes.append(h("p", {class: "empty"}, "no nodes registered"));
  document.getElementById("summary").textContent = v.nodes.length + " nodes, " + cards + " cards, " +
    slices + " slices held, " + free + " MiB free, " + v.pending.length + " pending";
  const pend = document.getElementById("pending");
  pend.replaceChildren();
  if (v.pending.length) {
    const t = h("table", {}, h("tr", {}, h("th", {}, "request"), h("th", {}, "waiting"), h("th", {}, "why")));
    for (const p of v.pending) {
      t.append(h("tr", {class: "pending", "data-name": p.name},
        h("td", {}, (p.namespace ? p.namespace + "/" : "") + p.name), h("td", {}, Math.round(p.waiting_s) + " s"),
        h("td", {}, p.message || Object.entries(p.reasons).map(([r, k]) => k + " " + r).join(", "))));
    }
    pend.append(t);
  } else pend.append(h("p", {class: "empty"}, "none"));
}
let lastSeq = 0;
function addEvent(e) {
  if (e.seq <= lastSeq) return;
  lastSeq = e.seq;
  const list = document.getElementById("events");
  const t = new Date(e.at * 1000).toLocaleTimeString();
  list.prepend(h("li", {class: e.verb, "data-verb": e.verb}, h("time", {}, t), e.text));
  while (list.children.length > 100) list.lastChild.remove();
}
let timer = null;
async function refresh() {
  timer = null;
  try {
    const r = await fetch("/api/fleet", {cache: "no-store"});
    if (r.ok) render(await r.json());
  } catch (err) { document.getElementById("conn").className = "down"; }
}
function soon() { if (timer === null) timer = setTimeout(refresh, 150); }
async function start() {
  const r = await fetch("/api/fleet", {cache: "no-store"});
  const v = await r.json();
  render(v);
  for (const e of v.events) addEvent(e);
  const src = new EventSource("/api/events?after=" + lastSeq);
  const conn = document.getElementById("conn");
  src.onopen = () => { conn.textContent = "live"; conn.className = ""; };
  src.onerror = () => { conn.textContent = "reconnecting"; conn.className = "down"; };
  src.onmessage = (m) => { addEvent(JSON.parse(m.data)); soon(); };
  setInterval(soon, 5000);  // usage from telemetry changes without events
}
start();
</script></body></html>
"""
