"""The series HAMi's own Grafana dashboard queries: (metric, labels it selects or groups by).

Source: Project-HAMi/HAMi, ``dashboards/hami-vgpu-dashboard.json`` (the "HAMi vGPU
metrics" dashboard, uid ``hami-vgpu-metrics``). Only the names are kept here. To
re-extract: for every ``panels[].targets[].expr`` and every ``templating.list[].query``,
take each metric name, the labels in its ``{...}`` selector, in ``by (...)`` / ``on (...)``
and ``label_values(m, l)``, and the ``{{label}}`` placeholders of the target's
``legendFormat`` (those must be present on the series the panel draws).
"""

from __future__ import annotations

DASHBOARD_SERIES: dict[str, tuple[str, ...]] = {
    # scheduler side
    "hami_gpu_memory_limit_bytes": ("node", "device_uuid"),
    "hami_gpu_memory_allocated_bytes": ("node",),
    "hami_gpu_shared_count": ("node", "device_index", "device_uuid"),
    "hami_node_gpu_memory_allocated_ratio": ("node", "device_index"),
    "hami_gpu_core_allocated_ratio": ("node", "device_index", "device_uuid"),
    # node side (HAMi's vGPU monitor)
    "hami_host_gpu_memory_used_bytes": ("device_uuid", "device_type", "device_index"),
    "hami_host_gpu_utilization_ratio": ("device_uuid", "device_type", "device_index"),
    "hami_vgpu_memory_used_bytes": (
        "namespace",
        "pod",
        "container",
        "vdevice_index",
        "device_uuid",
    ),
    "hami_vgpu_memory_limit_bytes": ("namespace", "pod", "container", "vdevice_index"),
    "hami_container_device_utilization_ratio": ("namespace", "pod", "container", "vdevice_index"),
}


# What each of the dashboard's 17 panel queries does, restated (same metric, selector,
# join and aggregation; Grafana's ``$node`` / ``$namespace`` left in), with the labels
# every series of its answer must carry: those its legend shows or it groups by. A
# real Prometheus runs them against our /metrics (tests/system/test_prometheus_dashboards.py).
_N = '{node=~"$node"}'
_NS = '{namespace=~"$namespace"}'
_CTR = ("namespace", "pod", "container", "vdevice_index")
_CARD = ("node", "device_index", "device_uuid")
_HOST = ("device_type", "device_index", "device_uuid")
DASHBOARD_QUERIES: list[tuple[str, str, tuple[str, ...]]] = [
    ("cards", f"count(hami_gpu_memory_limit_bytes{_N})", ()),
    ("memory", f"sum(hami_gpu_memory_limit_bytes{_N})", ()),
    ("memory allocated", f"sum(hami_gpu_memory_allocated_bytes{_N})", ()),
    (
        "memory allocated %",
        f"100 * sum(hami_gpu_memory_allocated_bytes{_N}) / sum(hami_gpu_memory_limit_bytes{_N})",
        (),
    ),
    ("sharing containers", f"sum(hami_gpu_shared_count{_N})", ()),
    (
        "host memory used",
        f"hami_host_gpu_memory_used_bytes and on (device_uuid) hami_gpu_memory_limit_bytes{_N}",
        _HOST,
    ),
    (
        "host utilization",
        f"hami_host_gpu_utilization_ratio and on (device_uuid) hami_gpu_memory_limit_bytes{_N}",
        _HOST,
    ),
    ("allocated per node", f"sum by (node) (hami_gpu_memory_allocated_bytes{_N})", ("node",)),
    ("limit per node", f"sum by (node) (hami_gpu_memory_limit_bytes{_N})", ("node",)),
    ("node allocated ratio", f"hami_node_gpu_memory_allocated_ratio{_N}", ("node", "device_index")),
    ("core allocated ratio", f"hami_gpu_core_allocated_ratio{_N}", _CARD),
    ("shared per card", f"hami_gpu_shared_count{_N}", _CARD),
    ("container memory used", f"hami_vgpu_memory_used_bytes{_NS}", _CTR),
    ("container memory limit", f"hami_vgpu_memory_limit_bytes{_NS}", _CTR),
    ("container utilization", f"hami_container_device_utilization_ratio{_NS}", _CTR),
    (
        "container memory % of limit",
        f"100 * hami_vgpu_memory_used_bytes{_NS} / hami_vgpu_memory_limit_bytes{_NS}",
        _CTR,
    ),
    (
        "top containers by memory",
        f"topk(10, hami_vgpu_memory_used_bytes{_NS})",
        (*_CTR, "device_uuid"),
    ),
]
# Its template variables: (variable, metric, label) of ``label_values(metric, label)``.
DASHBOARD_VARIABLES: list[tuple[str, str, str]] = [
    ("node", "hami_gpu_memory_limit_bytes", "node"),
    ("namespace", "hami_vgpu_memory_used_bytes", "namespace"),
]
