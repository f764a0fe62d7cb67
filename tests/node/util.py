"""Helpers of the node-side tests: ledger entries, short socket dirs, the container's view."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.nodeagent.slices import CONTAINERS_DIR, ENV_FILE, parse_env
from shared.schemas import CardGrant, ContainerGrant, LedgerAlloc

_seq = itertools.count()


def grant(
    name: str, cards: Sequence[str], mem: int = 1000, cores: int = 10, init: bool = False
) -> ContainerGrant:
    return ContainerGrant(
        name=name,
        init=init,
        devices=[
            CardGrant(uuid=u, index=0, type="NVIDIA-A100", mem=mem, cores=cores) for u in cards
        ],
    )


def pod(uid: str, *containers: ContainerGrant, decided_at: float | None = None) -> LedgerAlloc:
    return LedgerAlloc(
        uid=uid,
        name=f"pod-{uid}",
        namespace="default",
        containers=list(containers),
        decided_at=float(next(_seq)) if decided_at is None else decided_at,
        source="kube",
    )


def container_view(host_root: Path, uid: str, container: str) -> dict[str, str]:
    """The slice file a container with this pod UID and name reads at start."""
    return parse_env((host_root / CONTAINERS_DIR / f"{uid}_{container}" / ENV_FILE).read_text())


def effective_env(allocate_envs: Mapping[str, str], slice_env: Mapping[str, str]) -> dict[str, str]:
    """The environment CUDA sees: the kubelet's (from Allocate), then the limiter's
    setenv of every slice file line on top."""
    return {**allocate_envs, **slice_env}


def check_container(env: Mapping[str, str], visible: Sequence[str], g: ContainerGrant) -> list[str]:
    """Mismatches between what a started container sees and its decided grant."""
    errs: list[str] = []
    want = [d.uuid for d in g.devices]
    if env.get("CUDA_VISIBLE_DEVICES") != ",".join(want):
        errs.append(f"{g.name}: CUDA_VISIBLE_DEVICES {env.get('CUDA_VISIBLE_DEVICES')} != {want}")
    if not set(want) <= set(visible):
        errs.append(f"{g.name}: cards {want} not all exposed by the runtime ({visible})")
    for i, d in enumerate(g.devices):
        if env.get(f"CUDA_DEVICE_MEMORY_LIMIT_{i}") != f"{d.mem}m":
            errs.append(f"{g.name}: memory limit {i} {env.get(f'CUDA_DEVICE_MEMORY_LIMIT_{i}')}")
        if env.get(f"CUDA_DEVICE_SM_LIMIT_{i}") != str(d.cores):
            errs.append(f"{g.name}: SM limit {i} {env.get(f'CUDA_DEVICE_SM_LIMIT_{i}')}")
    return errs
