"""The chart's Grafana dashboard ConfigMap and PrometheusRule, through real Helm.

The dashboard ConfigMap carries the sidecar's label and exactly the committed JSON (the
chart's copy and deploy/grafana's are one file's two copies); deploy/prometheus holds the
PrometheusRule's rules, with the default thresholds, for a Prometheus without the Operator. The rules are checked by
Prometheus' own ``promtool``: ``check rules`` parses every expression, and ``test rules``
feeds series and asserts which alerts fire, with their labels and text, and which stay
quiet: a healthy fleet raises nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.debpkg import need
from tests.test_helm import CHART, ROOT, render_raw

DASHBOARD = CHART / "dashboards" / "hami-bus.json"
DEPLOY_COPY = ROOT / "deploy" / "grafana" / "hami-bus.json"
DEPLOY_RULES = ROOT / "deploy" / "prometheus" / "hami-bus.rules.yaml"

Obj = dict[str, Any]


def objects(vals: Obj) -> list[Obj]:
    out: list[Obj] = []
    for path, text in sorted(render_raw(vals).items()):
        if path.endswith(".yaml"):
            out += [d for d in yaml.safe_load_all(text) if d]
    return out


def dashboards(vals: Obj) -> list[Obj]:
    return [
        o
        for o in objects(vals)
        if o["kind"] == "ConfigMap"
        and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]


def rules(vals: Obj) -> list[Obj]:
    return [o for o in objects(vals) if o["kind"] == "PrometheusRule"]


def test_dashboard_configmap_by_default_with_the_committed_json() -> None:
    [cm] = dashboards({})
    assert cm["metadata"]["namespace"] == "hami-system"
    assert cm["data"]["hami-bus.json"] == DASHBOARD.read_text().rstrip("\n")
    dash = json.loads(cm["data"]["hami-bus.json"])
    assert dash["uid"] == "hami-bus" and len(dash["panels"]) > 20


def test_deploy_copy_is_the_charts() -> None:
    assert DEPLOY_COPY.read_text() == DASHBOARD.read_text(), (
        "deploy/grafana/hami-bus.json differs from helm/hami-bus/dashboards/hami-bus.json: copy it over"
    )


def test_dashboard_off_namespace_labels() -> None:
    assert dashboards({"metrics": {"grafanaDashboard": {"enabled": False}}}) == []
    assert dashboards({"metrics": {"enabled": False}}) == []
    [cm] = dashboards(
        {
            "metrics": {
                "grafanaDashboard": {
                    "namespace": "monitoring",
                    "labels": {"team": "gpu"},
                    "annotations": {"grafana_folder": "GPU"},
                }
            }
        }
    )
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "gpu"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "GPU"}


def test_rules_off_by_default_and_refuse_bad_thresholds() -> None:
    assert rules({}) == []
    with pytest.raises(helm.HelmValuesError):
        render_raw({"metrics": {"prometheusRule": {"enabled": True, "pendingSeconds": -5}}})
    with pytest.raises(helm.HelmValuesError):
        render_raw(
            {"metrics": {"prometheusRule": {"enabled": True, "nodeUnhealthyFor": "two minutes"}}}
        )


def write_rules(tmp_path: Path, vals: Obj) -> Path:
    [rule] = rules({"metrics": {"prometheusRule": {"enabled": True, **vals}}})
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_deploy_rules_are_the_charts_defaults() -> None:
    [rule] = rules({"metrics": {"prometheusRule": {"enabled": True}}})
    assert yaml.safe_load(DEPLOY_RULES.read_text()) == rule["spec"], (
        "deploy/prometheus/hami-bus.rules.yaml differs from the chart's PrometheusRule: render it again"
    )


def test_promtool_accepts_every_rule(tmp_path: Path) -> None:
    promtool = need("promtool", "prometheus")
    path = write_rules(tmp_path, {})
    r = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout, r.stdout


def _alert(name: str, at: str, *exp: Obj) -> Obj:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(exp)}


# Series over 30 minutes, one sample a minute: node n1 down, n2 up; card 0 of n1 over its
# memory, card 1 not; a container over its limit and one without a limit; a request
# waiting since t=0 and one that just came; decisions slow (all between 1 s and 2.5 s).
SERIES = [
    ("hami_node_healthy{node='n1',reason='no heartbeat for 10s'}", "1 1 0x28"),
    ("hami_node_healthy{node='n2',reason=''}", "1x30"),
    (
        "hami_host_gpu_memory_used_bytes{node='n1',device_uuid='GPU-a',device_index='0',device_type='T4'}",
        "20e9x30",
    ),
    (
        "hami_gpu_memory_limit_bytes{node='n1',device_uuid='GPU-a',device_index='0',device_type='T4',zone='vGPU'}",
        "16e9x30",
    ),
    (
        "hami_host_gpu_memory_used_bytes{node='n1',device_uuid='GPU-b',device_index='1',device_type='T4'}",
        "1e9x30",
    ),
    (
        "hami_gpu_memory_limit_bytes{node='n1',device_uuid='GPU-b',device_index='1',device_type='T4',zone='vGPU'}",
        "16e9x30",
    ),
    (
        "hami_vgpu_memory_used_bytes{namespace='team-a',pod='p1',container='main',vdevice_index='0',"
        "device_uuid='GPU-a'}",
        "3e9x30",
    ),
    (
        "hami_vgpu_memory_limit_bytes{namespace='team-a',pod='p1',container='main',vdevice_index='0',"
        "device_uuid='GPU-a'}",
        "2e9x30",
    ),
    (
        "hami_vgpu_memory_used_bytes{namespace='team-a',pod='p2',container='main',vdevice_index='0',"
        "device_uuid='GPU-b'}",
        "3e9x30",
    ),
    (
        "hami_vgpu_memory_limit_bytes{namespace='team-a',pod='p2',container='main',vdevice_index='0',"
        "device_uuid='GPU-b'}",
        "0x30",
    ),
    (
        "hami_pending_request_age_seconds{namespace='team-a',name='big',reason='CardInsufficientMemory'}",
        "0+60x30",
    ),
    (
        "hami_pending_request_age_seconds{namespace='team-b',name='new',reason='CardInsufficientMemory'}",
        "_x25 0 60 120 180 240",
    ),
    ("hami_scheduling_decision_seconds_bucket{outcome='decided',le='1'}", "0x30"),
    ("hami_scheduling_decision_seconds_bucket{outcome='decided',le='2.5'}", "0+100x30"),
    ("hami_scheduling_decision_seconds_bucket{outcome='decided',le='+Inf'}", "0+100x30"),
]


def test_alerts_fire_on_what_they_watch_and_not_otherwise(tmp_path: Path) -> None:
    promtool = need("promtool", "prometheus")
    path = write_rules(tmp_path, {"pendingSeconds": 300, "nodeUnhealthyFor": "3m"})
    down = {"severity": "warning", "node": "n1"}
    tests = {
        "rule_files": [path.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s.replace("'", '"'), "values": v} for s, v in SERIES],
                "alert_rule_test": [
                    # Down from t=2m; for 3m: pending at 4m, firing from 5m.
                    _alert("HamiNodeUnhealthy", "4m"),
                    _alert(
                        "HamiNodeUnhealthy",
                        "6m",
                        {
                            "exp_labels": down,
                            "exp_annotations": {
                                "summary": "GPU node n1 is unhealthy",
                                "description": "The inventory declared n1 unhealthy (no heartbeats); its cards take no new slices.",
                            },
                        },
                    ),
                    _alert(
                        "HamiGpuMemoryOverLimit",
                        "10m",
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "node": "n1",
                                "device_uuid": "GPU-a",
                                "device_index": "0",
                            },
                            "exp_annotations": {
                                "summary": "GPU 0 on n1 uses more memory than it has",
                                "description": "Memory in use on GPU-a exceeds the card's memory limit: a process outside "
                                "the limiter, or oversubscription.",
                            },
                        },
                    ),
                    _alert(
                        "HamiContainerMemoryOverLimit",
                        "10m",
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "team-a",
                                "pod": "p1",
                                "container": "main",
                                "vdevice_index": "0",
                            },
                            "exp_annotations": {
                                "summary": "team-a/p1 uses more GPU memory than its slice",
                                "description": "Container main (vGPU 0) is over its memory limit.",
                            },
                        },
                    ),
                    # 300 s is passed at 6m; for 1m: firing from 7m. "new" is 240 s old at 30m.
                    _alert("HamiPendingRequestTooOld", "5m"),
                    _alert(
                        "HamiPendingRequestTooOld",
                        "30m",
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "team-a",
                                "name": "big",
                                "reason": "CardInsufficientMemory",
                            },
                            "exp_annotations": {
                                "summary": "team-a/big has waited more than 300s for a GPU",
                                "description": "Placement's last reason: CardInsufficientMemory.",
                            },
                        },
                    ),
                    _alert("HamiDecisionLatencyHigh", "8m"),
                    _alert(
                        "HamiDecisionLatencyHigh",
                        "20m",
                        {
                            "exp_labels": {"severity": "warning"},
                            "exp_annotations": {
                                "summary": "Placement decisions are slow: p99 2.485s",
                                "description": "The 99th percentile from request to decision has been above 1s "
                                "for 10 minutes.",
                            },
                        },
                    ),
                ],
                "promql_expr_test": [
                    {
                        "expr": "hami:scheduling_decision_seconds:p99_5m",
                        "eval_time": "20m",
                        "exp_samples": [
                            {"labels": "hami:scheduling_decision_seconds:p99_5m", "value": 2.485}
                        ],
                    }
                ],
            }
        ],
    }
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run(
        [promtool, "test", "rules", spec.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_healthy_fleet_raises_nothing(tmp_path: Path) -> None:
    promtool = need("promtool", "prometheus")
    path = write_rules(tmp_path, {})
    calm = [
        ("hami_node_healthy{node='n1',reason=''}", "1x30"),
        (
            "hami_host_gpu_memory_used_bytes{node='n1',device_uuid='GPU-a',device_index='0',device_type='T4'}",
            "1e9x30",
        ),
        (
            "hami_gpu_memory_limit_bytes{node='n1',device_uuid='GPU-a',device_index='0',device_type='T4',zone='vGPU'}",
            "16e9x30",
        ),
        (
            "hami_pending_request_age_seconds{namespace='a',name='x',reason='CardInsufficientMemory'}",
            "0+10x30",
        ),
        ("hami_scheduling_decision_seconds_bucket{outcome='decided',le='0.01'}", "0+100x30"),
        ("hami_scheduling_decision_seconds_bucket{outcome='decided',le='+Inf'}", "0+100x30"),
    ]
    names = [
        "HamiNodeUnhealthy",
        "HamiGpuMemoryOverLimit",
        "HamiContainerMemoryOverLimit",
        "HamiPendingRequestTooOld",
        "HamiDecisionLatencyHigh",
    ]
    tests = {
        "rule_files": [path.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s.replace("'", '"'), "values": v} for s, v in calm],
                "alert_rule_test": [_alert(n, "29m") for n in names],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
