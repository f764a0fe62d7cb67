"""The bus layer every service talks through: NATS core, JetStream and KV.

One :class:`Bus` per process. It connects with reconnection, creates the event stream
and the KV buckets idempotently (any replica may start first), publishes events with a
``Nats-Msg-Id`` so a retried publish is stored once, and carries the W3C trace context
in message headers. Encoders and decoders are built once and reused.

With :class:`~shared.auth.Credentials` it authenticates with its role's nkey (and TLS),
sets up only the stream and buckets its role may create, and when one of them has
disappeared (deleted by an operator) it creates it again on the next write that finds
it missing, and says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared import auth, logs, subjects, tracing
from shared.config import BusSettings
from shared.schemas import AllocEvent, NodeEvent

log = logging.getLogger("hami.bus")

T = TypeVar("T")

ENCODER = msgspec.json.Encoder()
EVENT_DECODER: msgspec.json.Decoder[AllocEvent | NodeEvent] = msgspec.json.Decoder(
    AllocEvent | NodeEvent
)

# How long the stream remembers message ids for deduplication.
DUPLICATE_WINDOW_S = 120.0
# The durable event stream's retention comes from ``bus.streamMaxAge`` /
# ``bus.streamMaxBytes`` (a week, 1 GiB by default), for replay by outside systems.
# The dead-letter stream keeps as long, but in a small, fixed space: a dead letter is
# for an operator to look at, and a flood of them must not fill the disk.
DLQ_MAX_BYTES = 64 << 20
DLQ_MAX_MSGS = 100_000
# A consumer's own redelivery bound, past the services' ``bus.maxDeliveries`` (after
# which a service dead-letters the message itself): a backstop, should a handler never
# get to say so (it crashed each time before acknowledging anything).
MAX_DELIVER_MARGIN = 2
# How often a work queue looks that its durable consumer still exists.
CONSUMER_CHECK_S = 5.0
# How long a closing connection waits for its subscriptions to drain (nats-py: 30 s). A
# subscription whose reader stopped first never drains; a stopping service or CLI
# then waited 30 s per connection (``hami demo`` ran past a minute under load).
DRAIN_S = 3

KV_BUCKETS = (
    subjects.NODES_BUCKET,
    subjects.LEDGER_BUCKET,
    subjects.HEALTH_BUCKET,
    subjects.QUOTA_BUCKET,
    subjects.QUEUES_BUCKET,
)

Conflict = KeyWrongLastSequenceError
NotFound = KeyNotFoundError


class BadMessage(ValueError):
    """A message that cannot be decoded into the schema expected on its subject."""


def decode(data: bytes, typ: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadMessage(f"cannot decode {typ.__name__}: {exc}") from exc


def decode_entry(
    data: bytes, typ: type[T], key: str, check: Callable[[T, str], list[str]]
) -> tuple[T, str] | tuple[None, str]:
    """A stored KV entry, decoded and checked against its key: ``(entry, "")``, or
    ``(None, why)`` when it is garbage (undecodable, or ``check`` found problems)."""
    try:
        entry = decode(data, typ)
    except BadMessage as exc:
        return None, str(exc)
    problems = check(entry, key)
    return (None, "; ".join(problems)) if problems else (entry, "")


def decode_event(data: bytes) -> AllocEvent | NodeEvent:
    try:
        return EVENT_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadMessage(f"cannot decode event: {exc}") from exc


@dataclass
class WatchState:
    """One KV watch of :meth:`Bus.watch_kv`, for readiness (``shared.health``)."""

    name: str  # bucket, or bucket/key
    caught_up: bool = False  # the entries present when it began have been handled
    ended: bool = False  # the watch stopped on its own (not by a cancelled task)


class Bus:
    def __init__(self, nc: NATS, name: str, settings: BusSettings | None = None) -> None:
        self.nc = nc
        # Retention and redelivery bounds (the configuration's ``bus`` section).
        self.settings = settings or BusSettings()
        self.js: JetStreamContext = nc.jetstream(timeout=10.0)
        self.name = name
        self.closing = False
        # Its publish and receive spans are the service's (``hami-<name>``).
        self.tracer = tracing.tracer(f"hami.{name}")
        # Copies of the stream and buckets kept by a NATS cluster (1 on one server);
        # a clustered deployment sets HAMI_NATS_REPLICAS=3 so losing a server loses nothing.
        self.replicas = max(1, int(os.environ.get("HAMI_NATS_REPLICAS", "1") or 1))
        self._kv: dict[str, KeyValue] = {}
        self._writes = _Writes(nc)
        self._watches: list[WatchState] = []
        self._watchers: list[Any] = []  # the nats-py KeyWatchers behind them, to revive
        self._revivals: set[asyncio.Task[None]] = set()
        # Streams this client may create and update (None: all, an unauthenticated bus).
        self.creates: frozenset[str] | None = None
        self.updates: frozenset[str] | None = None

    def may_create(self, stream: str) -> bool:
        return self.creates is None or stream in self.creates

    def may_update(self, stream: str) -> bool:
        return self.updates is None or stream in self.updates

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        setup: bool = True,
        once: float | None = None,
        creds: auth.Credentials | None = None,
        settings: BusSettings | None = None,
    ) -> Bus:
        """Connect, reconnecting forever after a loss (services outlive a NATS restart).

        ``once``: a one-shot client (the CLI) instead makes a single attempt bounded by
        that many seconds, never reconnects, and gets the attempt's own error (e.g.
        ``ConnectionRefusedError``, ``TimeoutError``) rather than a retry loop.

        ``creds``: authenticate as that role (nkey; TLS when it names a CA) with its
        own inbox prefix, and set up only what the role may create.

        ``settings``: the configuration's ``bus`` section (stream retention, redelivery
        bound); the defaults otherwise.
        """
        extra = connect_options(creds)
        failures: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            if once is not None:
                failures.append(exc)  # the caller reports it; a log line would repeat it
                return
            log.warning("%s: nats error: %s", name, exc)

        async def on_disconnect() -> None:
            if not bus.closing:
                log.warning("%s: disconnected from nats", name)

        async def on_reconnect() -> None:
            log.info("%s: reconnected to nats", name)
            bus.revive_watches()

        bus: Bus
        if once is None:
            nc = await nats.connect(
                url,
                name=f"hami-{name}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                drain_timeout=DRAIN_S,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **extra,
            )
        else:
            try:
                # nats-py tries a server up to max_reconnect_attempts + 1 times even
                # with allow_reconnect off; the outer timeout bounds the whole attempt.
                async with asyncio.timeout(once):
                    nc = await nats.connect(
                        url,
                        name=f"hami-{name}",
                        allow_reconnect=False,
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0,
                        connect_timeout=once,
                        drain_timeout=DRAIN_S,
                        error_cb=on_error,
                        **extra,
                    )
            except Exception as exc:
                raise (failures[0] if failures else exc) from None
        bus = cls(nc, name, settings)
        if creds is not None:
            perms = auth.permissions(creds.role)
            bus.creates, bus.updates = perms.creates, perms.updates
        if setup:
            await bus.setup()
        return bus

    async def setup(self) -> None:
        """Create the event and dead-letter streams and the KV buckets; safe to call
        from every replica. An existing stream's retention is brought to the settings'."""
        if self.may_create(subjects.EVENTS_STREAM):
            await self._setup_events()
        if self.may_create(subjects.DLQ_STREAM):
            await self._setup_dlq()
        for bucket in KV_BUCKETS:
            if self.may_create(auth.kv_stream(bucket)):
                await self.kv(bucket)

    async def _setup_events(self) -> None:
        cfg = api.StreamConfig(
            name=subjects.EVENTS_STREAM,
            num_replicas=self.replicas,
            subjects=list(subjects.EVENTS_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=float(self.settings.stream_max_age),
            max_bytes=int(self.settings.stream_max_bytes),
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        await self._add_or_update(cfg)

    async def _setup_dlq(self) -> None:
        cfg = api.StreamConfig(
            name=subjects.DLQ_STREAM,
            num_replicas=self.replicas,
            subjects=list(subjects.DLQ_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=float(self.settings.stream_max_age),
            max_bytes=min(DLQ_MAX_BYTES, int(self.settings.stream_max_bytes)),
            max_msgs=DLQ_MAX_MSGS,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        await self._add_or_update(cfg)

    async def _add_or_update(self, cfg: api.StreamConfig) -> None:
        name = cfg.name or ""
        try:
            await self.js.add_stream(cfg)
        except BadRequestError:
            # Exists with another configuration (an older release, other retention
            # settings): bring it up to date, where this role owns it (the others use
            # it as it is).
            if self.may_update(name):
                await self.js.update_stream(cfg)

    async def kv(self, bucket: str) -> KeyValue:
        kv = self._kv.get(bucket)
        if kv is None:
            # history=1: the ledger needs only the latest value and its revision.
            # direct: a get is answered by a direct get (raw bytes and headers) rather
            # than the JSON API (base64 in JSON), a third of the cost of the agents'
            # ledger re-reads.
            try:
                kv = await self.js.create_key_value(
                    bucket=bucket, history=1, replicas=self.replicas, direct=True
                )
            except BadRequestError:
                if not self.may_update(auth.kv_stream(bucket)):
                    kv = await self.js.key_value(bucket)  # its owner brings it up to date
                    self._kv[bucket] = kv
                    return kv
                # Made by an older release without direct gets: switch them on.
                si = await self.js.stream_info(f"KV_{bucket}")
                si.config.allow_direct = True
                await self.js.update_stream(si.config)
                kv = await self.js.key_value(bucket)
            self._kv[bucket] = kv
        return kv

    # ---------------------------------------------------------------- publishing

    def headers(self, msg_id: str | None = None) -> dict[str, str]:
        hdrs: dict[str, str] = {}
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        return tracing.inject(hdrs)

    async def publish_event(
        self, subject: str, msg: msgspec.Struct, msg_id: str
    ) -> api.PubAck:
        """Store an event in the durable stream; the same ``msg_id`` is stored once."""
        with tracing.publish(self.tracer, subject, msg_id):
            data, hdrs = ENCODER.encode(msg), self.headers(msg_id)
            try:
                return await self.js.publish(subject, data, headers=hdrs)
            except nats.js.errors.NoStreamResponseError:
                await self.recreate(subjects.EVENTS_STREAM)
                return await self.js.publish(subject, data, headers=hdrs)

    async def publish_event_nowait(
        self, subject: str, msg: msgspec.Struct, msg_id: str
    ) -> asyncio.Future[int]:
        """Like :meth:`publish_event`, but returns the stored sequence as a future.

        Lets a batch of events go out back to back; await the futures before
        acknowledging the work that produced them.
        """
        # The span covers the send, not the stream's answer (awaited later, batched).
        with tracing.publish(self.tracer, subject, msg_id):
            data, hdrs = ENCODER.encode(msg), self.headers(msg_id)
            sent = await self._writes.send(subject, data, hdrs)

        async def stored() -> int:
            try:
                return await sent
            except nats.js.errors.NoStreamResponseError:
                await self.recreate(subjects.EVENTS_STREAM)
                return await (await self._writes.send(subject, data, hdrs))

        return asyncio.ensure_future(stored())

    async def recreate(self, stream: str) -> None:
        """Create again a stream or bucket a write found missing (an operator deleted
        it); without the right to create it, the write's error stands."""
        if not self.may_create(stream):
            raise nats.js.errors.NoStreamResponseError
        log.warning("%s: stream %s was missing; creating it again", self.name, stream)
        if stream == subjects.EVENTS_STREAM:
            await self._setup_events()
        elif stream == subjects.DLQ_STREAM:
            await self._setup_dlq()
        elif stream.startswith("KV_"):
            self._kv.pop(stream[3:], None)
            await self.kv(stream[3:])

    async def dead_letter(self, service: str, msg: Msg, error: str) -> None:
        """Store ``msg`` as it came on ``service``'s dead-letter subject, with headers
        naming the error, its subject and how often it was delivered.

        Stored once per original message (its stream sequence is the message id).
        Raises when it cannot be stored: the caller then lets the message be
        redelivered rather than lose it.
        """
        meta = msg.metadata
        seq = str(meta.sequence.stream) if meta.sequence else ""
        hdrs = {
            **{k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"},
            subjects.DLQ_ERROR: error[:1024].replace("\r", " ").replace("\n", " "),
            subjects.DLQ_SUBJECT: msg.subject,
            subjects.DLQ_DELIVERIES: str(meta.num_delivered or 0),
            subjects.DLQ_STREAM_SEQ: seq,
            "Nats-Msg-Id": f"dlq:{service}:{meta.stream or ''}:{seq or msg.subject}",
        }
        subject = subjects.dlq(service)
        try:
            await self.js.publish(subject, msg.data, headers=hdrs)
        except nats.js.errors.NoStreamResponseError:
            await self.recreate(subjects.DLQ_STREAM)
            await self.js.publish(subject, msg.data, headers=hdrs)

    async def publish(self, subject: str, msg: msgspec.Struct) -> None:
        """Core NATS, not stored (heartbeats, telemetry)."""
        with tracing.publish(self.tracer, subject, root=False):
            await self.nc.publish(subject, ENCODER.encode(msg), headers=self.headers())

    async def request(
        self, subject: str, msg: msgspec.Struct, reply: type[T], timeout: float = 10.0
    ) -> T:
        with tracing.publish(self.tracer, subject):
            resp = await self.nc.request(
                subject, ENCODER.encode(msg), timeout=timeout, headers=self.headers()
            )
        return decode(resp.data, reply)

    # ------------------------------------------------------------------- KV helpers

    async def kv_get(self, bucket: str, key: str, typ: type[T]) -> tuple[T | None, int]:
        """The value under ``key`` and its revision; (None, 0) when absent or deleted."""
        raw, rev = await self.kv_get_raw(bucket, key)
        return (decode(raw, typ) if raw is not None else None), rev

    async def kv_get_raw(self, bucket: str, key: str) -> tuple[bytes | None, int]:
        """Like :meth:`kv_get`, undecoded: a caller holding the revision already can
        skip the decoding."""
        kv = await self.kv(bucket)
        try:
            entry = await kv.get(subjects.kv_key(key))
        except KeyNotFoundError:
            return None, 0
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None, entry.revision or 0
        return entry.value, entry.revision or 0

    async def kv_put(self, bucket: str, key: str, value: msgspec.Struct) -> int:
        kv = await self.kv(bucket)
        try:
            return await kv.put(subjects.kv_key(key), ENCODER.encode(value))
        except nats.js.errors.NoStreamResponseError:
            await self.recreate(auth.kv_stream(bucket))
            kv = await self.kv(bucket)
            return await kv.put(subjects.kv_key(key), ENCODER.encode(value))

    async def kv_cas(self, bucket: str, key: str, value: msgspec.Struct, last: int) -> int:
        """Write only if the key is still at revision ``last`` (0: only if absent).

        Raises :data:`Conflict` when another writer got there first.
        """
        kv = await self.kv(bucket)
        data = ENCODER.encode(value)
        k = subjects.kv_key(key)
        if last == 0:
            try:
                return await kv.create(k, data)
            except KeyWrongLastSequenceError:
                raise
            except BadRequestError as exc:
                raise Conflict(description=str(exc)) from exc
        return await kv.update(k, data, last=last)

    async def kv_cas_nowait(
        self, bucket: str, key: str, value: msgspec.Struct, last: int
    ) -> asyncio.Future[int]:
        """Like :meth:`kv_cas`, but returns once the write is sent: await the result
        for the new revision (or :data:`Conflict`).

        Several writes (and whatever else is published before the next await) leave in
        one socket write, and the answers come back through the one reply
        subscription of asynchronous publishes instead of a request each.
        """
        if last == 0:  # a create (a tombstone may be in the way): the ordinary path
            return asyncio.ensure_future(self.kv_cas(bucket, key, value, last))
        await self.kv(bucket)  # the bucket exists (created once per process)
        return await self._writes.send(
            f"$KV.{bucket}.{subjects.kv_key(key)}",
            ENCODER.encode(value),
            {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)},
        )

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self.kv(bucket)
        await kv.delete(subjects.kv_key(key))

    async def watch_kv(
        self,
        bucket: str,
        handler: Callable[[str, bytes | None, int], Awaitable[None]],
        ready: asyncio.Event | None = None,
        key: str | None = None,
    ) -> asyncio.Task[None]:
        """Call ``handler(key, value_or_None, revision)`` for every entry, then follow.

        ``key`` narrows the watch to one key; ``ready`` is set once the existing
        entries have been delivered.
        """
        kv = await self.kv(bucket)
        watcher = await (kv.watch(subjects.kv_key(key)) if key else kv.watchall())
        failures = logs.RateLimited(log)
        state = WatchState(f"{bucket}/{key}" if key else bucket)
        self._watches.append(state)
        self._watchers.append(watcher)

        async def run() -> None:
            try:
                async for entry in watcher:
                    if entry is None:  # end of the initial values
                        state.caught_up = True
                        if ready is not None:
                            ready.set()
                        continue
                    deleted = entry.operation in ("DEL", "PURGE")
                    try:
                        await handler(entry.key, None if deleted else entry.value, entry.revision or 0)
                    except Exception as exc:
                        # The watch goes on with the next entry; a handler that fails on
                        # every update of a key is logged once a minute, with a count.
                        failures.error(
                            f"{entry.key}:{type(exc).__name__}", "%s: handler failed on %s/%s: %s: %s",
                            self.name, bucket, entry.key, type(exc).__name__, exc,
                        )
            except asyncio.CancelledError:
                # Stopped by its owner: no longer one of the service's watches.
                if state in self._watches:
                    self._watches.remove(state)
                raise
            finally:
                state.ended = True
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
                try:
                    await watcher.stop()  # type: ignore[no-untyped-call]
                except Exception:  # the connection is already closed: nothing to stop
                    pass

        return asyncio.create_task(run(), name=f"watch-{bucket}")

    def revive_watches(self) -> None:
        """After a reconnect, restart every KV watch's consumer from where it was.

        A restarted server has lost the watches' ephemeral consumers; nats-py notices
        only after two missed heartbeats (10 s), and meanwhile a watch sees nothing: a
        release was answered "not yet freed" because the binder's ledger view stood
        still. The Go client recreates them on reconnect; so do we.
        """
        if self._watchers:
            task = asyncio.get_running_loop().create_task(self._revive(list(self._watchers)))
            self._revivals.add(task)
            task.add_done_callback(self._revivals.discard)

    async def _revive(self, watchers: list[Any]) -> None:
        # JetStream answers a moment after the connection is back (it restores its
        # streams first); a consumer asked for before that is not made.
        for _ in range(40):
            try:
                await self.js.account_info()
                break
            except Exception:
                await asyncio.sleep(0.25)
        for w in watchers:
            # nats-py's own private reset, the one its missed-heartbeat check calls.
            # (KeyWatcher._sub is the JetStream push subscription; its _sub the core one.)
            jsi = getattr(getattr(getattr(w, "_sub", None), "_sub", None), "_jsi", None)
            if jsi is None or not getattr(jsi, "_ordered", False) or self.nc.is_closed:
                continue
            try:
                await jsi.reset_ordered_consumer(jsi._sseq + 1)
            except Exception as exc:  # its heartbeat check still resets it later
                log.warning("%s: cannot restart a KV watch after the reconnect: %s", self.name, exc)

    def watch_states(self) -> list[WatchState]:
        """The KV watches running or ended on their own (a stopped one is forgotten)."""
        return list(self._watches)

    # ---------------------------------------------------------------- subscribing

    async def work_queue(
        self,
        durable: str,
        filter_subjects: list[str],
        *,
        ack_wait: float = 30.0,
        max_ack_pending: int = 20000,
        max_deliver: int | None = None,
    ) -> WorkQueue:
        """A durable consumer of the event stream shared by every replica of a service.

        Push delivery to a queue group: each message goes to one replica, with no
        pull round trip between messages (what a pull fetch costs shows in latency).
        Messages are acknowledged by the caller once handled; unacknowledged ones are
        redelivered after ``ack_wait``, at most ``max_deliver`` times in all (default:
        ``bus.maxDeliveries`` plus a margin, a backstop to the services' own
        dead-lettering). An existing consumer with another bound is updated to it.
        """
        if max_deliver is None:
            max_deliver = self.settings.max_deliveries + MAX_DELIVER_MARGIN
        cfg = api.ConsumerConfig(
            durable_name=durable,
            filter_subjects=filter_subjects,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.NEW,
            deliver_subject=f"_HAMI.deliver.{durable}",
            deliver_group=durable,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=max_deliver,
        )
        try:
            info = await self.js.consumer_info(subjects.EVENTS_STREAM, durable)
            cfg = info.config
            if cfg.max_deliver != max_deliver:
                # Made by an older release (unbounded) or under other settings.
                try:
                    cfg = cfg.evolve(max_deliver=max_deliver)
                    await self.js.add_consumer(subjects.EVENTS_STREAM, cfg)
                except Exception as exc:
                    log.warning("%s: cannot set max_deliver of consumer %s: %s", self.name, durable, exc)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_consumer(subjects.EVENTS_STREAM, cfg)
            except BadRequestError:  # another replica created it first
                cfg = (await self.js.consumer_info(subjects.EVENTS_STREAM, durable)).config
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def cb(msg: Msg) -> None:
            queue.put_nowait(msg)

        sub = await self.js.subscribe_bind(
            subjects.EVENTS_STREAM, cfg, durable, cb=cb, manual_ack=True
        )
        wq = WorkQueue(sub, queue)
        wq.keeper = asyncio.create_task(self._keep_consumer(cfg), name=f"keep-{durable}")
        return wq

    async def _keep_consumer(self, cfg: api.ConsumerConfig) -> None:
        """Bring a work queue's consumer back when it disappears with its stream (an
        operator deleted the stream): every replica would otherwise wait forever.

        The stream is created again first where this role may; the consumer then
        starts from the new stream's first message, so nothing published into it in
        the meantime is missed. The queue group's subscription never went away.
        """
        durable = cfg.durable_name or ""
        while True:
            await asyncio.sleep(CONSUMER_CHECK_S)
            if self.nc.is_closed:
                return
            if not self.nc.is_connected:
                continue
            try:
                await self.js.consumer_info(subjects.EVENTS_STREAM, durable)
                continue
            except nats.js.errors.NotFoundError:
                pass
            except Exception as exc:  # a slow or lost server: look again next time
                log.debug("%s: checking consumer %s: %s", self.name, durable, exc)
                continue
            try:
                try:
                    await self.js.stream_info(subjects.EVENTS_STREAM)
                except nats.js.errors.NotFoundError:
                    await self.recreate(subjects.EVENTS_STREAM)
                log.warning("%s: consumer %s was missing; creating it again", self.name, durable)
                again = cfg.evolve(deliver_policy=api.DeliverPolicy.ALL, opt_start_seq=None)
                await self.js.add_consumer(subjects.EVENTS_STREAM, again)
            except BadRequestError:
                pass  # another replica made it first
            except Exception as exc:
                log.warning("%s: cannot create consumer %s again: %s", self.name, durable, exc)

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], queue: str = ""
    ) -> Any:
        async def cb(msg: Msg) -> None:
            try:
                with tracing.receive(self.tracer, msg.subject, msg.headers, root=False):
                    await handler(msg)
            except Exception:
                log.exception("%s: handler failed on %s", self.name, msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=cb)

    async def close(self) -> None:
        self.closing = True
        if not self.nc.is_closed:
            try:
                # Draining delivers the answers already received before it closes.
                await self.nc.drain()
            except Exception:  # already closing or the server is gone
                # nats-py's close can itself fail on a TLS transport the server already
                # dropped (AttributeError deep in asyncio's sslproto): closed either way.
                with contextlib.suppress(Exception):
                    await self.nc.close()
        self._writes.close()


