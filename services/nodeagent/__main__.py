"""``python -m services.nodeagent``: one node agent (real cards via NVML, else simulated)."""

from __future__ import annotations

import socket
import sys

from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends import Backend, nvml
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from shared import runner
from shared.bus import Bus
from shared.config import Config


def main(argv: list[str] | None = None) -> int:
    p = runner.common_args("python -m services.nodeagent")
    p.add_argument("--node", default=None, help="node name (default: $HAMI_NODE_NAME or hostname)")
    p.add_argument("--sim-gpus", action="append", default=None, help="MODEL:COUNT[:MEMORY_MIB]")
    p.add_argument("--topology", default=None, help="simulated links: pcie|pairs|dgx1|nvswitch")
    args = p.parse_args(argv)

    async def make(bus: Bus, cfg: Config) -> NodeAgent:
        node = args.node or cfg.node_name or socket.gethostname()
        backend: Backend
        if args.sim_gpus is None and nvml.available():
            backend = nvml.NvmlBackend()
        else:
            specs = [parse_gpu_spec(s) for s in (args.sim_gpus or cfg.sim.gpus)]
            backend = SimBackend(node, specs, cfg.sim.numa_nodes, args.topology or cfg.sim.nvlink)
        return NodeAgent(bus, node, backend, cfg)

    return runner.run("nodeagent", args, make)


if __name__ == "__main__":
    sys.exit(main())
