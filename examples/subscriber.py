#!/usr/bin/env python3
"""Follow hami-bus allocations from outside: who holds which GPU slice, kept current.

A durable JetStream pull consumer of the event stream (``HAMI_EVENTS``, subjects
``hami.evt.alloc.>``; the contract is docs/asyncapi.yaml) that

- resumes where it left off after a restart: the server keeps the consumer's position,
  and every event is acknowledged only after its effect is saved;
- applies each event once, in stream order: after a crash its unacknowledged events
  come again (after ``--ack-wait``), and anything newer handed out before them is
  handed back (nak) until they have; the saved state holds the last stream sequence applied, so an event delivered
  again after it was applied (its acknowledgement lost) is acknowledged and skipped;
- writes a running table of who holds what (``--table FILE``, rewritten after each
  batch, or stdout) and one line per event applied (stdout);
- connects with the read-only ``reader`` identity when the bus has auth on
  (``--nkey reader.nk --tlsca ca.crt``; ``hami creds reader > reader.nk``), plainly
  when it has not.

It needs only nats-py (``pip install nats-py``), not hami-bus: payloads are read as
plain JSON, and fields it does not know are ignored, as the contract asks of every
consumer. A consumer that was away longer than the stream keeps events
(``bus.streamMaxAge``, a week by default) finds the oldest gone: it says so.

    python examples/subscriber.py --nats-url nats://127.0.0.1:4222 --state alloc.json
    python examples/subscriber.py --nkey reader.nk --tlsca ~/.hami/auth/ca.crt --table holders.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import nats
from nats.js import api
from nats.js.errors import APIError, NotFoundError

STREAM = "HAMI_EVENTS"
FILTER = "hami.evt.alloc.>"
READER_INBOX = "_INBOX.reader"  # the reader identity may only receive on its own inboxes


_STAGES = ["pending", "decided", "bound", "prepared"]


@dataclass
class Holding:
    """One allocation as the events tell it."""

    uid: str
    name: str = ""
    namespace: str = ""
    state: str = "pending"  # pending | decided | bound | prepared
    node: str = ""
    cards: list[dict[str, Any]] = field(default_factory=list)  # uuid, mem (MiB), cores (%)
    why: str = ""  # the last failure message while pending


@dataclass
class State:
    """What survives a restart: the table and the last stream sequence applied to it."""

    last_seq: int = 0
    holdings: dict[str, Holding] = field(default_factory=dict)
    journal_bytes: int = 0  # how much of the journal belongs to what was applied

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(
            last_seq=int(raw.get("last_seq", 0)),
            journal_bytes=int(raw.get("journal_bytes", 0)),
            holdings={uid: Holding(**h) for uid, h in raw.get("holdings", {}).items()},
        )

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename): a crash leaves the old state
        or the new one, never half of one."""
        data = {
            "last_seq": self.last_seq,
            "journal_bytes": self.journal_bytes,
            "holdings": {uid: vars(h) for uid, h in sorted(self.holdings.items())},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def apply(self, verb: str, ev: dict[str, Any]) -> str:
        """Fold one allocation event into the table; returns what changed, in words."""
        uid = str(ev.get("uid", ""))
        h = self.holdings.get(uid) or Holding(uid=uid)
        h.name = ev.get("name") or h.name
        h.namespace = ev.get("namespace") or h.namespace
        if verb == "requested":
            h.state = "pending"
        elif verb == "decided":
            h.state, h.node = "decided", ev.get("node", "")
            h.cards = [
                {"uuid": d.get("uuid", ""), "mem": d.get("mem", 0), "cores": d.get("cores", 0)}
                for c in ev.get("containers", [])
                for d in c.get("devices", [])
            ]
            h.why = ""
        elif verb in ("bound", "prepared") and uid in self.holdings:
            # The node agent may prepare before the binder's bound arrives: keep the furthest.
            h.state = max(h.state, verb, key=_STAGES.index)
        elif verb == "failed":
            if not ev.get("pending", True):  # a one-shot request that did not fit: gone
                self.holdings.pop(uid, None)
                return f"failed {h.name}: {ev.get('message') or ev.get('reason', '')}"
            h.why = ev.get("message") or ev.get("reason", "")
        elif verb in ("released", "bind_failed"):
            self.holdings.pop(uid, None)
            return f"{verb} {h.name} ({ev.get('reason') or ev.get('message') or 'released'})"
        else:  # a verb added later, or an event for an allocation we never saw asked for
            return f"{verb} {h.name or uid} (ignored)"
        self.holdings[uid] = h
        where = (
            f" on {h.node} " + " ".join(f"{c['uuid']}:{c['mem']}MiB:{c['cores']}%" for c in h.cards)
            if h.node
            else ""
        )
        return f"{verb} {h.name}{where}"

    def table(self) -> str:
        rows = [("NAME", "NAMESPACE", "STATE", "NODE", "CARDS (uuid:MiB:cores%)")]
        for h in sorted(self.holdings.values(), key=lambda h: (h.namespace, h.name, h.uid)):
            cards = (
                " ".join(f"{c['uuid']}:{c['mem']}:{c['cores']}" for c in h.cards) or h.why or "-"
            )
            rows.append((h.name or h.uid, h.namespace or "-", h.state, h.node or "-", cards))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            for r in rows
        ]
        return "\n".join(lines) + f"\n# through stream sequence {self.last_seq}\n"


