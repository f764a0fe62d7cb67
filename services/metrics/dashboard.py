"""A small self-refreshing HTML dashboard of the cluster (no JavaScript framework)."""

from __future__ import annotations

from html import escape

from shared.schemas import ClusterStatus


def _bar(used: int, total: int) -> str:
    pct = 0 if total <= 0 else min(100, round(100 * used / total))
    return (f'<div class="bar"><div style="width:{pct}%"></div></div>'
            f'<span>{used}/{total}</span>')


def render(status: ClusterStatus) -> str:
    rows: list[str] = []
    for n in status.nodes:
        state = "healthy" if n.healthy else "UNHEALTHY"
        rows.append(f'<h2>{escape(n.node)} <small class="{state}">{state}</small></h2>')
        rows.append("<table><tr><th>#</th><th>UUID</th><th>type</th><th>memory MiB</th>"
                    "<th>cores %</th><th>slots</th></tr>")
        for c in n.cards:
            rows.append(
                f"<tr><td>{c.index}</td><td>{escape(c.uuid)}</td><td>{escape(c.type)}</td>"
                f"<td>{_bar(c.used_mem, c.total_mem)}</td><td>{_bar(c.used_cores, c.total_cores)}</td>"
                f"<td>{c.used_slots}/{c.total_slots}</td></tr>")
        rows.append("</table>")
        if n.allocations:
            rows.append("<p>allocations: " + ", ".join(escape(a) for a in n.allocations) + "</p>")
    body = "\n".join(rows) or "<p>no nodes registered</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>HAMi on NATS</title>
<meta http-equiv="refresh" content="5">
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}}
.bar{{display:inline-block;width:120px;height:10px;background:#eee;margin-right:6px}}
.bar div{{height:10px;background:#3a7}}.UNHEALTHY{{color:#c00}}.healthy{{color:#3a7}}</style>
</head><body><h1>GPU slices</h1>{body}
<p><a href="/metrics">/metrics</a> · <a href="/api/status">/api/status</a></p></body></html>"""
