"""HAMi's request defaults (REFERENCE §1): the single copy, shared by codec and placement.

They live in ``shared`` because a service may not import another: the Kubernetes codec
(binder, webhook) and the placement engine (which re-exports them from
``services/placement/engine/model.py``) must give the same answers.
"""

from __future__ import annotations

from shared.config import NodeSettings
from shared.schemas import DeviceAsk


def resolve_device_ask(
    *,
    nums: int | None,
    mem: int | None,
    mem_percent: int | None,
    cores: int | None,
    settings: NodeSettings,
    vendor: str = "NVIDIA",
) -> DeviceAsk | None:
    """Turn the raw numbers of a container's resource limits into a :class:`DeviceAsk`.

    ``None`` means "not given". This is the one place where HAMi's request defaults live
    (REFERENCE §1): ``gpumem`` is multiplied by ``memoryFactor``; a percentage is used
    only without ``gpumem`` (>100 clamps, <=0 is ignored); no memory at all gives
    ``defaultMemory`` MiB if configured, else 100 % of each card; cores default to
    ``defaultCores`` and clamp to 0..100; cores or memory without a card count ask for
    ``defaultGPUNum`` cards. Returns ``None`` when the container asks for no card.

    A bare ``nvidia.com/gpu`` is *not* made exclusive here: as in HAMi, the admission
    webhook writes ``nvidia.com/gpucores: 100`` into such a container's limits, and the
    request is then read from the spec. A request that reaches this point as "100 %
    memory, 0 cores" books 0 cores, as HAMi's scheduler does.
    """
    if nums is None:
        if mem is None and mem_percent is None and cores is None:
            return None
        nums = settings.default_gpu_num
    if nums <= 0:
        return None
    mib = 0
    pct: int | None = None
    if mem is not None and mem > 0:
        mib = mem * max(1, settings.memory_factor)
    elif mem_percent is not None and mem_percent > 0:
        pct = min(100, mem_percent)
    c = settings.default_cores if cores is None else cores
    c = max(0, min(100, c))
    ask = DeviceAsk(vendor=vendor, nums=nums, mem=mib, mem_percent=pct, cores=c)
    return normalise_ask(ask, settings)


def normalise_ask(ask: DeviceAsk, settings: NodeSettings) -> DeviceAsk:
    """Apply the defaults the engine needs to an already-parsed ask (idempotent).

    A direct client's ``DeviceAsk`` may leave memory unset (``mem`` 0, no percentage):
    that is ``defaultMemory`` MiB when configured, else the whole card. Cores are taken as
    given (clamped to 0..100): whoever wants a whole, exclusive card asks for 100 cores
    (HAMi's webhook does it for a bare ``nvidia.com/gpu``; ``hami submit --gpus N`` does it
    for a bare count).
    """
    mib = max(0, ask.mem)
    pct = ask.mem_percent
    if mib == 0:
        if pct is not None and pct > 0:
            pct = min(100, pct)
        elif settings.default_memory > 0:
            mib, pct = settings.default_memory, None
        else:
            pct = 100
    else:
        pct = None
    cores = max(0, min(100, ask.cores))
    if mib == ask.mem and pct == ask.mem_percent and cores == ask.cores:
        return ask
    return DeviceAsk(vendor=ask.vendor, nums=ask.nums, mem=mib, mem_percent=pct, cores=cores)
