"""Run the whole defense: `python jobs/full_pipeline.py` (local Ray, embedded synthetic data)
or `ray job submit --working-dir . -- python jobs/full_pipeline.py --config configs/smoke.yaml`."""
from raydefense.cli import run_main
from raydefense.jobs_impl import full_pipeline_main

if __name__ == "__main__":
    run_main(full_pipeline_main)
