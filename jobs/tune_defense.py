"""Search lambda, T and the UDDN guidance layer (and more) with Ray Tune + Optuna + ASHA:
`python jobs/tune_defense.py --config configs/smoke.yaml --num-samples 4`; the same command
again resumes. Writes best.json, best_config.yaml and trials.png under <storage>/<run>/tune/<search>/."""
from raydefense.cli import run_main
from raydefense.jobs_impl import tune_defense_main

if __name__ == "__main__":
    run_main(tune_defense_main)
