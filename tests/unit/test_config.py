"""Configuration: YAML file, then environment overrides, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.placement.engine import NODE_POLICIES as ENGINE_NODE_POLICIES
from services.placement.engine import parse_chain
from shared.config import ConfigError, load
from shared.hami.codec import GPU_POLICIES, NODE_POLICIES


def test_defaults_are_hamis() -> None:
    c = load(env={})
    assert c.node.device_split_count == 10 and c.node.device_memory_scaling == 1.0
    assert c.scheduler.scheduler_name == "hami-scheduler"
    assert c.resources.memory == "nvidia.com/gpumem"


def test_yaml_then_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node:\n  deviceSplitCount: 4\n  deviceMemoryScaling: 2\nnatsUrl: nats://a:1\n")
    c = load(f, env={"HAMI__NODE__DEVICESPLITCOUNT": "6", "HAMI_NATS_URL": "nats://b:2"})
    assert c.node.device_split_count == 6
    assert c.node.device_memory_scaling == 2.0
    assert c.nats_url == "nats://b:2"


@pytest.mark.parametrize(
    ("env", "match"),
    [({"HAMI__NODE__NOSUCH": "1"}, "unknown setting"),
     ({"HAMI__NODE__DEVICESPLITCOUNT": "many"}, "invalid configuration")],
)
def test_bad_overrides_name_the_problem(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(env=env)


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(f, env={})


def test_hami_spellings_are_accepted_and_unknown_keys_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node:\n  defaultGPUNum: 3\n  devicesplitcount: 5\n")
    c = load(f, env={})
    assert (c.node.default_gpu_num, c.node.device_split_count) == (3, 5)
    f.write_text("node:\n  deviceSplitCnt: 5\n")
    with pytest.raises(ConfigError, match="'deviceSplitCnt' in node; did you mean deviceSplitCount"):
        load(f, env={})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("scheduler:\n  nodePolicy: binpak\n", r"scheduler.nodePolicy: 'binpak' is not one of binpack, spread"),
        ("scheduler:\n  gpuPolicy: sprad\n", r"scheduler.gpuPolicy: 'sprad'"),
        ("scheduler:\n  mode: indirect\n", r"scheduler.mode: 'indirect' is not one of extender, direct"),
        ("node:\n  deviceSplitCount: -3\n", r"node.deviceSplitCount: -3 is not at least 1"),
        ("node:\n  deviceMemoryScaling: 0\n", r"node.deviceMemoryScaling: 0.0 is not greater than 0"),
        ("node:\n  defaultCores: 101\n", r"node.defaultCores: 101 is not 0..100"),
        ("node:\n  gpuCorePolicy: sometimes\n", r"node.gpuCorePolicy: 'sometimes'"),
        ("node:\n  deviceSplitCount: many\n", r"node.deviceSplitCount: expected int, got str"),
        ("node: 5\n", r"at `?node`?: expected object, got int|node: expected object"),
        ("schedular:\n  nodePolicy: spread\n", r"unknown setting 'schedular'; did you mean scheduler"),
        ("metricsPort: 70000\n", r"metricsPort: 70000 is not 0..65535"),
    ],
)
def test_bad_values_are_refused_at_load_in_one_line(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load(f, env={})
    assert "\n" not in str(info.value)


def test_overrides_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match="scheduler.nodePolicy: 'binpak'"):
        load(env={"HAMI__SCHEDULER__NODEPOLICY": "binpak"})
    with pytest.raises(ConfigError, match="node.deviceSplitCount: 0 is not at least 1"):
        load(env={"HAMI__NODE__DEVICESPLITCOUNT": "0"})
    with pytest.raises(ConfigError, match="'DEVICESPLIT' in NODE; did you mean deviceSplitCount"):
        load(env={"HAMI__NODE__DEVICESPLIT": "4"})
    c = load(env={"HAMI__SCHEDULER__NODEPOLICY": "frag", "HAMI__SCHEDULER__MODE": "direct",
                  "HAMI__SCHEDULER__GPUPOLICY": "binpack,numa"})
    assert (c.scheduler.node_policy, c.scheduler.mode, c.scheduler.gpu_policy) == ("frag", "direct", "binpack,numa")


def test_every_policy_name_in_shared_is_one_the_engine_knows() -> None:
    # shared cannot import the engine; this keeps the two lists from drifting apart.
    assert set(NODE_POLICIES) == set(ENGINE_NODE_POLICIES)
    fallback = parse_chain("no-such-policy")
    for name in GPU_POLICIES:
        chain = parse_chain(name)
        assert name in chain.keys or chain.mutex or chain.topology, name
        assert name == "spread" or chain != fallback, name


def test_webhook_settings_are_hamis_and_checked(tmp_path: Path) -> None:
    from services.binder.webhook import WebhookSettings

    c = load(env={})
    # HAMi's --force-overwrite-default-scheduler defaults to true; no runtimeClassName
    assert (c.webhook.force_overwrite_default_scheduler, c.webhook.runtime_class_name) == (True, "")
    f = tmp_path / "c.yaml"
    f.write_text("webhook: {forceOverwriteDefaultScheduler: false, runtimeClassName: nvidia}\n")
    s = WebhookSettings.from_config(load(f, env={}))
    assert (s.force_overwrite_default_scheduler, s.runtime_class_name) == (False, "nvidia")
    with pytest.raises(ConfigError, match="webhook.runtimeClassName: 'NVIDIA_runtime' is not empty or a RuntimeClass name"):
        load(env={"HAMI__WEBHOOK__RUNTIMECLASSNAME": "NVIDIA_runtime"})
    with pytest.raises(ConfigError, match="forceOverwriteDefaultScheduler"):
        load(env={"HAMI__WEBHOOK__FORCEOVERWRITEDEFAULTSCHEDULER": "sometimes"})
