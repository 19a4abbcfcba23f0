"""`fitprobe recommend`: the settings to run on a card, cheapest fitting first (probe/recommend.py).

Takes every option `probe` takes (the request whose method is kept) and always estimates; the first
candidate exports like a probe's plan (`--format`, with `--effective-batch`), or any other by its rank
(`--candidate`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fitprobe_client.exit_codes import EXIT_OK, EXIT_UNMET
from fitprobe.probe.spec import ESTIMATED, ProbeSpec, SpecError, format_bytes

if TYPE_CHECKING:  # the search imports torch: `fitprobe --help` and `plan` must not (probe/cli.py)
    from fitprobe.probe.recommend import Candidate, Recommendation


def add_recommend_command(commands: Any, formatter: type[argparse.HelpFormatter],
                          add_export_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `recommend` subcommand, with probe's options (cli.add_model_options) and the export flags."""
    from fitprobe.probe.cli import add_model_options

    parser = commands.add_parser("recommend", help="the settings that save memory while keeping your method, "
                                 "each estimated on the card and ranked by what it costs", formatter_class=formatter)
    add_model_options(parser, search=True)
    parser.add_argument("--allow-method-change", action="store_true",
                        help="also try LoRA, then QLoRA, when you asked for full fine-tuning")
    parser.add_argument("--candidate", type=int, metavar="RANK",
                        help="with --format: export this candidate (its rank in the table) instead of the first that fits")
    add_export_options(parser)
    parser.set_defaults(run=cmd_recommend)


def cmd_recommend(args: argparse.Namespace) -> int:
    from fitprobe.probe.cli import allowed_factories, checked_spec, print_export, progress_of
    from fitprobe.probe.recommend import recommend

    if args.format and not args.effective_batch:
        raise SpecError("--format exports the first candidate's plan: give --effective-batch too")
    if args.candidate is not None and not args.format:
        raise SpecError("--candidate picks the candidate --format exports: give --format too")
    args.mode = "estimate"  # a recommendation weighs many settings: each is estimated, none trained
    spec = checked_spec(args)
    if spec.capacity_bytes is None:
        raise SpecError("recommend plans for a card: give --gpu CARD or --capacity (e.g. 24GiB)")
    found = recommend(spec, args.allow_method_change, allowed_factories(), progress_of(args))
    first = found.first_fitting
    code = EXIT_OK if first else EXIT_UNMET
    chosen = first if args.candidate is None else _ranked(found, args.candidate)
    if args.format and chosen is not None:
        print_export(export_candidate(spec, chosen, args.format), args)
        return code
    print(json.dumps(found.to_dict(), indent=2) if args.json else format_recommendation(found))
    return code


def export_candidate(spec: ProbeSpec, candidate: Candidate, fmt: str) -> dict[str, Any]:
    """The candidate's plan as `fmt`'s config, with the settings it changed, as a probe's export is."""
    from fitprobe.probe.export import export_plan
    from fitprobe.probe.report import PlanFacts

    if candidate.plan is None:
        raise SpecError("the candidate has no plan: give --effective-batch")
    export = export_plan(PlanFacts.model_validate(candidate.plan), spec.model_copy(update=candidate.settings), fmt,
                         max_micro_batch=candidate.max_micro_batch, safe_micro_batch=candidate.safe_micro_batch)
    export["provenance"].setdefault("notes", []).insert(0, f"fitprobe recommend ({ESTIMATED}): {candidate.label}")
    return export


def _ranked(found: Recommendation, rank: int) -> Candidate:
    """The candidate at `rank` (1 = the table's first row), refused with the fix when it has nothing to export."""
    if not 1 <= rank <= len(found.candidates):
        raise SpecError(f"--candidate must be a rank from 1 to {len(found.candidates)} (got {rank})")
    candidate = found.candidates[rank - 1]
    if not candidate.max_micro_batch:
        raise SpecError(f"candidate {rank} ({candidate.label}) does not fit on this card: pick one whose max is ≥ 1")
    return candidate


def _cost_words(candidate: Candidate) -> str:
    compute = "—" if candidate.extra_compute is None else f"{candidate.extra_compute:+.1%}"
    return f"{compute:>8}  {', '.join(candidate.numerics) or 'none'}"


def format_recommendation(found: Recommendation) -> str:
    """A row per candidate, cheapest fitting first: max/safe micro-batch, peak, extra FLOPs, numerics changed."""
    lines = [f"{found.model} seq_len={found.seq_len} on {format_bytes(found.capacity_bytes)} ({ESTIMATED}); "
             "ranked: keeps the headroom, fits, keeps the method, fewest numerics changes, least extra compute, larger micro-batch",
             f"{'#':>2}  {'max':>4}  {'safe':>4}  {'peak':>10}  {'compute':>8}  numerics changed  ·  settings"]
    for rank, candidate in enumerate(found.candidates, start=1):
        if candidate.max_micro_batch is None:
            lines.append(f"{rank:>2}  {'n/a':>4}  {'':>4}  {'':>10}  {'':>8}  {candidate.label}: {candidate.note}")
            continue
        peak = format_bytes(candidate.peak_bytes) if candidate.peak_bytes else "-"
        lines.append(f"{rank:>2}  {candidate.max_micro_batch:>4}  {candidate.safe_micro_batch or 0:>4}  {peak:>10}  "
                     f"{_cost_words(candidate)}  ·  {candidate.label}")
    first = found.first_fitting
    if first is None:
        lines.append("nothing fits: no combination of these settings trains at micro-batch 1 on this card")
    else:
        lines.append(f"run: {first.label}, micro-batch {first.safe_micro_batch or 1} "
                     f"(max {first.max_micro_batch})")
    lines.append(f"not modelled: {found.not_modelled}")
    lines.append(f"{len(found.candidates)} candidates in {found.wall_s:.1f}s")
    return "\n".join(lines)
