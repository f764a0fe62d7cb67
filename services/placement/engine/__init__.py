"""The pure placement engine: cluster state in numpy arrays and the policies over it.

``ClusterState`` holds inventory, health, reservations and quotas; ``Placer.decide``
fits an ``AllocRequested`` and returns a ``Placement`` or a ``Failure`` (it never
reserves: the service reserves with a compare-and-set on the ledger, then calls
``ClusterState.reserve``). No I/O anywhere in this package.
"""

from .model import Failure, Placement, failure_message, normalise_ask, resolve_device_ask
from .placer import NODE_POLICIES, Placer, parse_chain
from .state import ClusterState

__all__ = [
    "NODE_POLICIES",
    "ClusterState",
    "Failure",
    "Placement",
    "Placer",
    "failure_message",
    "normalise_ask",
    "parse_chain",
    "resolve_device_ask",
]