def connect_options(creds: auth.Credentials | None) -> dict[str, Any]:
    """nats-py's ``connect`` options for ``creds``: the nkey, the inbox prefix, TLS."""
    if creds is None:
        return {}
    out: dict[str, Any] = {"inbox_prefix": creds.inbox_prefix}
    if creds.seed_file:
        out["nkeys_seed"] = creds.seed_file
    else:
        out["nkeys_seed_str"] = creds.seed.strip()
    if creds.tls_ca:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.tls_ca)
        if creds.tls_cert:
            ctx.load_cert_chain(creds.tls_cert, creds.tls_key or None)
        out["tls"] = ctx
        _quiet_ssl_eof()
    return out


def _ssl_eof_noise(record: logging.LogRecord) -> bool:
    # asyncio warns each time nats-py's protocol keeps a TLS connection half-open at
    # its close; harmless, and it would be a second line under every CLI message.
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def _quiet_ssl_eof() -> None:
    lg = logging.getLogger("asyncio")
    if _ssl_eof_noise not in lg.filters:
        lg.addFilter(_ssl_eof_noise)


class _PubError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: _PubError | None = None


_PUB_ACK = msgspec.json.Decoder(_PubAck)
# The stream's answers to conditional writes whose expected last sequence did not hold.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class _Writes:
    """JetStream writes whose acknowledgements are awaited later, as futures.

    One wildcard inbox subscription receives every acknowledgement (nats-py's own
    ``publish_async`` leaves the future pending forever when the stream answers an
    error, because its reply handler raises instead of failing the future). An
    acknowledgement that never comes (a lost connection) fails its future after
    ``timeout`` seconds, so no caller waits forever.
    """

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self.prefix = ""
        self.pending: dict[str, tuple[asyncio.Future[int], float]] = {}
        self._next = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.closed = False

    async def send(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[int]:
        if self.closed:
            raise nats.errors.ConnectionClosedError
        if not self.prefix:
            # Set before the await: a concurrent first send reuses it, not a second inbox.
            self.prefix = f"{self.nc.new_inbox()}."
            try:
                await self.nc.subscribe(f"{self.prefix}*", cb=self._on_reply)
            except BaseException:
                self.prefix = ""  # the next send tries again
                raise
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self.pending[token] = (fut, loop.time() + self.timeout)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="bus-write-timeouts")
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
        except BaseException:
            self.pending.pop(token, None)
            raise
        return fut

    async def _on_reply(self, msg: Msg) -> None:
        entry = self.pending.pop(msg.subject[len(self.prefix):], None)
        if entry is None or entry[0].done():
            return
        fut = entry[0]
        if msg.headers and msg.headers.get("Status") == "503":
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _PUB_ACK.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            fut.set_exception(BadMessage(f"cannot decode a stream acknowledgement: {exc}"))
            return
        err = ack.error
        if err is None:
            fut.set_result(ack.seq)
        elif err.err_code in _WRONG_LAST_SEQUENCE:
            fut.set_exception(Conflict(description=err.description))
        else:
            fut.set_exception(
                nats.js.errors.APIError(code=err.code, err_code=err.err_code, description=err.description)
            )

    def close(self) -> None:
        """Stop the timeouts; a write still unanswered fails now (the connection goes)."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(nats.errors.ConnectionClosedError())
        self.pending.clear()

    async def _sweep(self) -> None:
        """Fail the futures whose acknowledgement is overdue (oldest first)."""
        loop = asyncio.get_running_loop()
        while self.pending:
            await asyncio.sleep(1.0)
            now = loop.time()
            for token, (fut, deadline) in list(self.pending.items()):
                if deadline > now:
                    break  # insertion order is deadline order
                del self.pending[token]
                if not fut.done():
                    fut.set_exception(TimeoutError(f"no acknowledgement in {self.timeout:g} s"))


class WorkQueue:
    """Messages of a :meth:`Bus.work_queue` consumer, taken in batches."""

    def __init__(self, sub: Any, queue: asyncio.Queue[Msg]) -> None:
        self.sub = sub
        self.queue = queue
        self.keeper: asyncio.Task[None] | None = None

    async def batch(self, max_n: int) -> list[Msg]:
        """Wait for one message, then take what else is already there (up to max_n)."""
        msgs = [await self.queue.get()]
        while len(msgs) < max_n and not self.queue.empty():
            msgs.append(self.queue.get_nowait())
        return msgs

    async def close(self) -> None:
        if self.keeper is not None:
            self.keeper.cancel()
        try:
            await self.sub.unsubscribe()
        except Exception:  # the connection is already closed
            pass


Endpoint = Callable[[bytes], Awaitable[msgspec.Struct]]

# How long a stopping service waits for the requests it cancelled to answer.
API_STOP_S = 5.0


class ApiService:
    """A running :func:`add_service`: its ``nats.micro`` service and its requests in flight."""

    def __init__(self, svc: Any, name: str) -> None:
        self.svc = svc
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Take no new requests, then cancel those in flight and wait for their answers
        (a cancelled handler answers "stopping", so no client waits out its timeout)."""
        with contextlib.suppress(Exception):  # the connection is already closed
            await self.svc.stop()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=API_STOP_S)
            if stuck:
                log.warning("%s: %d requests did not stop within %gs", self.name, len(stuck), API_STOP_S)


