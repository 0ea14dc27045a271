"""Evaluate a finished run again: `python jobs/evaluate.py --name RUN [--storage PATH_OR_S3_URI] [--set eval.KEY=VALUE]`.

Rewrites <storage>/<RUN>/report/ (Tables 1-3, Figures 6-7, attacks on the whole defended
model, and Table 5 for a multi-model run). Without --config the run is evaluated with its own
saved settings; --set overrides them (e.g. --set eval.adaptive_steps=100 to attack harder).
"""
from raydefense.cli import run_main
from raydefense.jobs_impl import evaluate_main

if __name__ == "__main__":
    run_main(evaluate_main)