def open_journal(path: str, saved: int) -> BinaryIO:
    """The journal, cut back to what the saved state covers: lines past it were written
    by a run that crashed before saving, and those events come again."""
    journal = open(path, "ab")  # noqa: SIM115 - kept open for the whole run
    if journal.tell() > saved:
        journal.truncate(saved)
        journal.seek(saved)
    return journal


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": f"hami-subscriber-{args.durable}"}
    if args.nkey:
        opts["nkeys_seed"] = args.nkey
        opts["inbox_prefix"] = args.inbox_prefix or READER_INBOX
    elif args.inbox_prefix:
        opts["inbox_prefix"] = args.inbox_prefix
    if args.tlsca:
        opts["tls"] = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tlsca)
    return opts


async def run(args: argparse.Namespace) -> int:
    state_path = Path(args.state)
    state = State.load(state_path)
    journal = open_journal(args.journal, state.journal_bytes) if args.journal else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        # The server refusing this identity something (a consumer that is not its to
        # take, a subject outside its permissions) will not mend by waiting: stop.
        if "permissions violation" in str(exc).lower():
            refused.append(f"refused by the server: {exc}")
            stop.set()
        else:
            print(f"# nats: {exc}", file=sys.stderr)

    nc = await nats.connect(
        args.nats_url,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        **connect_options(args),
    )
    js = nc.jetstream()
    cfg = api.ConsumerConfig(
        name=args.durable,
        durable_name=args.durable,
        filter_subject=args.filter,
        deliver_policy=api.DeliverPolicy.ALL,  # a new consumer starts at the oldest event kept
        ack_policy=api.AckPolicy.EXPLICIT,
        # At most one batch unacknowledged: what a crashed run took comes again after
        # ack_wait, and the loop below hands back anything newer until it has, so
        # "applied through sequence N" is all the state needs.
        ack_wait=args.ack_wait,
        max_ack_pending=args.batch,
        inactive_threshold=args.forget_after or None,
    )
    try:
        info = await js.consumer_info(STREAM, args.durable)
        print(
            f"# resuming consumer {args.durable}: {info.num_pending} waiting, "
            f"{info.num_ack_pending} unacknowledged",
            file=sys.stderr,
        )
    except NotFoundError:
        info = await js.add_consumer(STREAM, cfg)
        print(f"# created consumer {args.durable} on {STREAM} ({args.filter})", file=sys.stderr)
    sub = await js.pull_subscribe_bind(args.durable, stream=STREAM)
    # What a crashed run took and never acknowledged comes again after ack_wait; had it
    # held fewer than a batch, newer events could be handed out first. Until those come
    # back, newer ones are handed back (nak) to come after them, so order holds.
    held_upto = info.delivered.stream_seq if info.num_ack_pending else 0
    held = info.num_ack_pending
    first = (await js.stream_info(STREAM)).state.first_seq
    if state.last_seq and first > state.last_seq + 1:
        print(
            f"# warning: the stream now starts at sequence {first}: events after "
            f"{state.last_seq} may have aged out (bus.streamMaxAge / streamMaxBytes)",
            file=sys.stderr,
        )
    print(f"# ready, through stream sequence {state.last_seq}", file=sys.stderr, flush=True)

    def write_table() -> None:
        if args.table:
            tmp = Path(args.table).with_suffix(".tmp")
            tmp.write_text(state.table())
            tmp.replace(args.table)
        elif not args.quiet:
            sys.stdout.write(state.table())

    write_table()
    while not stop.is_set():
        try:
            msgs = await sub.fetch(args.batch, timeout=1.0)
        except TimeoutError:  # nothing waiting (nats-py raises its own and asyncio's)
            if args.exit_when_idle:
                break
            continue
        except NotFoundError:
            refused.append(f"consumer {args.durable} is gone (deleted by an operator?)")
            break
        except APIError as exc:
            # A pull the server turned down for now (409: e.g. the batch a crashed run
            # took is still unacknowledged): ask again shortly.
            print(f"# pull refused for now: {exc.description or exc}", file=sys.stderr)
            await asyncio.sleep(0.5)
            continue
        except asyncio.CancelledError:
            break
        applied = []
        later: list[Any] = []  # handed back: newer than what a crashed run still holds
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if held and seq <= held_upto:
                held -= 1
            elif held or later:
                later.append(msg)
                continue
            if seq <= state.last_seq:
                continue  # applied before a crash took its acknowledgement: only ack it
            try:
                ev = json.loads(msg.data)
            except ValueError:
                ev = {}
            verb = msg.subject.split(".")[3] if msg.subject.count(".") >= 3 else ""
            what = state.apply(verb, ev if isinstance(ev, dict) else {})
            state.last_seq = seq
            applied.append(f"seq={seq} {what}")
        if applied:
            if journal is not None:
                journal.write("".join(f"{line}\n" for line in applied).encode())
                journal.flush()
                os.fsync(journal.fileno())
                state.journal_bytes = journal.tell()
            state.save(state_path)  # the effect is safe before anything is acknowledged
            for line in applied:
                print(line, flush=True)
        for msg in msgs:
            if later and msg is later[0]:
                break
            await msg.ack()
        for msg in later:
            await msg.nak(delay=0.2)
        if applied:
            write_table()
        if args.exit_when_idle and not msgs:
            break
    # Flush, so the server has every acknowledgement sent, then close (a drain would
    # wait on the pull subscription's open request).
    with contextlib.suppress(Exception):
        await nc.flush(timeout=5)
    await nc.close()
    if journal is not None:
        journal.close()
    if refused:
        print(f"subscriber: {refused[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument(
        "--durable",
        default="alloc-table",
        help="the consumer's name: one per subscriber, kept by the server",
    )
    p.add_argument("--filter", default=FILTER, help="subjects to follow (default: %(default)s)")
    p.add_argument(
        "--state",
        default="alloc-table.json",
        help="where the table and the last sequence applied are saved",
    )
    p.add_argument("--table", default="", help="rewrite this file with the table after each batch")
    p.add_argument(
        "--journal",
        default="",
        help="append one line per event applied, each exactly once across restarts",
    )
    p.add_argument(
        "--nkey",
        default=os.environ.get("NATS_NKEY", ""),
        help="nkey seed file (the bus's reader identity, when auth is on)",
    )
    p.add_argument(
        "--tlsca", default=os.environ.get("NATS_CA", ""), help="the bus's CA certificate"
    )
    p.add_argument("--inbox-prefix", default="", help=f"default with --nkey: {READER_INBOX}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--ack-wait",
        type=float,
        default=10.0,
        help="seconds before an unacknowledged event is delivered again (after a crash)",
    )
    p.add_argument(
        "--forget-after",
        type=float,
        default=0.0,
        help="seconds unused after which the server drops the consumer (0: never)",
    )
    p.add_argument("--quiet", action="store_true", help="no table on stdout (event lines only)")
    p.add_argument("--exit-when-idle", action="store_true", help="stop when nothing is waiting")
    args = p.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, like every hami command
        print(f"subscriber: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
