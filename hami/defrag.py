"""``hami defrag``: plan moves of movable allocations that free whole cards, or that make
a slice fit, and (``--apply``) carry them out, in order.

The planner is placement's pure one (services/placement/engine/defrag.py), run here on
the cluster as ``hami.api.status`` shows it. ``--apply`` moves each allocation the way
its source allows, which the status tells (an allocation's ``source``):

- a direct client's (``hami submit``): placement re-places it (``hami.placement.move``),
  checking the move again against its own view;
- a Kubernetes pod's (source ``kube``): placement cannot move a pod, so a run of pod
  moves goes to the binder holding the Lease (``hami.binder.defrag.apply``), which
  evicts each pod and steers its replacement to the planned cards
  (services/binder/defrag.py), and answers each move's outcome.

A move refused (the cluster changed since the plan, a PodDisruptionBudget, a pod with
no controller) stops the moves: those after it were planned on the cluster it was to
leave, and are not tried.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from services.placement.engine import defrag
from shared import subjects
from shared.schemas import (
    DefragApplyReply,
    DefragApplyRequest,
    DefragOutcome,
    ErrorReply,
    MoveReply,
    MoveRequest,
)

DEFAULT_MAX_MOVES = 10
DEFAULT_REPLACE_TIMEOUT = 300.0  # the binder's scheduler.defragReplaceTimeout default


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
    p.add_argument("--max-disruption", type=int, default=0, metavar="N",
                   help="Kubernetes --apply: at most N pods evicted and not yet placed again "
                        "at a time (default: the binder's scheduler.defragMaxDisruption, 1)")
    p.add_argument("--replace-timeout", type=float, default=DEFAULT_REPLACE_TIMEOUT, metavar="S",
                   help="Kubernetes --apply: seconds an evicted pod's replacement may take to be "
                        "placed (default %(default)g)")


def move_json(m: defrag.Move) -> dict[str, Any]:
    return {"uid": m.uid, "name": f"{m.namespace}/{m.name}" if m.namespace else m.name,
            "from_node": m.from_node, "from_cards": list(m.from_cards),
            "to_node": m.to_node, "to_cards": list(m.to_cards)}


def cmd_defrag(args: argparse.Namespace) -> int:
    from hami import cli  # the command line's helpers (cli imports this module)

    if args.max_moves < 0:
        raise cli.Fail(f"--max-moves must be at least 0, not {args.max_moves}", cli.USAGE)
    if args.max_disruption < 0 or args.replace_timeout <= 0:
        raise cli.Fail("--max-disruption must be at least 0 and --replace-timeout more than 0", cli.USAGE)
    st = cli.fetch_status(args, detail=True)
    cards, holdings = defrag.from_status(st)
    kube = {a.uid for n in st.nodes for a in n.held if a.source == "kube"}
    try:
        p = defrag.plan(cards, holdings, max_moves=args.max_moves, need=args.need)
    except defrag.PlanError as exc:
        raise cli.Fail(f"cannot plan: {exc}", cli.REFUSED) from None
    out: dict[str, Any] = {
        "moves": [move_json(m) for m in p.moves], "free_before": p.free_before,
        "free_after": p.free_after, "freed": p.freed, "fits": p.fits, "exact": p.exact,
        "movable": sum(1 for h in holdings if h.movable), "applied": 0, "error": "",
        "outcomes": [],  # each pod move's outcome (Kubernetes --apply)
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
        if not apply_moves(args, p.moves, kube, out, lines):
            code = cli.REFUSED
    cli.emit(args, out, lines)
    return code


def outcome_json(o: DefragOutcome) -> dict[str, Any]:
    return {"uid": o.uid, "name": f"{o.namespace}/{o.name}" if o.name else o.uid,
            "state": o.state, "error": o.error, "replacement": o.replacement,
            "node": o.node, "cards": list(o.cards), "on_plan": o.on_plan}


def outcome_line(o: DefragOutcome) -> str:
    name = f"{o.namespace}/{o.name}" if o.name else o.uid
    if o.state == "moved":
        where = f"{o.node} {','.join(o.cards)}"
        return (f"pod {name}: evicted; its replacement {o.replacement} placed on {where}"
                + ("" if o.on_plan else " (not the planned cards)"))
    if o.state == "not-tried":
        return f"pod {name}: not tried"
    return f"pod {name}: {o.state}: {o.error}"


def apply_moves(args: argparse.Namespace, moves: list[defrag.Move], kube: set[str],
                out: dict[str, Any], lines: list[str]) -> bool:
    """Carry the moves out in order; False when one is refused (the rest not tried).

    A run of consecutive pod moves is one request to the binder, so that it can keep
    up to ``--max-disruption`` of them under way at once."""
    from hami import cli

    url = cli.find_nats(args.nats_url)
    i = 0
    while i < len(moves):
        m = moves[i]
        if m.uid not in kube:
            r = asyncio.run(cli.request(url, subjects.PLACEMENT_MOVE,
                                        MoveRequest(uid=m.uid, to_node=m.to_node, to_cards=list(m.to_cards)),
                                        MoveReply, 15))
            if isinstance(r, ErrorReply) or not r.ok:
                out["error"] = r.error
                lines.append(f"move of {m.name} refused: {r.error}; {out['applied']} move(s) done, the rest not tried")
                return False
            out["applied"] += 1
            i += 1
            continue
        run = [m]
        while i + len(run) < len(moves) and moves[i + len(run)].uid in kube:
            run.append(moves[i + len(run)])
        ask = DefragApplyRequest(
            moves=[MoveRequest(uid=x.uid, to_node=x.to_node, to_cards=list(x.to_cards)) for x in run],
            max_disruption=args.max_disruption, timeout=args.replace_timeout)
        # Each replacement may take its whole timeout; the binder answers within that.
        wait = len(run) * (args.replace_timeout + 15.0) + 15.0
        rk = asyncio.run(cli.request(url, subjects.DEFRAG_APPLY, ask, DefragApplyReply, wait))
        if isinstance(rk, ErrorReply):
            out["error"] = rk.error
            lines.append(f"pod moves refused by the binder: {rk.error}; {out['applied']} move(s) done")
            return False
        out["outcomes"].extend(outcome_json(o) for o in rk.outcomes)
        lines.extend(outcome_line(o) for o in rk.outcomes)
        out["applied"] += sum(1 for o in rk.outcomes if o.state == "moved")
        if not rk.ok:
            out["error"] = rk.error
            lines.append(f"{out['applied']} move(s) done, the rest not tried")
            return False
        i += len(run)
    lines.append(f"{out['applied']} move(s) done")
    return True
