"""``hami defrag``: plan moves of movable allocations that free whole cards, or that make
a slice fit, and (``--apply``) carry them out through placement, one at a time.

The planner is placement's pure one (services/placement/engine/defrag.py), run here on
the cluster as ``hami.api.status`` shows it. ``--apply`` asks placement to re-place each
allocation in turn (``hami.placement.move``); placement checks each move again against
its own view, so a move that no longer fits (the cluster changed since the plan) is
refused and the moves after it are not tried.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from services.placement.engine import defrag
from shared import subjects
from shared.schemas import ErrorReply, MoveReply, MoveRequest

DEFAULT_MAX_MOVES = 10


def parse_need(text: str) -> tuple[int, int]:
    """``--for MEM/CORES``: MiB and % cores of one card, e.g. 40000/50."""
    mem, sep, cores = text.partition("/")
    try:
        need = (int(mem), int(cores) if sep else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MEM/CORES, e.g. 40000/50") from None
    if need[0] < 0 or not 0 <= need[1] <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: MiB at least 0, cores 0 to 100")
    return need


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="print the moves, change nothing")
    mode.add_argument("--apply", action="store_true",
                      help="carry the moves out: each allocation released and placed again where planned")
    p.add_argument("--for", dest="need", type=parse_need, default=None, metavar="MEM/CORES",
                   help="make a one-card slice of MEM MiB and CORES %% fit (default: free the most whole cards)")
    p.add_argument("--max-moves", type=int, default=DEFAULT_MAX_MOVES, metavar="N",
                   help="at most N moves")


def move_json(m: defrag.Move) -> dict[str, Any]:
    return {"uid": m.uid, "name": f"{m.namespace}/{m.name}" if m.namespace else m.name,
            "from_node": m.from_node, "from_cards": list(m.from_cards),
            "to_node": m.to_node, "to_cards": list(m.to_cards)}


def cmd_defrag(args: argparse.Namespace) -> int:
    from hami import cli  # the command line's helpers (cli imports this module)

    if args.max_moves < 0:
        raise cli.Fail(f"--max-moves must be at least 0, not {args.max_moves}", cli.USAGE)
    st = cli.fetch_status(args, detail=True)
    cards, holdings = defrag.from_status(st)
    if args.apply:
        # Placement moves what direct clients hold; a pod moves by eviction (not built yet).
        kube = {a.uid for n in st.nodes for a in n.held if a.source == "kube"}
        holdings = [dataclasses.replace(h, movable=False) if h.uid in kube else h for h in holdings]
    try:
        p = defrag.plan(cards, holdings, max_moves=args.max_moves, need=args.need)
    except defrag.PlanError as exc:
        raise cli.Fail(f"cannot plan: {exc}", cli.REFUSED) from None
    out: dict[str, Any] = {
        "moves": [move_json(m) for m in p.moves], "free_before": p.free_before,
        "free_after": p.free_after, "freed": p.freed, "fits": p.fits, "exact": p.exact,
        "movable": sum(1 for h in holdings if h.movable), "applied": 0, "error": "",
    }
    lines = [f"move {j['name']}: {j['from_node']} {','.join(j['from_cards'])} -> "
             f"{j['to_node']} {','.join(j['to_cards'])}" for j in out["moves"]]
    lines.append(f"{len(p.moves)} move(s) of {out['movable']} movable allocation(s): "
                 f"whole cards free {p.free_before} -> {p.free_after}"
                 + ("" if p.fits is None else f"; {args.need[0]} MiB/{args.need[1]}% "
                    + ("fits" if p.fits else "does not fit"))
                 + ("" if p.exact else " (search budget reached: not proven best)"))
    code = cli.OK if p.fits is not False else cli.REFUSED
    if args.apply and p.moves:
        url = cli.find_nats(args.nats_url)
        for m in p.moves:
            r = asyncio.run(cli.request(url, subjects.PLACEMENT_MOVE,
                                        MoveRequest(uid=m.uid, to_node=m.to_node, to_cards=list(m.to_cards)),
                                        MoveReply, 15))
            if isinstance(r, ErrorReply) or not r.ok:
                out["error"] = r.error
                lines.append(f"move of {m.name} refused: {r.error}; {out['applied']} move(s) done, the rest not tried")
                code = cli.REFUSED
                break
            out["applied"] += 1
        else:
            lines.append(f"{out['applied']} move(s) done")
    cli.emit(args, out, lines)
    return code
