"""The bodies of the entry points in ``jobs/``: parse, call one library function, print."""
from __future__ import annotations

from typing import Sequence

from raydefense.cli import common_parser, config_from_args, quiet_logs


def _check_output_file(flag: str, path: str) -> None:
    """A local file a job writes at its end: its folder must exist and be writable now, so a
    typo fails at once and not after the work is done."""
    import os

    from raydefense.errors import ConfigError

    folder = os.path.dirname(os.path.abspath(path)) if path.strip() else ""
    if not path.strip() or os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r}: must name a file")
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {path!r}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {path!r}: folder {folder} is not writable")


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


def evaluate_main(argv: Sequence[str], *, prog: str | None = None) -> int:
    """Evaluate a finished run again with its own saved settings, unless --config; --set overrides."""
    p = common_parser("Evaluate a finished run again: Tables 1-3, Figures 6-7, attacks on the whole defended "
                      "model; rewrites <storage>/<name>/report/.")
    if prog:
        p.prog = prog
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


def tune_defense_main(argv: Sequence[str]) -> int:
    p = common_parser("Search the knowledge-transfer weight lambda, the temperature T, the UDDN guidance layer and "
                      "more with Ray Tune + Optuna + ASHA, on the stages prepare..gnr of the run --name.")
    p.add_argument("--num-samples", type=int, metavar="N", help="trials to run (default: tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: tune.max_concurrent; 0 = as many as the cluster fits)")
    p.add_argument("--search", default="search", metavar="NAME",
                   help="search name, under <storage>/<run>/tune/ (default: search); the same name resumes")
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND(ARGS)",
                   help="search one more config key, e.g. --space 'distill.student.lr=loguniform(1e-4, 1e-2)' or "
                        "--space 'denoise.width_mult=choice(0.5, 1, 2)' (repeatable)")
    p.add_argument("--best-config", metavar="PATH", help="also write the best config to this local file")
    args = p.parse_args(list(argv))
    quiet_logs()
    if args.num_samples is not None:
        args.overrides.append(f"tune.num_samples={args.num_samples}")
    if args.max_concurrent:
        args.overrides.append(f"tune.max_concurrent={args.max_concurrent}")
    cfg = config_from_args(args)
    if args.best_config is not None:
        _check_output_file("--best-config", args.best_config)
    from raydefense.tune.search import format_summary, run_search

    best = run_search(cfg, search=args.search, space=args.space, max_concurrent=args.max_concurrent,
                      best_config_path=args.best_config)
    print(format_summary(best))
    return 0


def ablate_main(argv: Sequence[str]) -> int:
    p = common_parser("Ablation of the defense on Ray: the full defense against variants without GNR, with other "
                      "guided losses, the DAE, without KT and with KT at other (lambda, T), each over several seeds; "
                      "writes <storage>/<name>/ablation.md, ablation.json and ablation.png.")
    next(a for a in p._actions if a.dest == "name").help = (
        "the ablation's name: its folder under the storage (default <config name>-ablation); the same name resumes")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="seeds per variant: the config's seed and the next N-1 (default 3)")
    p.add_argument("--variants", default="", metavar="A,B,...",
                   help="comma-separated variants (default: full, none, no_kt, no_gnr, the two other guidance "
                        "layers, dae, kt); also real_noise, pixel_guided, kt_lam<L>_T<T>, all")
    p.add_argument("--kt", default=None, metavar="L:T,...",
                   help="the (lambda, T) pairs of the 'kt' variants (default 1:1,1:16,4:4)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]",
                   help="one more variant: the full defense with these denoise.* / distill.* / gnr.augment_ratio "
                        "settings, e.g. --custom 'pix0=denoise.pixel_weight=0' (repeatable)")
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="runs at once (default 0: as many as the cluster fits; on a local Ray counted by cores)")
    args = p.parse_args(list(argv))
    quiet_logs()
    cfg = config_from_args(args)
    from raydefense.ablation import DEFAULT_KT, parse_custom, parse_kt, run_ablation

    run_ablation(cfg, name=args.name or f"{cfg.name}-ablation", seeds=args.seeds,
                 variants=args.variants.split(","), kt=parse_kt(args.kt) if args.kt is not None else DEFAULT_KT,
                 custom=[parse_custom(c) for c in args.custom], concurrency=args.concurrency)
    return 0
