"""Evaluate a finished run again: `python jobs/evaluate.py --name RUN [--storage PATH_OR_S3_URI] [--set eval.KEY=VALUE]`.

Rewrites <storage>/<RUN>/report/ (Tables 1-3, Figures 6-7, attacks on the whole defended
model, and Table 5 for a multi-model run). Without --config the run is evaluated with its own
saved settings; --set overrides them (e.g. --set eval.adaptive_steps=100 to attack harder).
"""
from __future__ import annotations

from typing import Sequence

from raydefense.cli import common_parser, config_from_args, quiet_logs, run_main


def main(argv: Sequence[str]) -> int:
    p = common_parser("Evaluate a finished run again: Tables 1-3, Figures 6-7, attacks on the whole defended "
                      "model; rewrites <storage>/<name>/report/.")
    args = p.parse_args(list(argv))
    quiet_logs()
    from raydefense.pipeline.runner import evaluate_run, load_run_config

    if args.config:
        cfg = config_from_args(args)
    else:
        if not args.name:
            p.error("--name RUN is required (the run to evaluate)")
        storage = args.storage or config_from_args(args).storage.path
        cfg = load_run_config(args.name, storage=storage, overrides=args.overrides)
    evaluate_run(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
