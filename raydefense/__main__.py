"""The ``raydefense`` command (also ``python -m raydefense``): one subcommand per job.

    raydefense run       the whole defense (= python jobs/full_pipeline.py)
    raydefense evaluate  evaluate a finished run again (= python jobs/evaluate.py)
    raydefense tune      search lambda, T, ... with Ray Tune (= python jobs/tune_defense.py)
    raydefense ablate    the ablation over seeds (= python jobs/ablate.py)
    raydefense compare   finished runs side by side (= python jobs/compare.py)
    raydefense export    TorchScript / ONNX + model card (= python jobs/export.py)
    raydefense serve     HTTP inference with Ray Serve (= python jobs/serve.py)

Without ``--config`` every subcommand uses the preset :data:`raydefense.cli.DEFAULT_CONFIG`
(``configs/default.yaml``, shipped inside the package), so an installed wheel runs the same
default as ``python jobs/full_pipeline.py`` in a checkout. ``raydefense --help`` prints its path.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from raydefense.cli import DEFAULT_CONFIG, run_main
from raydefense.errors import ConfigError


def evaluate_main(argv: Sequence[str]) -> int:
    """``raydefense evaluate``: as ``jobs/evaluate.py``, the run's own saved settings unless --config/--set."""
    from raydefense import jobs_impl

    return jobs_impl.evaluate_main(argv, prog="raydefense evaluate")


def compare_main(argv: Sequence[str]) -> int:
    """``raydefense compare``: as ``jobs/compare.py``, Tables 4 and 5 across finished runs."""
    import argparse

    p = argparse.ArgumentParser(prog="raydefense compare",
                                description="Compare finished runs: Table 4 (datasets) and Table 5 (target models).")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="names of finished runs")
    p.add_argument("--storage", help=f"where the runs live (default: storage.path of {DEFAULT_CONFIG.name})")
    p.add_argument("--out", default="comparison", help="folder name under <storage>/comparisons/ (default: comparison)")
    args = p.parse_args(list(argv))
    from raydefense.config import load_config
    from raydefense.report.compare import compare_runs, format_rows
    from raydefense.storage import Storage

    storage_uri = args.storage or load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None).storage.path
    result = compare_runs(Storage.open(storage_uri), args.runs, out=args.out)
    print(format_rows(result["rows"]))
    print(f"report: {result['report']}")
    return 0


def export_main(argv: Sequence[str]) -> int:
    from raydefense.export import main

    return main(argv)


def serve_main(argv: Sequence[str]) -> int:
    """``raydefense serve`` / ``jobs/serve.py``; a one-line error when the 'serve' extra is missing."""
    try:
        from raydefense.serve import main
    except ImportError as exc:
        raise ConfigError(f"serving needs Ray Serve: pip install 'raydefense[serve]' ({exc})") from exc
    return main(argv)


def _run(argv: Sequence[str]) -> int:
    from raydefense.jobs_impl import full_pipeline_main

    return full_pipeline_main(argv)


def _tune(argv: Sequence[str]) -> int:
    from raydefense.jobs_impl import tune_defense_main

    return tune_defense_main(argv)


def _ablate(argv: Sequence[str]) -> int:
    from raydefense.jobs_impl import ablate_main

    return ablate_main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "run": (_run, "run (or resume) the whole defense: prepare, models, attack, gnr, denoise, distill, baselines, "
                  "evaluate"),
    "evaluate": (evaluate_main, "evaluate a finished run again (tables, figures, whole-model attacks)"),
    "tune": (_tune, "search lambda, T, the guidance layer and more with Ray Tune + Optuna + ASHA"),
    "ablate": (_ablate, "the full defense against variants (no GNR, other losses, DAE, no KT, other lambda/T) "
                        "over seeds"),
    "compare": (compare_main, "finished runs side by side: Table 4 (datasets), Table 5 (target models)"),
    "export": (export_main, "write a run's defended model as TorchScript / ONNX with a JSON model card"),
    "serve": (serve_main, "serve an exported model over HTTP with Ray Serve"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: raydefense COMMAND [options]   (python -m raydefense COMMAND ...)", "",
             "Train, evaluate, export and serve the Li & Wang (2019) adversarial-example defense on Ray.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"default preset (used without --config): {_preset()}",
              "'raydefense COMMAND --help' lists a command's options."]
    return "\n".join(lines)


def _preset() -> str:
    return str(DEFAULT_CONFIG.resolve()) if DEFAULT_CONFIG.is_file() else f"{DEFAULT_CONFIG} (missing: built-in defaults)"


def dispatch(argv: Sequence[str]) -> int:
    """Run subcommand ``argv[0]`` with the rest of ``argv``; usage on ``-h`` or no command."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise ConfigError(f"unknown command '{name}'; commands: {', '.join(COMMANDS)}")
    sys.argv[0] = f"raydefense {name}"  # the subcommand's argparse takes its program name from here
    if any(a in ("-h", "--help") for a in rest):
        print(f"default preset (used without --config): {_preset()}\n", flush=True)
    return COMMANDS[name][0](rest)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``raydefense``)."""
    run_main(dispatch, argv)


if __name__ == "__main__":
    main()
