"""The fragmentation-aware variants the experiments in docs/placement.md compared.

Sweep points and earlier versions of the product default, kept so that the reported
figures can be made again; they are not product policies. Importing this module makes
them node policies (``register_variant``); run it as the replay with them:

    .venv/bin/python bench/frag_variants.py --nodes NODES.csv --pods PODS.csv --policy frag-v2 --policy fgd

Same options as ``hami replay`` (``services/placement/replay.py``).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement.engine.frag import Variant, register_variant  # noqa: E402

# the product default until the fourth session: truncated score, CPU weighed by its scarcity
FRAG_V2 = Variant(
    two_d=True, exact=False, tie="adaptive", gpu_cover=True, model_aware="delta", card_tie=True
)

EXPERIMENTS: dict[str, Variant] = {
    # fgd's measure counting a node whose model a typical shape may not use as wholly
    # fragmented for it (the simulator's "no access")
    "fgd-models": Variant(two_d=False, exact=False, tie="bestfit"),
    # fgd until the fifth session: blind to the shapes' models (the task's own models
    # still filter), exact 95 % cover
    "fgd-blind": Variant(two_d=False, exact=False, tie="bestfit", shape_types=False),
    # the no-access measure with batches of 10 shapes up to the 95 % cover (e8b019d)
    "fgd-step95": Variant(two_d=False, exact=False, tie="bestfit", shape_step=10),
    "frag-v2": FRAG_V2,
    "frag-v1": Variant(two_d=True, exact=False, tie="bestfit2"),  # the first frag, for comparison
    "frag-q10": Variant(two_d=True, exact=True, tie="bestfit", quantum=0.1),
    # experiments reported in docs/placement.md; accepted by the Placer, not advertised
    "fgd-random": Variant(two_d=False, exact=False, tie="random"),
    "fgd-exact": Variant(two_d=False, exact=True, tie="random"),
    "frag-exact": Variant(two_d=True, exact=True, tie="bestfit"),
    "frag-random": Variant(two_d=True, exact=True, tie="random"),
    "frag-trunc": Variant(two_d=True, exact=False, tie="bestfit"),
    "frag-q01": Variant(two_d=True, exact=True, tie="bestfit", quantum=0.01),
    "frag-q05": Variant(two_d=True, exact=True, tie="bestfit", quantum=0.05),
    "frag-q20": Variant(two_d=True, exact=True, tie="bestfit", quantum=0.2),
    "frag-q10-bf2": Variant(two_d=True, exact=True, tie="bestfit2", quantum=0.1),
    "frag-gpu": Variant(two_d=True, exact=False, tie="bestfit", gpu_weighted=True),
    "frag-cg": Variant(two_d=True, exact=False, tie="bestfit2", gpu_cover=True),
    "frag-cg1": Variant(two_d=True, exact=False, tie="bestfit", gpu_cover=True),
    "frag-cgm": Variant(two_d=True, exact=False, tie="bestfit2", gpu_cover=True, model_aware="tie"),
    "frag-cgp": Variant(
        two_d=True, exact=False, tie="bestfit2", gpu_cover=True, model_aware="first"
    ),
    "frag-cgp1": Variant(
        two_d=True, exact=False, tie="bestfit", gpu_cover=True, model_aware="first"
    ),
    "frag-cgd": Variant(
        two_d=True, exact=False, tie="bestfit2", gpu_cover=True, model_aware="delta"
    ),
    "frag-cgd1": Variant(
        two_d=True, exact=False, tie="bestfit", gpu_cover=True, model_aware="delta"
    ),
    "frag-cgd1c": Variant(
        two_d=True, exact=False, tie="bestfit", gpu_cover=True, model_aware="delta", card_tie=True
    ),
    "frag-cgdx": Variant(
        two_d=True, exact=False, tie="bestfit2g", gpu_cover=True, model_aware="delta", card_tie=True
    ),
    "frag-cgdl": Variant(
        two_d=True,
        exact=False,
        tie="bestfitlex",
        gpu_cover=True,
        model_aware="delta",
        card_tie=True,
    ),
    "frag-cgdw": Variant(
        two_d=True, exact=False, tie="bestfit2w", gpu_cover=True, model_aware="delta", card_tie=True
    ),
    "frag-m": Variant(two_d=True, exact=False, tie="bestfit2", model_aware="tie"),
    "frag-nc": Variant(
        two_d=True, exact=False, tie="adaptive", gpu_cover=True, model_aware="delta"
    ),
    "frag-ng": Variant(two_d=True, exact=False, tie="adaptive", model_aware="delta", card_tie=True),
    "fgd-c": Variant(two_d=False, exact=False, tie="bestfit", card_tie=True),
    "fgd-bf2": Variant(two_d=False, exact=False, tie="bestfit2"),
    "fgd-bf2c": Variant(two_d=False, exact=False, tie="bestfit2", card_tie=True),
    "frag-q10-cg": Variant(two_d=True, exact=True, tie="bestfit2", quantum=0.1, gpu_cover=True),
    # fourth session, frag-v2 with: the truncated score's bin width (tau), bins with an
    # edge at Δ = 0, the blend with the scarcity-weighted CPU term (cpu050 5.30)
    "frag-t08": replace(FRAG_V2, tau=0.8),
    "frag-t125": replace(FRAG_V2, tau=1.25),
    "frag-c04": replace(FRAG_V2, exact=True, quantum=0.04, qmode="ceil"),
    "frag-ba": replace(FRAG_V2, exact=True, blend=0.05),
}

for _name, _variant in EXPERIMENTS.items():
    register_variant(_name, _variant)


def main(argv: list[str]) -> int:
    from services.placement import replay

    return replay.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
