"""Search lambda, T and the UDDN guidance layer (and more) with Ray Tune + Optuna + ASHA:
`python jobs/tune_defense.py --config configs/smoke.yaml --num-samples 4`; the same command
again resumes. Writes best.json, best_config.yaml and trials.png under <storage>/<run>/tune/<search>/.
Adversarial-training knobs of uddn_kt_adv (issue 13; objective: whole-model PGD accuracy on the
validation split): `--set tune.defense=uddn_kt_adv --set tune.metric=val_pgd_acc` (knobs robust.eps,
robust.steps, robust.weight; more with --space 'robust.beta=uniform(1, 8)')."""
from raydefense.cli import run_main
from raydefense.jobs_impl import tune_defense_main

if __name__ == "__main__":
    run_main(tune_defense_main)
