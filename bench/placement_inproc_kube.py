"""bench/placement_inproc.py with every request sent as a Kubernetes pod's (``source="kube"``).

A Kubernetes pod's decision also lists the fitting nodes with their HAMi node scores
(for HAMi's FilteringSucceed event); standalone requests skip that. Run both with the
same arguments and compare decisions/s and latency:

    .venv/bin/python bench/placement_inproc.py --policy binpack
    .venv/bin/python bench/placement_inproc_kube.py --policy binpack
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import placement_inproc as base  # noqa: E402

from shared.schemas import AllocRequested  # noqa: E402

_make = base.make_request


def make_request(*args: object, **kwargs: object) -> AllocRequested:
    return msgspec.structs.replace(_make(*args, **kwargs), source="kube")  # type: ignore[arg-type]


base.make_request = make_request

if __name__ == "__main__":
    raise SystemExit(base.main(sys.argv[1:]))
