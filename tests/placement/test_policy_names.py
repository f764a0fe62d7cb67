"""Node policy names: the configured default is HAMi's binpack until the product's policy
is as fast, the product's is one setting away, and a name that is not known is an error
everywhere, never a silent fall back to binpack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.placement import replay
from services.placement.engine import NODE_POLICIES, Placement, Placer
from services.placement.engine.frag import PRODUCT_DEFAULT, VARIANTS, Variant, register_variant
from shared.config import ConfigError, NodeSettings, SchedulerSettings
from shared.config import load as load_config
from shared.schemas import DeviceAsk

from .util import cluster, node, placer, req

ROOT = Path(__file__).resolve().parents[2]


def test_the_configured_default_is_binpack_and_the_product_policy_one_setting_away(tmp_path: Path) -> None:
    assert PRODUCT_DEFAULT == "frag"
    assert SchedulerSettings().node_policy == "binpack"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert load_config(empty, env={}).scheduler.node_policy == "binpack"
    assert replay.resolve_policy("default") == PRODUCT_DEFAULT
    picked = tmp_path / "frag.yaml"
    picked.write_text("scheduler: {nodePolicy: frag}\n")
    assert load_config(picked, env={}).scheduler.node_policy == PRODUCT_DEFAULT


def test_a_placer_set_to_the_product_policy_places_by_it() -> None:
    # Workload: half-card and whole-card tasks; a has a card half used. Default settings
    # must place the next half-card task into that fragment, not split an idle card.
    cl = cluster(node("a", 2), node("b", 2))
    p = Placer(cl, SchedulerSettings(node_policy=PRODUCT_DEFAULT), NodeSettings())
    for _ in range(10):
        p.observe(req(DeviceAsk(mem_percent=50, cores=50)))
        p.observe(req(DeviceAsk(nums=1, cores=100)))
    first = p.decide(r1 := req(DeviceAsk(mem_percent=50, cores=50), node_name="a"))
    assert isinstance(first, Placement)
    cl.reserve(first.node, first.to_alloc(r1))
    got = p.decide(req(DeviceAsk(mem_percent=50, cores=50)))
    assert isinstance(got, Placement)
    # the fragment of a's used card, not an idle card (which strands half a card)
    assert (got.node, got.containers[0].devices[0].uuid) == (
        "a",
        first.containers[0].devices[0].uuid,
    )


def test_the_product_list_holds_only_policies_a_user_would_choose() -> None:
    assert NODE_POLICIES == ("binpack", "spread", "random", "bestfit", "fgd", "frag")
    product = {k: v for k, v in VARIANTS.items() if k in NODE_POLICIES}
    assert set(product) == {"fgd", "frag"}
    with pytest.raises(ValueError, match="product policy"):
        register_variant("frag", Variant(two_d=False, exact=False, tie="random"))


def test_an_unknown_configured_policy_stops_the_placer() -> None:
    with pytest.raises(ValueError, match="unknown node policy 'binpak'"):
        placer(cluster(node("a", 1)), node_policy="binpak")


def test_an_unknown_policy_in_a_request_is_refused_not_placed_by_binpack() -> None:
    p = placer(cluster(node("a", 1)))
    got = p.decide(req(DeviceAsk(mem_percent=10, cores=10), node_policy="worstfit"))
    assert not isinstance(got, Placement)
    assert "unknown node policy 'worstfit'" in got.message


def test_an_unknown_policy_in_the_config_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: {nodePolicy: frag-v2}\n")  # a benchmark variant is no product policy
    with pytest.raises(ConfigError, match="scheduler.nodePolicy: 'frag-v2'"):
        load_config(bad, env={})


@pytest.mark.parametrize(
    "cmd",
    [
        [
            sys.executable,
            "bench/placement_inproc.py",
            "--nodes",
            "2",
            "--decisions",
            "1",
            "--policy",
            "binpak",
        ],
        [
            sys.executable,
            "-m",
            "services.placement.replay",
            "--nodes",
            "x.csv",
            "--pods",
            "y.csv",
            "--policy",
            "frag-v2",
        ],
    ],
)
def test_benchmarks_refuse_an_unknown_policy(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown" in out.stderr and ("binpak" in out.stderr or "frag-v2" in out.stderr)