async def add_service(
    bus: Bus,
    name: str,
    endpoints: dict[str, Endpoint],
    version: str = "0.1.0",
    concurrency: int = 256,
) -> ApiService:
    """Expose request/reply endpoints as a ``nats.micro`` service (``$SRV.PING/INFO/STATS``).

    Each request is served in a task of its own (``nats.micro`` calls a subscription's
    handler one request at a time, so one long wait would hold back every request
    after it), at most ``concurrency`` at once *per endpoint*: a flood of submits
    waiting for capacity never locks out the releases that would free it. When an
    endpoint is full the request is answered at once with an
    :class:`~shared.schemas.ErrorReply` ``busy`` (``detail: {"busy": true}``) rather
    than queued: a queued request might be served after its client gave up, and
    nothing has been done for a refused one, so the client may ask again.

    A handler that raises :class:`BadMessage` or ``ValueError`` answers an
    :class:`~shared.schemas.ErrorReply` naming the problem; nothing is lost or half-done.
    At :meth:`ApiService.stop` the requests in flight are cancelled and answered
    ``stopping``.
    """
    from nats import micro

    from shared.schemas import ErrorReply

    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    svc = await micro.add_service(bus.nc, name=name, version=version, queue_group=name)
    api = ApiService(svc, name)

    async def answer(req: Any, reply: msgspec.Struct) -> None:
        try:
            await req.respond(ENCODER.encode(reply))
        except Exception as exc:  # the connection went: the client sees no answer
            log.debug("%s: cannot answer: %s", name, exc)

    def wrap(subject: str, fn: Endpoint) -> Callable[[Any], Awaitable[None]]:
        room = asyncio.Semaphore(concurrency)

        async def serve(req: Any) -> None:
            try:
                # The request's trace goes on in the endpoint (a submit's decision,
                # binding and answer are one trace with the client's).
                with tracing.receive(bus.tracer, req.subject, req.headers):
                    try:
                        reply = await fn(req.data)
                    except (BadMessage, ValueError) as exc:
                        reply = ErrorReply(error=str(exc))
                    except asyncio.CancelledError:
                        await asyncio.shield(answer(req, ErrorReply(error=f"{name} is stopping; ask again")))
                        raise
                    except Exception as exc:
                        log.exception("%s: endpoint failed", name)
                        reply = ErrorReply(error=f"internal error: {exc}")
                    await answer(req, reply)
            finally:
                room.release()

        async def handler(req: Any) -> None:
            if room.locked():
                await answer(req, ErrorReply(
                    error=f"busy: {concurrency} requests on {subject} in flight; ask again",
                    detail={"busy": True},
                ))
                return
            await room.acquire()  # not locked: returns at once
            task = asyncio.create_task(serve(req), name=f"{name}-{subject}")
            api.tasks.add(task)
            task.add_done_callback(api.tasks.discard)

        return handler

    for subject, fn in endpoints.items():
        await svc.add_endpoint(
            name=subject.rsplit(".", 1)[-1], subject=subject, handler=wrap(subject, fn)
        )
    # Once the service is said to be started, the server knows its subscriptions: a
    # client's request right after must not meet "no responders".
    await bus.nc.flush()
    return api
