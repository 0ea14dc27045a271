"""Evaluate a finished run again: `python jobs/evaluate.py --name RUN [--storage PATH_OR_S3_URI]`."""
from raydefense.cli import run_main
from raydefense.jobs_impl import evaluate_main

if __name__ == "__main__":
    run_main(evaluate_main)
