"""The short chaos run: every service kind and NATS killed -9 under load, nothing unsafe.

Runs ``bench/chaos.py`` as a process (its services are processes of their own, so the
kills are real) and checks what it read back from the ledger and inventory buckets
against what its clients were told.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_chaos_keeps_the_ledger_safe(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--duration", "8", "--nodes", "3",
         "--release-timeout", "4", "--settle-max", "45", "--keep-logs", str(logs)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads(out.stdout)
    why = json.dumps({k: r[k] for k in ("misses", "samples", "consumers_after_settle")})
    req = r["requests"]
    # the load did happen, through every kill
    assert req["by_result"].get("ok", 0) > 0, why
    kinds = [x["kind"] for x in r["restarts"]]
    assert kinds == ["inventory", "placement-a", "placement-b", "binder", "metrics",
                     "chaos-node-0", "nats"]
    assert all(x["ready_s"] is not None for x in r["restarts"]), r["restarts"]  # each came back
    assert r["restarts"][-1]["first_ok_s"] is not None  # and the system works after NATS's
    # every client was answered or told it timed out
    assert req["lost"] == 0, why
    assert req["answered"] + req["no_reply"] == req["sent"], why
    # the ledger never holds more than the cards, nor one slice twice
    assert r["over_capacity"] == 0, r["over_capacity_cards"]
    assert r["double_booked"] == 0, why
    # what clients were told they hold is in the ledger
    assert r["held_not_in_ledger"] == 0, why
    # nothing stays allocated that its client was not told it holds: a client that got
    # no answer withdraws by its own uid, as `hami submit` does, and a released request
    # delivered again is refused (its outcome says released)
    assert r["orphaned"] == 0, why
