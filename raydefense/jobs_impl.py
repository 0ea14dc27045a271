"""The bodies of the entry points in ``jobs/``: parse, call one library function, print."""
from __future__ import annotations

from typing import Sequence

from raydefense.cli import common_parser, config_from_args, quiet_logs


def full_pipeline_main(argv: Sequence[str]) -> int:
    p = common_parser("Run (or resume) the whole Li & Wang defense on Ray: prepare, models, attack, "
                      "gnr, denoise, distill, baselines, evaluate.")
    p.add_argument("--stop-after", help="stop after this stage (for staged runs); rerun with the same --name to go on")
    args = p.parse_args(list(argv))
    quiet_logs()
    cfg = config_from_args(args)
    from raydefense.pipeline.runner import run_pipeline

    run_pipeline(cfg, stop_after=args.stop_after)
    return 0


def evaluate_main(argv: Sequence[str]) -> int:
    p = common_parser("Evaluate a finished run again: Tables 1-3, Figures 6-7, attacks on the whole "
                      "defended model; rewrites <storage>/<name>/report/.")
    args = p.parse_args(list(argv))
    quiet_logs()
    cfg = config_from_args(args)
    from raydefense.pipeline.runner import evaluate_run

    evaluate_run(cfg)
    return 0
