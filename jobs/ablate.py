"""The ablation of the defense over seeds, on Ray:
`python jobs/ablate.py --config configs/default.yaml [--seeds 3] [--variants full,no_gnr,...] [--name NAME]`;
the same command again resumes. Writes ablation.md, ablation.json and ablation.png under
<storage>/<name>/ (default name: <config name>-ablation)."""
from raydefense.cli import run_main
from raydefense.jobs_impl import ablate_main

if __name__ == "__main__":
    run_main(ablate_main)
