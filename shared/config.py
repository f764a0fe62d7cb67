"""Configuration: a YAML file, then environment overrides, into typed settings.

The node settings keep HAMi's names (REFERENCE §3) so a HAMi values file translates one
to one. Environment overrides use ``HAMI__<SECTION>__<FIELD>=<yaml value>``, e.g.
``HAMI__NODE__DEVICESPLITCOUNT=4`` (field names are matched case-insensitively); the
common ones have short forms: ``HAMI_NATS_URL``, ``HAMI_NODE_NAME``, ``HAMI_CONFIG``.

Everything is checked at load, file and overrides alike: an unknown key (with the
nearest known one suggested), a wrong type, a value outside its set (policies, modes)
or its range raises :class:`ConfigError` with a one-line message naming the setting.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message says which."""


class MigProfileAllowlistEntry(msgspec.Struct, kw_only=True, rename="camel"):
    """One entry of HAMi's ``migProfileAllowlist``: the MIG profiles cards whose model
    contains one of ``models`` may offer."""

    models: list[str] = []
    profiles: list[str] = []


class NodeSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """HAMi's per-node device settings."""

    device_split_count: int = 10
    device_memory_scaling: float = 1.0
    device_core_scaling: float = 1.0
    default_memory: int = 0  # MiB; 0 = the whole card
    default_cores: int = 0
    default_gpu_num: int = 1
    memory_factor: int = 1
    gpu_core_policy: str = "default"  # default | force | disable
    disable_core_limit: bool = False
    filterdevices: list[str] = []  # UUIDs or indexes not to register
    max_pods: int = 110
    # The MIG profiles a card in MIG mode may offer, per model; None: HAMi chart's default
    # (shared.hami.mig.DEFAULT_ALLOWLIST). A list replaces it in full, as in HAMi.
    mig_profile_allowlist: list[MigProfileAllowlistEntry] | None = None
    # Ascend NPUs in soft mode (ascend-device-plugin's hami-vnpu-core): the node annotation
    # hami-vnpu-core says "true" and each card registers devcore 100 (percent); pods asking
    # huawei.com/vnpu-mode: hami-core get the limiter. False: hard mode (vNPU templates).
    ascend_soft_mode: bool = False


class ResourceNames(msgspec.Struct, kw_only=True, rename="camel"):
    count: str = "nvidia.com/gpu"
    memory: str = "nvidia.com/gpumem"
    memory_percentage: str = "nvidia.com/gpumem-percentage"
    cores: str = "nvidia.com/gpucores"
    priority: str = "nvidia.com/priority"


class SchedulerSettings(msgspec.Struct, kw_only=True, rename="camel"):
    # binpack, HAMi's own default, until frag is as fast (docs/placement.md: over NATS frag
    # decides about half as many requests per second); frag is one setting away
    node_policy: str = "binpack"
    gpu_policy: str = "spread"
    scheduler_name: str = "hami-scheduler"
    # Kubernetes: how pods reach placement. "extender": the upstream kube-scheduler runs
    # every plugin and asks the binder's HTTP extender to filter and bind (HAMi's way);
    # "direct": the binder schedules the pods with our schedulerName itself.
    mode: str = "direct"
    extender_port: int = 8888  # the binder's extender listens here (extender mode)
    # A reservation made by filter whose bind never comes is released after this long.
    extender_reservation_timeout: float = 60.0
    # The learned task-shape table (fragmentation-aware policies) keeps this many shapes.
    shape_table_max: int = 4096
    # Standalone: a request that fits nowhere may release allocations of lower priority
    # on one node to fit (docs/preemption.md). Off, as in HAMi, which never preempts.
    preemption: bool = False
    # Kubernetes consolidation (hami defrag --apply, docs/defrag.md): at most this many
    # pods evicted and not yet placed again at a time, and how long, in seconds, one
    # evicted pod's replacement may take to be placed before the moves stop.
    defrag_max_disruption: int = 1
    defrag_replace_timeout: float = 300.0
    # With preemption and queues: a queue over its guarantee may also preempt another's
    # over-quota allocations while that queue stays the more over per weight (by a
    # margin; docs/queues.md). Off: in bench/fairness.py it costs 28-45 % more
    # preemptions per placement for shares that are within 10 % of ideal without it
    # on most seeds.
    queue_rebalance: bool = False


class BusSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """What the bus keeps and how it treats requests (stated bounds on growth)."""

    stream_max_age: float = 7 * 86400.0  # seconds the event stream keeps an event
    stream_max_bytes: int = 1 << 30  # and at most this many bytes of them
    # A request or release whose handler fails this many times is answered with an
    # error and moved to the dead-letter subject instead of being redelivered again.
    max_deliveries: int = 5
    api_concurrency: int = 256  # submit/release requests served at once per binder
    max_wait: float = 3600.0  # longest a submit may wait for capacity, seconds


class SimSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """Simulated nodes for standalone mode and tests."""

    nodes: int = 1
    gpus: list[str] = msgspec.field(default_factory=lambda: ["A100-80GB:4:81920"])  # MODEL:COUNT[:MEMORY_MIB], one per node kind
    numa_nodes: int = 1
    nvlink: str = "pcie"  # pcie | pairs | dgx1 | nvswitch


class MetricsSettings(msgspec.Struct, kw_only=True, rename="camel"):
    # HAMi's legacyMetrics: also export the pre-v2.9 names with their old labels.
    legacy_metrics: bool = False


class WebhookSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """HAMi's admission webhook settings (its scheduler flag and NVIDIA config of the same names)."""

    # --force-overwrite-default-scheduler: a pod naming default-scheduler explicitly is
    # taken over like one naming none; false leaves such pods to default-scheduler.
    force_overwrite_default_scheduler: bool = True
    # Written to spec.runtimeClassName of a pod with a container asking for our
    # resources, unless the pod sets one; "" = leave it alone.
    runtime_class_name: str = ""


class QueueAmount(msgspec.Struct, kw_only=True, rename="camel"):
    """An amount of GPU: memory in MiB, cores in percent of a card (100 per whole card);
    None: unbounded (in a limit) or nothing (in a guarantee)."""

    memory: int | None = None
    cores: int | None = None


class QueueSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """One queue (docs/queues.md); the Kubernetes Queue resource's spec has these fields."""

    name: str = ""  # a Kubernetes Queue's is its metadata.name
    parent: str = ""
    guarantee: QueueAmount = msgspec.field(default_factory=QueueAmount)
    limit: QueueAmount = msgspec.field(default_factory=QueueAmount)
    # card model (a substring of the card type, e.g. "A100") -> a limit on those cards
    model_limits: dict[str, QueueAmount] = {}
    over_quota_weight: float = 1.0
    # requests of these namespaces that name no queue join this one
    namespaces: list[str] = []


class Config(msgspec.Struct, kw_only=True, rename="camel"):
    nats_url: str = ""  # "" = start an embedded nats-server
    node_name: str = ""
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    resources: ResourceNames = msgspec.field(default_factory=ResourceNames)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    sim: SimSettings = msgspec.field(default_factory=SimSettings)
    bus: BusSettings = msgspec.field(default_factory=BusSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    webhook: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    # Queues with fair share (docs/queues.md); none: requests are tried in arrival order.
    queues: list[QueueSettings] = []
    heartbeat_interval: float = 2.0
    telemetry_interval: float = 5.0  # seconds between node agents' usage samples
    unhealthy_after: float = 6.0  # seconds without a heartbeat
    metrics_port: int = 9394
    log_level: str = "INFO"


_SHORT_ENV = {"HAMI_NATS_URL": "natsUrl", "HAMI_NODE_NAME": "nodeName", "HAMI_LOG_LEVEL": "logLevel"}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _unknown(name: str, where: str, cls: Any) -> ConfigError:
    known = [f.encode_name for f in msgspec.structs.fields(cls)]
    section = f" in {where.rstrip('.')}" if where else ""
    by_norm = {_norm(k): k for k in known}
    close = difflib.get_close_matches(_norm(name), list(by_norm), n=1, cutoff=0.6)
    hint = f"; did you mean {by_norm[close[0]]}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown setting {name!r}{section}{hint}")


