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
    "hami_vgpu_memory_used_bytes": ("namespace", "pod", "container", "vdevice_index", "device_uuid"),
    "hami_vgpu_memory_limit_bytes": ("namespace", "pod", "container", "vdevice_index"),
    "hami_container_device_utilization_ratio": ("namespace", "pod", "container", "vdevice_index"),
}
