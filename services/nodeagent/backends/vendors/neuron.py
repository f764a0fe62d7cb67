"""AWS Neuron devices (Inferentia2, Trainium1/2): as HAMi's awsneuron device and AWS's plugin.

HAMi device type ``AWSNeuron``; resources ``aws.amazon.com/neuron`` (devices) and
``aws.amazon.com/neuroncore`` (cores); core granularity, no memory isolation. HAMi builds
the devices from node capacity (IDs ``<node>-AWSNeuron-<i>``), so the node agent writes no
register annotation; it advertises the extended resources.

Discovery: ``neuron-ls --json-output`` (one object per device; ``nc_count`` is the key
known to be stable, the others are read when present).
"""

from __future__ import annotations

import json

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    hami_names,
)

MODELS = {
    # cores = NeuronCores per device; memory per device
    "inf2": Model("inf2", "Inferentia2", 32768, 2, aliases=("Inferentia2",), topology="ring"),
    "trn1": Model(
        "trn1", "Trainium", 32768, 2, aliases=("Trainium", "Trainium1"), topology="torus4x4"
    ),
    "trn2": Model("trn2", "Trainium2", 98304, 8, aliases=("Trainium2",), topology="torus4x4"),
}
FAMILY = Family(
    **hami_names("AWSNeuron"),
    register="capacity",
    split=1,
    models=tuple(MODELS.values()),
    dev_globs=("neuron[0-9]*",),
    pci_vendors=("0x1d0f",),
    extra={"assigned": "AWS_NEURON_IDS", "resource_type": "NEURON_RESOURCE_TYPE"},
)


def discover(run: Runner, instance_type: str = "") -> list[PhysicalCard]:
    try:
        raw = json.loads(run(["neuron-ls", "--json-output"]))
    except ValueError as exc:
        raise CommandError(f"neuron-ls: not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise CommandError("neuron-ls: expected a list of devices")
    kind = instance_type.split(".")[0]
    cards: list[PhysicalCard] = []
    for d in raw:
        cores = d.get("nc_count")
        if not isinstance(cores, int):
            raise CommandError("neuron-ls: a device without nc_count")
        i = int(d.get("neuron_device", len(cards)))
        model = MODELS.get(kind) or (MODELS["trn2"] if cores >= 8 else MODELS["inf2"])
        mem = d.get("memory_size")
        cards.append(
            PhysicalCard(
                uuid=f"neuron{i}",
                index=i,
                model=model.name,
                memory_mib=(int(mem) >> 20)
                if isinstance(mem, int) and mem > 0
                else model.memory_mib,
                numa=int(d.get("numa_node", 0) or 0),
                vendor=FAMILY.key,
                type=model.type,
                cores=cores,
                custom_info=(("bdf", str(d.get("bdf", ""))),) if d.get("bdf") else (),
            )
        )
    return cards


def connected(raw: list[dict[str, object]]) -> dict[int, list[int]]:
    """``connected_to`` of each device (the topology neuron-ls prints), when present."""
    out: dict[int, list[int]] = {}
    for d in raw:
        peers = d.get("connected_to")
        if isinstance(peers, list):
            out[int(str(d.get("neuron_device", 0)))] = [int(p) for p in peers if isinstance(p, int)]
    return out