def _set_path(tree: dict[str, Any], path: list[str], value: Any, schema: type[Any]) -> None:
    """Set ``value`` at ``path`` matching each name case-insensitively to a field."""
    node = tree
    cls: Any = schema
    for i, part in enumerate(path):
        fields = {_norm(f.encode_name): f for f in msgspec.structs.fields(cls)}
        f = fields.get(_norm(part))
        if f is None:
            raise _unknown(part, ".".join(path[:i]), cls)
        if i == len(path) - 1:
            node[f.encode_name] = value
        else:
            node = node.setdefault(f.encode_name, {})
            cls = f.type


def _normalize(raw: Any, schema: Any, where: str) -> Any:
    """Match a YAML tree's keys to the schema case-insensitively (HAMi's files spell
    ``defaultGPUNum``, ours ``defaultGpuNum``); an unknown key is an error, not ignored."""
    if not isinstance(raw, dict) or not (
        isinstance(schema, type) and issubclass(schema, msgspec.Struct)
    ):
        return raw
    fields = {_norm(f.encode_name): f for f in msgspec.structs.fields(schema)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(_norm(str(key)))
        if f is None:
            raise _unknown(str(key), where, schema)
        out[f.encode_name] = _normalize(value, f.type, f"{where}{f.encode_name}.")
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line report, in one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        m = exc.problem_mark
        return f"line {m.line + 1} column {m.column + 1}: {exc.problem or exc.context or 'bad YAML'}"
    return " ".join(str(exc).split())


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (``path`` or ``$HAMI_CONFIG``, optional) and apply overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get("HAMI_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot read config {path}: {_yaml_problem(exc)}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping")
        raw = _normalize(loaded, Config, "")
    for short, field in _SHORT_ENV.items():
        if env.get(short):
            raw[field] = env[short]
    for key, text in env.items():
        if key.startswith("HAMI__"):
            parts = [p for p in key[len("HAMI__") :].split("__") if p]
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: not a YAML value: {_yaml_problem(exc)}") from exc
            _set_path(raw, parts, value, Config)
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.node.deviceSplitCount`".
        text, _, at = str(exc).partition(" - at `$.")
        where = at.rstrip("`") or "the top level"
        raise ConfigError(f"invalid configuration: {where}: {text.replace('`', '').lower()}") from exc
    validate(cfg)
    return cfg


_Check = tuple[str, Callable[[Config], Any], Callable[[Any], bool], str]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GPU_CORE_POLICIES = ("default", "force", "disable")
SCHEDULER_MODES = ("extender", "direct")
NVLINK_TOPOLOGIES = ("pcie", "pairs", "dgx1", "nvswitch")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _one_of(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {', '.join(options)}"


def _checks() -> list[_Check]:
    # Imported here: the HAMi codec reads these settings, so it imports this module.
    from shared.hami.codec import NODE_POLICIES

    def at_least(n: float) -> tuple[Callable[[Any], bool], str]:
        return (lambda v: v >= n), f"at least {n:g}"

    positive: tuple[Callable[[Any], bool], str] = (lambda v: v > 0), "greater than 0"
    rows: list[tuple[str, Callable[[Config], Any], tuple[Callable[[Any], bool], str]]] = [
        ("node.deviceSplitCount", lambda c: c.node.device_split_count, at_least(1)),
        ("node.deviceMemoryScaling", lambda c: c.node.device_memory_scaling, positive),
        ("node.deviceCoreScaling", lambda c: c.node.device_core_scaling, positive),
        ("node.defaultMemory", lambda c: c.node.default_memory, at_least(0)),
        ("node.defaultCores", lambda c: c.node.default_cores, ((lambda v: 0 <= v <= 100), "0..100")),
        ("node.defaultGpuNum", lambda c: c.node.default_gpu_num, at_least(1)),
        ("node.memoryFactor", lambda c: c.node.memory_factor, at_least(1)),
        ("node.gpuCorePolicy", lambda c: c.node.gpu_core_policy, _one_of(GPU_CORE_POLICIES)),
        ("node.maxPods", lambda c: c.node.max_pods, at_least(1)),
        ("scheduler.nodePolicy", lambda c: c.scheduler.node_policy, _one_of(NODE_POLICIES)),
        ("scheduler.mode", lambda c: c.scheduler.mode, _one_of(SCHEDULER_MODES)),
        ("scheduler.extenderPort", lambda c: c.scheduler.extender_port, ((lambda v: 0 <= v <= 65535), "0..65535")),
        ("scheduler.extenderReservationTimeout", lambda c: c.scheduler.extender_reservation_timeout, positive),
        ("scheduler.shapeTableMax", lambda c: c.scheduler.shape_table_max, at_least(1)),
        ("scheduler.defragMaxDisruption", lambda c: c.scheduler.defrag_max_disruption, at_least(1)),
        ("scheduler.defragReplaceTimeout", lambda c: c.scheduler.defrag_replace_timeout, positive),
        ("bus.streamMaxAge", lambda c: c.bus.stream_max_age, positive),
        ("bus.streamMaxBytes", lambda c: c.bus.stream_max_bytes, at_least(1 << 20)),
        ("bus.maxDeliveries", lambda c: c.bus.max_deliveries, at_least(1)),
        ("bus.apiConcurrency", lambda c: c.bus.api_concurrency, at_least(1)),
        ("bus.maxWait", lambda c: c.bus.max_wait, positive),
        ("sim.nodes", lambda c: c.sim.nodes, at_least(0)),
        ("sim.numaNodes", lambda c: c.sim.numa_nodes, at_least(1)),
        ("sim.nvlink", lambda c: c.sim.nvlink, _one_of(NVLINK_TOPOLOGIES)),
        ("heartbeatInterval", lambda c: c.heartbeat_interval, positive),
        ("telemetryInterval", lambda c: c.telemetry_interval, positive),
        ("unhealthyAfter", lambda c: c.unhealthy_after, positive),
        ("metricsPort", lambda c: c.metrics_port, ((lambda v: 0 <= v <= 65535), "0..65535")),
        ("logLevel", lambda c: c.log_level.upper(), _one_of(LOG_LEVELS)),
        ("webhook.runtimeClassName", lambda c: c.webhook.runtime_class_name,
         ((lambda v: v == "" or _DNS_SUBDOMAIN.fullmatch(v) is not None),
          "empty or a RuntimeClass name (lower-case DNS subdomain, at most 253 characters)")),
    ]
    return [(name, get, ok, want) for name, get, (ok, want) in rows]


def validate(cfg: Config) -> None:
    """Sets and ranges msgspec's types do not express; raises the first problem found."""
    from shared.hami.codec import parse_gpu_policy

    for name, get, ok, want in _checks():
        value = get(cfg)
        if not ok(value):
            raise ConfigError(f"invalid configuration: {name}: {value!r} is not {want}")
    for entry in cfg.node.mig_profile_allowlist or []:
        # HAMi's ValidateMigProfileAllowlist, with its texts
        if not entry.models or not entry.profiles:
            raise ConfigError("invalid configuration: node.migProfileAllowlist: "
                              "MIG profile allowlist must define models and profiles")
        for prof in entry.profiles:
            g, dot, _ = prof.partition(".")
            if not dot or len(g) < 2 or not g.endswith("g"):
                raise ConfigError(f"invalid configuration: node.migProfileAllowlist: invalid MIG profile {prof!r}")
    try:
        parse_gpu_policy(cfg.scheduler.gpu_policy)
    except ValueError as exc:
        raise ConfigError(
            f"invalid configuration: scheduler.gpuPolicy: {cfg.scheduler.gpu_policy!r}: {exc}"
        ) from None
