"""The ablation of issue 12 on Ray: the full defense against variants without GNR, with other
guided losses, the DAE, without KT and with KT at other (lambda, T), each over several seeds.

``raydefense.ablation.variants`` (no Ray): the variants, the runs that produce them, their
configs. ``raydefense.ablation.shared``: a run that reads its shared stages from the seed's
base run. ``raydefense.ablation.execute``: ``run_ablation``, the driver (one Ray task per run).
``raydefense.ablation.summary`` / ``plot``: statistics over seeds, ``ablation.md``, ``ablation.png``.
"""
from raydefense.ablation.variants import DEFAULT_KT, build_plan, parse_custom, parse_kt, run_config

__all__ = ["DEFAULT_KT", "build_plan", "parse_custom", "parse_kt", "run_config", "run_ablation"]


def __getattr__(name: str):
    # run_ablation imports the pipeline's Ray side; load it only when asked for.
    if name == "run_ablation":
        from raydefense.ablation.execute import run_ablation

        return run_ablation
    raise AttributeError(f"module 'raydefense.ablation' has no attribute '{name}'")
