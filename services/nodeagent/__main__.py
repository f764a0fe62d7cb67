"""``python -m services.nodeagent``: one node agent (real cards via NVML, else simulated).

With ``--kube`` it runs in Kubernetes mode (a DaemonSet pod): the agent plus the kubelet
device plugin for ``nvidia.com/gpu`` on ``--plugin-dir``, the per-container slice files
under ``--host-root`` (with the limiter and its ``ld.so.preload``, installed there at
start from ``--limiter-source``), the CSI node plugin of the per-container slice volumes
(``--csi-plugins-dir``, registered with the kubelet through ``--plugins-registry``), HAMi's node annotations (``--no-annotations`` to switch off) and
telemetry. The Kubernetes API is reached with ``--kubeconfig`` or, by default, the pod's
service account.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from services.nodeagent.backends import Backend, nvml
from services.nodeagent.backends.sim import SimBackend, parse_gpu_specs
from services.nodeagent.csi.v1 import PLUGINS_DIR
from services.nodeagent.deviceplugin.v1beta1 import DEVICE_PLUGIN_PATH
from services.nodeagent.pluginregistration.v1 import REGISTRY_DIR
from services.nodeagent.standalone import StandaloneNode
from shared import runner
from shared.bus import Bus
from shared.config import Config

# Where the image carries the limiter (Dockerfile); installed under --host-root at start.
LIMITER_IN_IMAGE = "/usr/local/vgpu/libvgpu.so"


class _KubeService:
    """A KubeNode that also owns (and closes) its Kubernetes client."""

    def __init__(self, node: Any, kube: Any) -> None:
        self.node = node
        self.kube = kube

    async def start(self) -> None:
        await self.node.start()

    async def stop(self) -> None:
        try:
            await self.node.stop()
        finally:
            if self.kube is not None:
                await self.kube.close()


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args("python -m services.nodeagent")
    p.add_argument("--node", default=None, help="node name (default: $HAMI_NODE_NAME or hostname)")
    p.add_argument("--sim-gpus", action="append", default=None, help="MODEL:COUNT[:MEMORY_MIB][:mig] (mig: MIG-mode cards)")
    p.add_argument("--topology", default=None, help="simulated links: pcie|pairs|dgx1|nvswitch")
    k = p.add_argument_group("Kubernetes mode")
    k.add_argument("--kube", action="store_true", help="run the device plugin, slices, annotations")
    k.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster)")
    k.add_argument("--plugin-dir", default=DEVICE_PLUGIN_PATH, help="kubelet device plugin dir")
    k.add_argument("--host-root", default="/", help="where the host's / is mounted")
    k.add_argument(
        "--limiter-source",
        default=LIMITER_IN_IMAGE,
        help="the libvgpu.so to install on the host at start ('' to install none)",
    )
    k.add_argument(
        "--csi-plugins-dir", default=PLUGINS_DIR, help="kubelet CSI plugins dir (our socket)"
    )
    k.add_argument(
        "--plugins-registry", default=REGISTRY_DIR, help="kubelet plugin registration dir"
    )
    k.add_argument(
        "--no-csi",
        action="store_true",
        help="do not serve the CSI driver of the slice volumes (pods then cannot start)",
    )
    k.add_argument(
        "--no-annotations",
        action="store_true",
        help="do not write hami.io/node-nvidia-register on the Node",
    )
    k.add_argument(
        "--telemetry-interval",
        type=float,
        default=5.0,
        help="seconds between telemetry samples (0: off)",
    )
    p.add_argument("--vendors", default=None, metavar="auto|NAME,...",
                   help="discover other vendors' cards (ascend, hygon, amd, ...; auto: probe /dev and PCI)")
    args = p.parse_args(argv)

    async def make(bus: Bus, cfg: Config) -> Any:
        node = args.node or cfg.node_name or socket.gethostname()
        backend: Backend
        if args.sim_gpus is None and nvml.available():
            backend = nvml.NvmlBackend()
        elif args.vendors and not args.kube:
            # Other vendors' real cards (standalone only: the kubelet plugin is NVIDIA's)
            from services.nodeagent.backends.vendors.real import PROBES, VendorBackend, probe

            asked = probe() if args.vendors == "auto" else args.vendors.split(",")
            unknown = sorted(set(asked) - set(PROBES))
            if unknown:
                raise SystemExit(f"nodeagent --vendors: unknown {', '.join(unknown)}; one of {', '.join(PROBES)}")
            backend = VendorBackend(vendors=asked)
        elif args.kube and args.sim_gpus is None:
            # A GPU node whose NVML is missing must not advertise simulated cards to
            # its kubelet; simulation in Kubernetes mode is asked for explicitly.
            raise SystemExit(
                f"nodeagent --kube: NVML found no GPU on {node}; pass --sim-gpus to simulate"
            )
        else:
            specs = parse_gpu_specs(args.sim_gpus or cfg.sim.gpus)
            backend = SimBackend(node, specs, cfg.sim.numa_nodes, args.topology or cfg.sim.nvlink)
        if not args.kube:
            # Slices in a temporary directory, telemetry, and the endpoint of 'hami run'.
            return StandaloneNode(bus, node, backend, cfg)
        from services.nodeagent.kube.node import KubeNode
        from shared import kube

        client = None
        if not args.no_annotations:
            client = await (
                kube.Kube.connect(kubeconfig=args.kubeconfig)
                if args.kubeconfig
                else kube.Kube.connect(in_cluster=True)
            )
        kn = KubeNode(
            bus,
            node,
            cfg,
            backend,
            args.host_root,
            args.plugin_dir,
            client,
            telemetry_interval=args.telemetry_interval or None,
            limiter_source=Path(args.limiter_source) if args.limiter_source else None,
            csi_plugins_dir=None if args.no_csi else Path(args.csi_plugins_dir),
            csi_registry_dir=None if args.no_csi else Path(args.plugins_registry),
        )
        return _KubeService(kn, client)

    return runner.run("nodeagent", args, make)


if __name__ == "__main__":
    sys.exit(main())
