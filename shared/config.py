"""Configuration: a YAML file, then environment overrides, into typed settings.

The node settings keep HAMi's names (REFERENCE §3) so a HAMi values file translates one
to one. Environment overrides use ``HAMI__<SECTION>__<FIELD>=<yaml value>``, e.g.
``HAMI__NODE__DEVICESPLITCOUNT=4`` (field names are matched case-insensitively); the
common ones have short forms: ``HAMI_NATS_URL``, ``HAMI_NODE_NAME``, ``HAMI_CONFIG``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message says which."""


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


class ResourceNames(msgspec.Struct, kw_only=True, rename="camel"):
    count: str = "nvidia.com/gpu"
    memory: str = "nvidia.com/gpumem"
    memory_percentage: str = "nvidia.com/gpumem-percentage"
    cores: str = "nvidia.com/gpucores"
    priority: str = "nvidia.com/priority"


class SchedulerSettings(msgspec.Struct, kw_only=True, rename="camel"):
    node_policy: str = "binpack"
    gpu_policy: str = "spread"
    scheduler_name: str = "hami-scheduler"


class SimSettings(msgspec.Struct, kw_only=True, rename="camel"):
    """Simulated nodes for standalone mode and tests."""

    nodes: int = 1
    gpus: list[str] = msgspec.field(default_factory=lambda: ["A100-80GB:4:81920"])  # MODEL:COUNT[:MEMORY_MIB], one per node kind
    numa_nodes: int = 1
    nvlink: str = "pcie"  # pcie | pairs | dgx1 | nvswitch


class Config(msgspec.Struct, kw_only=True, rename="camel"):
    nats_url: str = ""  # "" = start an embedded nats-server
    node_name: str = ""
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    resources: ResourceNames = msgspec.field(default_factory=ResourceNames)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    sim: SimSettings = msgspec.field(default_factory=SimSettings)
    heartbeat_interval: float = 2.0
    unhealthy_after: float = 6.0  # seconds without a heartbeat
    metrics_port: int = 9394
    log_level: str = "INFO"


_SHORT_ENV = {"HAMI_NATS_URL": "natsUrl", "HAMI_NODE_NAME": "nodeName", "HAMI_LOG_LEVEL": "logLevel"}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _set_path(tree: dict[str, Any], path: list[str], value: Any, schema: type[Any]) -> None:
    """Set ``value`` at ``path`` matching each name case-insensitively to a field."""
    node = tree
    cls: Any = schema
    for i, part in enumerate(path):
        fields = {_norm(f.encode_name): f for f in msgspec.structs.fields(cls)}
        f = fields.get(_norm(part))
        if f is None:
            raise ConfigError(f"unknown setting {'.'.join(path[: i + 1])!r}")
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
            raise ConfigError(f"unknown setting {where}{key!r}")
        out[f.encode_name] = _normalize(value, f.type, f"{where}{f.encode_name}.")
    return out


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (``path`` or ``$HAMI_CONFIG``, optional) and apply overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get("HAMI_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
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
                raise ConfigError(f"{key}: not a YAML value: {exc}") from exc
            _set_path(raw, parts, value, Config)
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
