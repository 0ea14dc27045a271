"""Tables 4 and 5 across finished runs: `python jobs/compare.py --runs RUN1 RUN2 ... [--storage PATH_OR_S3_URI] [--out NAME]`.

Runs on different datasets make Table 4, runs with different target models make Table 5
(the paper's numbers beside ours). Writes <storage>/comparisons/<NAME>/report.md and
comparison.json.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from raydefense.cli import DEFAULT_CONFIG, run_main


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description="Compare finished runs: Table 4 (datasets) and Table 5 (target models).")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="names of finished runs")
    p.add_argument("--storage", help="where the runs live (default: storage.path of configs/default.yaml)")
    p.add_argument("--out", default="comparison", help="folder name under <storage>/comparisons/ (default: comparison)")
    args = p.parse_args(list(argv))
    from raydefense.config import load_config, run_name_problem
    from raydefense.errors import ConfigError
    from raydefense.report.compare import compare_runs, format_rows
    from raydefense.storage import Storage

    for flag, names in (("--runs", args.runs), ("--out", [args.out])):
        for name in names:
            problem = run_name_problem(name)
            if problem:
                raise ConfigError(f"{flag} {name!r}: a run name {problem}")
    if args.storage is not None and not args.storage.strip():
        raise ConfigError("--storage: must not be empty (leave the flag out for the default)")
    storage_uri = args.storage or load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None).storage.path
    result = compare_runs(Storage.open(storage_uri), args.runs, out=args.out)
    print(format_rows(result["rows"]))
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    run_main(main)
