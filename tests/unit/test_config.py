"""Configuration: YAML file, then environment overrides, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, load


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
    with pytest.raises(ConfigError, match="node.'deviceSplitCnt'"):
        load(f, env={})
